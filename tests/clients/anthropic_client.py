"""The official `anthropic` package against tollgate's /v1/messages, unchanged but for base_url.

Usage: anthropic_client.py BASE_URL KEY. Prints `CALLS n` and `ALL OK`; any failed check raises.
"""
import sys

import anthropic

base_url, key = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)
calls = 0

# JSON
m = client.messages.create(model="mock", max_tokens=64, system="Be brief.",
                           messages=[{"role": "user", "content": "Hello"}])
calls += 1
assert m.content[0].type == "text" and m.content[0].text.startswith("The mock provider"), m
assert m.usage.input_tokens > 0 and m.usage.output_tokens == 16, m.usage
assert m.stop_reason == "end_turn"

# Streaming, with the SDK's helper that assembles the final message
with client.messages.stream(model="mock-cached", max_tokens=64,
                            messages=[{"role": "user", "content": "Stream please"}]) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
calls += 1
assert len(text.split()) == 16, text
assert final.usage.output_tokens == 16 and final.usage.cache_read_input_tokens > 0, final.usage

# Through an OpenAI-compatible deployment (translated), JSON and streaming
m = client.messages.create(model="gpt-via-translation", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
calls += 1
assert m.type == "message" and m.content[0].text.startswith("The mock provider") and m.usage.output_tokens == 16, m
with client.messages.stream(model="gpt-via-translation", max_tokens=64,
                            messages=[{"role": "user", "content": "Stream via OpenAI"}]) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
calls += 1
assert len(text.split()) == 16 and final.usage.output_tokens == 16 and final.usage.input_tokens > 0, final.usage

# Tool use, JSON and streaming
tools = [{
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]
m = client.messages.create(model="mock", max_tokens=64, tools=tools,
                           messages=[{"role": "user", "content": "Weather in Paris? Use get_weather."}])
calls += 1
use = next(b for b in m.content if b.type == "tool_use")
assert use.name == "get_weather" and use.input == {"city": "mock"}, use
assert m.stop_reason == "tool_use"

m2 = client.messages.create(model="mock", max_tokens=64, tools=tools, messages=[
    {"role": "user", "content": "Weather in Paris? Use get_weather."},
    {"role": "assistant", "content": [b.model_dump() for b in m.content]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
])
calls += 1
assert m2.content[0].type == "text", m2

with client.messages.stream(model="mock", max_tokens=64, tools=tools,
                            messages=[{"role": "user", "content": "Weather? Ask get_weather."}]) as stream:
    final = stream.get_final_message()
calls += 1
use = next(b for b in final.content if b.type == "tool_use")
assert use.input == {"city": "mock"}, final

# count_tokens
n = client.messages.count_tokens(model="mock", messages=[{"role": "user", "content": "count me"}])
calls += 1
assert n.input_tokens > 0

# Errors arrive as the SDK's own exception types
try:
    client.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected NotFoundError")
except anthropic.NotFoundError as err:
    assert err.body["type"] == "error" and err.body["error"]["type"] == "not_found_error", err.body
calls += 1

try:
    anthropic.Anthropic(base_url=base_url, api_key="tg_wrong", max_retries=0).messages.create(
        model="mock", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected AuthenticationError")
except anthropic.AuthenticationError:
    pass  # not metered

# A stream the upstream cuts ends with an error event, which the SDK raises.
try:
    with client.messages.stream(model="mock-truncate", max_tokens=64,
                                messages=[{"role": "user", "content": "x"}]) as stream:
        for _ in stream.text_stream:
            pass
    raise AssertionError("expected an error for a truncated stream")
except anthropic.APIError as err:
    assert "stream" in str(err), err
calls += 1

# Models, in Anthropic's shape
page = client.models.list()
ids = [m.id for m in page.data]
assert "mock" in ids, ids
m = client.models.retrieve("mock")
assert m.id == "mock" and m.type == "model" and m.display_name and m.created_at, m
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("expected NotFoundError")
except anthropic.NotFoundError as err:
    assert err.status_code == 404
    assert err.body["type"] == "error", err.body

# A looping agent is refused at once through a retrying SDK (a 400, `x-should-retry: false`).
import time
retrying = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=2)
same = [{"role": "user", "content": "the same question, again and again"}]
started = time.monotonic()
refused = None
for i in range(5):
    try:
        retrying.messages.create(model="mock", max_tokens=16, messages=same)
    except anthropic.BadRequestError as err:
        refused = err
    calls += 1
assert refused is not None, "the fifth identical request is refused"
assert refused.response.headers.get("x-should-retry") == "false", dict(refused.response.headers)
assert time.monotonic() - started < 20, "the SDK must not wait out Retry-After"

print(f"CALLS {calls}")
print("ALL OK")
