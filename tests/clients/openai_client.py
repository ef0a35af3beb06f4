"""The official `openai` package against tollgate, unchanged but for base_url.

Usage: openai_client.py BASE_URL KEY. Prints `CALLS n` (requests that reach the gateway's
metering) and `ALL OK` at the end; any failed check raises.
"""
import json
import sys

import openai
from openai import OpenAI

base_url, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
calls = 0

# JSON
r = client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "Say hello"}])
calls += 1
assert r.choices[0].message.content.startswith("The mock provider"), r
assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == 16, r.usage
raw = client.chat.completions.with_raw_response.create(model="mock", messages=[{"role": "user", "content": "x"}])
calls += 1
assert raw.headers.get("x-request-id", "").startswith("req_"), dict(raw.headers)
assert int(raw.headers["x-tollgate-cost"]) > 0

# Streaming, without and with usage
text = ""
for chunk in client.chat.completions.create(model="mock", stream=True, messages=[{"role": "user", "content": "Stream"}]):
    assert chunk.usage is None, chunk
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
calls += 1
assert len(text.split()) == 16, text

usage = None
stream = client.chat.completions.create(
    model="mock-long", stream=True, stream_options={"include_usage": True},
    messages=[{"role": "user", "content": "Stream with usage"}],
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
calls += 1
assert usage is not None and usage.completion_tokens == 200, usage

# Streaming through an Anthropic deployment (translated): a valid chunk sequence, usage at the end
usage = None
text = ""
for chunk in client.chat.completions.create(
        model="claude-via-translation", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Through Claude"}]):
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage is not None:
        usage = chunk.usage
calls += 1
assert len(text.split()) == 16, text
assert usage is not None and usage.completion_tokens == 16 and usage.prompt_tokens > 0, usage

# Tool calls, JSON and streaming
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
r = client.chat.completions.create(model="mock", tools=tools, messages=[{"role": "user", "content": "Weather in Paris? Use get_weather."}])
calls += 1
call = r.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "mock"}, call
assert r.choices[0].finish_reason == "tool_calls"

followup = client.chat.completions.create(
    model="mock", tools=tools,
    messages=[
        {"role": "user", "content": "Weather in Paris? Use get_weather."},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ],
)
calls += 1
assert followup.choices[0].message.content, followup

args = ""
name = None
for chunk in client.chat.completions.create(model="mock", tools=tools, stream=True,
                                             messages=[{"role": "user", "content": "Weather? Ask get_weather."}]):
    if chunk.choices and chunk.choices[0].delta.tool_calls:
        tc = chunk.choices[0].delta.tool_calls[0]
        if tc.function.name:
            name = tc.function.name
        args += tc.function.arguments or ""
calls += 1
assert name == "get_weather" and json.loads(args) == {"city": "mock"}, (name, args)

# Responses API, JSON and streaming
r = client.responses.create(model="mock", instructions="Be brief.", input="Hello via Responses")
calls += 1
assert r.output_text.startswith("The mock provider") and r.usage.output_tokens == 16, r
completed = None
deltas = ""
for event in client.responses.create(model="mock", input="Stream via Responses", stream=True):
    if event.type == "response.output_text.delta":
        deltas += event.delta
    if event.type == "response.completed":
        completed = event.response
calls += 1
assert len(deltas.split()) == 16 and completed is not None and completed.usage.output_tokens == 16, completed

# Responses function tools: the call, its answer, and the same in a stream.
rtools = [{"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
r = client.responses.create(model="mock", tools=rtools, input="Weather in Paris? Use get_weather.")
calls += 1
fc = next(o for o in r.output if o.type == "function_call")
assert fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "mock"}, r
r2 = client.responses.create(model="mock", tools=rtools, input=[
    {"role": "user", "content": "Weather in Paris? Use get_weather."},
    {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
    {"type": "function_call_output", "call_id": fc.call_id, "output": "sunny"},
])
calls += 1
assert r2.output_text.startswith("The mock provider"), r2
args = ""
done = None
for event in client.responses.create(model="mock", tools=rtools, stream=True, input="Ask get_weather."):
    if event.type == "response.function_call_arguments.delta":
        args += event.delta
    if event.type == "response.completed":
        done = event.response
calls += 1
assert json.loads(args) == {"city": "mock"} and done.output[0].type == "function_call", done

# Embeddings: the SDK asks for base64 unless told otherwise, and decodes it.
e = client.embeddings.create(model="mock-embed", input=["one", "two"])
calls += 1
assert len(e.data) == 2 and e.usage.prompt_tokens > 0
f = client.embeddings.create(model="mock-embed", input=["one", "two"], encoding_format="float")
calls += 1
assert all(abs(a - b) < 1e-6 for a, b in zip(e.data[0].embedding, f.data[0].embedding)), (e, f)
assert len(e.data[0].embedding) == 8

# Models
ids = [m.id for m in client.models.list()]
assert "mock" in ids, ids
m = client.models.retrieve("mock")
assert m.id == "mock" and m.object == "model", m
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as err:
    assert err.status_code == 404

# Errors arrive as the SDK's own exception types
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as err:
    assert err.body["code"] == "model_not_found", err.body
calls += 1

try:
    OpenAI(base_url=base_url, api_key="tg_wrong", max_retries=0).chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected AuthenticationError")
except openai.AuthenticationError:
    pass  # not metered: the caller is unknown

try:
    client.chat.completions.create(model="mock-500", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected InternalServerError")
except openai.InternalServerError as err:
    assert err.status_code == 502
calls += 1

# A stream the upstream cuts surfaces as an error in the SDK, not as a clean ending.
try:
    for _ in client.chat.completions.create(model="mock-truncate", stream=True, messages=[{"role": "user", "content": "x"}]):
        pass
    raise AssertionError("expected APIError for a truncated stream")
except openai.APIError as err:
    assert "stream" in str(err), err
calls += 1

# An agent repeating itself gets the loop refusal at once through a retrying SDK: a 400 (the
# SDK retries 429s, waiting out the 60 s Retry-After, which used to stall the agent instead
# of stopping it), with `x-should-retry: false` besides.
import time
retrying = OpenAI(base_url=base_url, api_key=key, max_retries=2)
same = [{"role": "user", "content": "the same question, again and again"}]
started = time.monotonic()
refused = None
for i in range(5):
    try:
        retrying.chat.completions.create(model="mock", messages=same)
    except openai.BadRequestError as err:
        refused = err
    calls += 1
assert refused is not None, "the fifth identical request is refused"
assert refused.code in ("loop_detected", "retry_budget_exhausted"), refused
assert refused.response.headers.get("x-should-retry") == "false", dict(refused.response.headers)
assert time.monotonic() - started < 20, "the SDK must not wait out Retry-After"

print(f"CALLS {calls}")
print("ALL OK")
