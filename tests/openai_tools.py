"""Tool calls through the official `openai` client: `tool_choice="required"` gives calls whose
arguments validate against their function's schema (`jsonschema`), streamed and not; `parse`
with a pydantic function tool fills `parsed_arguments`; a conversation that sends the call and
its `tool` result back is answered.

Usage: openai_tools.py BASE_URL MODEL
"""

import json
import sys

import jsonschema
import openai
from pydantic import BaseModel, Field

BASE, MODEL = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 7}, "maxItems": 3},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
LOOKUP = {
    "type": "object",
    "properties": {"query": {"type": "string", "maxLength": 20}, "exact": {"type": "boolean"}},
    "required": ["query", "exact"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "lookup": LOOKUP}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"the {name} function", "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
ASK = [{"role": "user", "content": "Will it rain in Oslo this week?"}]
# One call per answer: a random model rarely ends after a call on its own when another may
# follow (tests/tools.rs covers parallel calls).


def check(ok, what):
    if not ok:
        raise SystemExit(what)


def check_calls(calls, what):
    check(calls, f"{what}: no tool calls")
    for call in calls:
        check(call.type == "function" and call.id.startswith("call_"), f"{what}: {call}")
        schema = SCHEMAS.get(call.function.name)
        check(schema is not None, f"{what}: unknown function {call.function.name}")
        jsonschema.validate(json.loads(call.function.arguments), schema)


def main():
    for seed in range(20):
        reply = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=seed, max_tokens=800
        )
        choice = reply.choices[0]
        check(choice.finish_reason == "tool_calls", f"seed {seed}: {choice}")
        check_calls(choice.message.tool_calls, f"seed {seed}")

    for seed in range(10):
        with client.chat.completions.stream(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=seed, max_tokens=800
        ) as stream:
            final = stream.get_final_completion()
        choice = final.choices[0]
        check(choice.finish_reason == "tool_calls", f"streamed seed {seed}: {choice}")
        check_calls(choice.message.tool_calls, f"streamed seed {seed}")

    class Forecast(BaseModel):
        city: str = Field(max_length=12)
        days: int = Field(ge=1, le=7)

    parsed = client.chat.completions.parse(
        model=MODEL,
        messages=ASK,
        tools=[openai.pydantic_function_tool(Forecast)],
        tool_choice={"type": "function", "function": {"name": "Forecast"}},
        parallel_tool_calls=False,
        seed=1,
        max_tokens=800,
    )
    calls = parsed.choices[0].message.tool_calls
    check(len(calls) == 1, f"parse: {calls}")
    check(isinstance(calls[0].function.parsed_arguments, Forecast), f"parse: {calls[0]}")

    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=2, max_tokens=800
    )
    message = first.choices[0].message
    conversation = ASK + [message.model_dump(exclude_none=True)]
    for call in message.tool_calls:
        conversation.append({"role": "tool", "tool_call_id": call.id, "content": "rain on Tuesday"})
    answer = client.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS, max_tokens=8)
    check(answer.choices[0].finish_reason in ("stop", "length", "tool_calls"), f"round trip: {answer}")
    check(answer.usage.prompt_tokens > first.usage.prompt_tokens, f"round trip: {answer.usage}")
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8)
    check(plain.choices[0].message.tool_calls is None, f"tool_choice none: {plain}")
    check(plain.usage.prompt_tokens < first.usage.prompt_tokens, f"tool_choice none: {plain.usage}")
    print("all checks passed")


main()
