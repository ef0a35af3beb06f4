"""openai-agents, unchanged, through tollgate: an agent with a function tool on the Responses
API and on Chat Completions, and an agent whose model loops on its tool, which must stop at
the gateway's refusal instead of stalling. Usage: python openai_agents_client.py BASE_URL KEY"""
import sys, time
import openai
from agents import (Agent, Runner, function_tool, set_default_openai_client, set_tracing_disabled,
                    OpenAIChatCompletionsModel, OpenAIResponsesModel)

base_url, key = sys.argv[1], sys.argv[2]
client = openai.AsyncOpenAI(base_url=base_url, api_key=key)
set_default_openai_client(client, use_for_tracing=False)
set_tracing_disabled(True)
calls = []

@function_tool
def get_weather(city: str) -> str:
    """Weather for a city."""
    calls.append(city)
    return "sunny"

for name, model in [("responses", OpenAIResponsesModel("mock", client)),
                    ("chat", OpenAIChatCompletionsModel("mock", client))]:
    agent = Agent(name="weather", instructions="Answer briefly.", tools=[get_weather], model=model)
    before = len(calls)
    result = Runner.run_sync(agent, "Use get_weather for Paris.")
    assert len(calls) == before + 1, (name, calls)
    assert result.final_output.startswith("The mock provider"), (name, result.final_output)
    print(f"OK {name}")

# A model that calls the same tool with the same arguments forever: the gateway refuses the
# third repeat with a 400 loop_detected, which the SDK does not retry; the run ends at once.
for name, model in [("responses", OpenAIResponsesModel("gpt-loop", client)),
                    ("chat", OpenAIChatCompletionsModel("gpt-loop", client))]:
    agent = Agent(name="looper", tools=[get_weather], model=model)
    started = time.monotonic()
    try:
        Runner.run_sync(agent, "Use get_weather for Rome.", max_turns=50)
        raise AssertionError("the loop must be refused")
    except openai.BadRequestError as err:
        assert err.code == "loop_detected", err
    assert time.monotonic() - started < 30, "no stall behind retries"
    print(f"OK loop {name}")

# Streaming run on Responses, last and with its own client: an async client belongs to one
# event loop, and run_sync keeps its own.
async def streamed():
    own = openai.AsyncOpenAI(base_url=base_url, api_key=key)
    agent = Agent(name="weather", instructions="Answer briefly.", tools=[get_weather],
                  model=OpenAIResponsesModel("mock", own))
    r = Runner.run_streamed(agent, "Use get_weather for Oslo.")
    async for _ in r.stream_events():
        pass
    return r.final_output
import asyncio
out = asyncio.run(streamed())
assert out.startswith("The mock provider"), out
print("OK streamed")

print("ALL OK")
