"""The official `openai` and `anthropic` packages receiving tool calls that tollgate's tool
policy refused: each answer must parse, through the SDKs' own stream accumulators too, and say
why the call was not made.

Usage: refused_tools.py GATEWAY_URL KEY. Prints `ALL OK`; any failed check raises.
"""
import json
import sys

import anthropic
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
oai = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
ant = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
REFUSED = "'reset_password' was not made"


def schema():
    return {"type": "object", "properties": {"handle": {"type": "string", "const": "@victim"}},
            "required": ["handle"]}


chat_tools = [{"type": "function", "function": {"name": n, "parameters": schema()}}
              for n in ("lookup_account", "reset_password")]
ask = lambda tool: [{"role": "user", "content": f"please use {tool} for @victim"}]

# Chat Completions, JSON: the refused call is text, the allowed one a call.
r = oai.chat.completions.create(model="mock", tools=chat_tools, messages=ask("reset_password"))
assert r.choices[0].message.tool_calls is None, r
assert REFUSED in r.choices[0].message.content, r
assert r.choices[0].finish_reason == "stop", r
r = oai.chat.completions.create(model="mock", tools=chat_tools, messages=ask("lookup_account"))
call = r.choices[0].message.tool_calls[0]
assert call.function.name == "lookup_account" and json.loads(call.function.arguments) == {"handle": "@victim"}

# Chat Completions, streamed, through the SDK's accumulator (the Anthropic deployment too).
for model in ("mock", "claude-via-translation"):
    with oai.chat.completions.stream(model=model, tools=chat_tools, messages=ask("reset_password")) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    assert not final.choices[0].message.tool_calls, final
    assert REFUSED in final.choices[0].message.content, final
    with oai.chat.completions.stream(model=model, tools=chat_tools, messages=ask("lookup_account")) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"handle": "@victim"}, final

# Responses, JSON and streamed through the SDK's accumulator.
resp_tools = [{"type": "function", "name": n, "parameters": schema()} for n in ("lookup_account", "reset_password")]
r = oai.responses.create(model="mock", tools=resp_tools, input="use reset_password for @victim")
assert REFUSED in r.output_text, r
assert not [i for i in r.output if i.type == "function_call"], r
with oai.responses.stream(model="mock", tools=resp_tools, input="use reset_password for @victim") as s:
    text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
    final = s.get_final_response()
assert REFUSED in text and REFUSED in final.output_text, final
with oai.responses.stream(model="mock", tools=resp_tools, input="use lookup_account for @victim") as s:
    for _ in s:
        pass
    final = s.get_final_response()
assert [i.name for i in final.output if i.type == "function_call"] == ["lookup_account"], final

# Anthropic Messages, JSON and streamed through the SDK's accumulator.
ant_tools = [{"name": n, "input_schema": schema()} for n in ("lookup_account", "reset_password")]
m = ant.messages.create(model="mock", max_tokens=64, tools=ant_tools, messages=ask("reset_password"))
assert [b.type for b in m.content if b.type == "tool_use"] == [], m
assert any(b.type == "text" and REFUSED in b.text for b in m.content), m
assert m.stop_reason == "end_turn", m
with ant.messages.stream(model="mock", max_tokens=64, tools=ant_tools, messages=ask("reset_password")) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
assert REFUSED in text, text
assert final.stop_reason == "end_turn" and not [b for b in final.content if b.type == "tool_use"], final
with ant.messages.stream(model="mock", max_tokens=64, tools=ant_tools, messages=ask("lookup_account")) as s:
    final = s.get_final_message()
use = [b for b in final.content if b.type == "tool_use"]
assert len(use) == 1 and use[0].input == {"handle": "@victim"}, final
print("ALL OK")
