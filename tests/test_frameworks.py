"""Agent frameworks against the live server, unchanged: only `base_url`, `api_key` and the model name.

The OpenAI Agents SDK (its default Responses model and its Chat Completions model), pydantic-ai and LangGraph/LangChain
(`ChatOpenAI`: tools, structured output, the Responses API) drive Qwen2.5-Coder-0.5B, greedy. What is asserted
is the protocol: tools are called through each framework's own tool-calling path with arguments parsed from the
model's calls, a multi-step loop reaches a final answer, `previous_response_id` continues from the cached
state, and structured output comes back as a validated object. What a 0.5B model says in between is not.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch
from pydantic import BaseModel

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.server.app import create_app
from deltaserve.server.testing import ServerThread

agents = pytest.importorskip("agents")  # the [test] extra installs them; a plain install may not have them
langchain_openai = pytest.importorskip("langchain_openai")
prebuilt = pytest.importorskip("langgraph.prebuilt")

MODEL = "qwen2.5-coder-0.5b"


class City(BaseModel):
    name: str
    country: str


@pytest.fixture(scope="module")
def base_url(qwen_dir):
    engine = LLMEngine.from_model(str(qwen_dir), EngineConfig(dtype=torch.float32, kv_cache_bytes=256 << 20))
    # the Agents SDK marks every function tool strict: these runs go through the strict-tools grammar
    with ServerThread(create_app(engine, MODEL, enforce_strict_tools=True)) as srv:
        yield srv.base_url + "/v1"


@pytest.fixture(scope="module", autouse=True)
def no_tracing():
    agents.set_tracing_disabled(True)  # the SDK would otherwise export traces to OpenAI


def weather_tools(calls: list):
    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(("get_weather", city))
        return "sunny, 21 C"

    @agents.function_tool
    def get_time(city: str) -> str:
        """Get the local time in a city."""
        calls.append(("get_time", city))
        return "14:05"

    return [get_weather, get_time]


def test_openai_agents_chat_completions_tool_loop(base_url):
    calls: list = []
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
    agent = agents.Agent(name="weather", instructions="Answer with the tools, then reply in one short sentence.",
                         tools=weather_tools(calls),
                         model=agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=80))
    result = asyncio.run(agents.Runner.run(agent, "What is the weather and the local time in Paris?", max_turns=6))
    assert ("get_weather", "Paris") in calls
    assert len(result.raw_responses) >= 2  # a tool round trip, then the model again
    assert isinstance(result.final_output, str)


def test_openai_agents_responses_model_and_previous_response_id(base_url):
    calls: list = []
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
    agent = agents.Agent(name="weather", instructions="You answer weather questions using tools.",
                         tools=weather_tools(calls)[:1], tool_use_behavior="stop_on_first_tool",
                         model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=60))

    async def two_runs():  # one event loop: the client's connections belong to it
        first = await agents.Runner.run(agent, "What is the weather in Paris?", auto_previous_response_id=True)
        second = await agents.Runner.run(agent, "And in Rome?", previous_response_id=first.last_response_id)
        return first, second

    first, second = asyncio.run(two_runs())
    assert calls[0] == ("get_weather", "Paris") and first.final_output == "sunny, 21 C"
    state = first.raw_responses[-1].usage
    assert calls[-1] == ("get_weather", "Rome")
    # the continuation extends the stored state: its prompt is served from the cache up to that state
    cached = second.raw_responses[0].usage.input_tokens_details.cached_tokens
    assert cached >= state.input_tokens + state.output_tokens - 1, (cached, state)


def test_openai_agents_output_type(base_url):
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
    agent = agents.Agent(name="extract", instructions="Extract the city.", output_type=City,
                         model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=60))
    result = asyncio.run(agents.Runner.run(agent, "I flew to Lyon, France last week."))
    assert isinstance(result.final_output, City) and result.final_output.name == "Lyon"


def test_langgraph_react_agent_calls_the_tool(base_url):
    from langchain_core.tools import tool

    calls: list = []

    @tool(return_direct=True)
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return "sunny, 21 C"

    llm = langchain_openai.ChatOpenAI(base_url=base_url, api_key="none", model=MODEL, temperature=0, max_tokens=80)
    graph = prebuilt.create_react_agent(llm, [get_weather])
    out = graph.invoke({"messages": [("user", "What is the weather in Paris?")]}, {"recursion_limit": 6})
    assert calls == ["Paris"]
    assert out["messages"][-1].content == "sunny, 21 C"  # the tool's answer ends the run (return_direct)


def test_langchain_structured_output_and_responses_api(base_url):
    llm = langchain_openai.ChatOpenAI(base_url=base_url, api_key="none", model=MODEL, temperature=0, max_tokens=60)
    city = llm.with_structured_output(City).invoke("I flew to Lyon, France last week.")
    assert isinstance(city, City) and city.name == "Lyon"
    responses = langchain_openai.ChatOpenAI(base_url=base_url, api_key="none", model=MODEL, temperature=0,
                                            max_tokens=30, use_responses_api=True)
    reply = responses.invoke("Say hi.")
    assert reply.text and reply.response_metadata.get("id", "").startswith("resp_")


def test_pydantic_ai_structured_output_over_chat_completions(base_url):
    """pydantic-ai's OpenAI chat model: its structured output is a forced call of its `final_result` tool."""
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=base_url, api_key="none"))
    agent = pydantic_ai.Agent(model, output_type=City, model_settings={"temperature": 0, "max_tokens": 60})
    out = agent.run_sync("I flew to Lyon, France last week.").output
    assert isinstance(out, City) and out.name == "Lyon"
