"""LangChain's OpenAI and Anthropic chat models, unchanged, through tollgate: invoke, stream,
tool calls, and a loop that must end in the gateway's refusal, not a stall.
Usage: python langchain_client.py BASE_URL KEY"""
import sys, time
import openai, anthropic
from langchain_openai import ChatOpenAI
from langchain_anthropic import ChatAnthropic
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool

base_url, key = sys.argv[1], sys.argv[2]

@tool
def get_weather(city: str) -> str:
    """Weather for a city."""
    return "sunny"

models = {
    "openai": ChatOpenAI(model="mock", base_url=base_url + "/v1", api_key=key),
    "openai-responses": ChatOpenAI(model="mock", base_url=base_url + "/v1", api_key=key, use_responses_api=True),
    "anthropic": ChatAnthropic(model="mock", base_url=base_url, api_key=key, max_tokens=64),
    # An Anthropic client served by an OpenAI-compatible deployment, and the other way round.
    "anthropic-cross": ChatAnthropic(model="gpt-cross", base_url=base_url, api_key=key, max_tokens=64),
    "openai-cross": ChatOpenAI(model="claude-cross", base_url=base_url + "/v1", api_key=key),
}
for name, llm in models.items():
    r = llm.invoke("Hello")
    assert r.text.startswith("The mock provider"), (name, r)
    assert r.usage_metadata and r.usage_metadata["output_tokens"] == 16, (name, r.usage_metadata)
    text = "".join(c.text for c in llm.stream("Hello again"))
    assert text.startswith("The mock provider"), (name, text)
    with_tools = llm.bind_tools([get_weather])
    ask = HumanMessage("Use get_weather for Paris.")
    m = with_tools.invoke([ask])
    assert m.tool_calls and m.tool_calls[0]["name"] == "get_weather", (name, m)
    assert m.tool_calls[0]["args"] == {"city": "mock"}, (name, m.tool_calls)
    done = with_tools.invoke([ask, m, ToolMessage("sunny", tool_call_id=m.tool_calls[0]["id"])])
    assert done.text.startswith("The mock provider"), (name, done)
    print(f"OK {name}")

# The same question again and again: the fifth is refused (400 loop_detected), at once.
llm = ChatOpenAI(model="mock", base_url=base_url + "/v1", api_key=key, max_retries=2)
started = time.monotonic()
refused = None
for _ in range(5):
    try:
        llm.invoke("are we there yet?")
    except openai.BadRequestError as err:
        refused = err
assert refused is not None and refused.code == "loop_detected", refused
assert time.monotonic() - started < 20
print("OK loop")
print("ALL OK")
