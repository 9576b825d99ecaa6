"""Structured outputs through the official `openai` client against a running daemon serving a
random-weight model: every answer to a `json_schema` request (nested objects, arrays, enums,
required fields, bounds) parses and validates with `jsonschema`, 50 seeds streamed and 50
not; `client.chat.completions.parse` fills a pydantic model; `json_object`, `guided_choice`
and `guided_regex` hold on chat and completions; a schema the grammar engine cannot compile
is a 400 naming `response_format`.

Usage: openai_structured.py BASE_URL MODEL
"""

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import List, Literal

import jsonschema
import openai
from pydantic import BaseModel, Field

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
messages = [{"role": "user", "content": "Describe a person as JSON."}]

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "address", "pets", "role", "active"],
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "address": {
            "type": "object",
            "additionalProperties": False,
            "required": ["city", "zip"],
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
        },
        "pets": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["kind", "legs"],
                "properties": {
                    "kind": {"enum": ["cat", "dog", "bird"]},
                    "legs": {"type": "integer", "minimum": 0, "maximum": 4},
                },
            },
        },
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


def chat(seed, stream):
    kwargs = dict(
        model=model, messages=messages, max_tokens=600, seed=seed, response_format=FORMAT
    )
    if not stream:
        answer = client.chat.completions.create(**kwargs)
        return answer.choices[0].message.content, answer.choices[0].finish_reason
    text, reason = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
    return text, reason


def validated(seed, stream):
    text, reason = chat(seed, stream)
    assert reason == "stop", (seed, stream, reason, text)
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


with ThreadPoolExecutor(8) as pool:
    plain = list(pool.map(lambda s: validated(s, False), range(50)))
    streamed = list(pool.map(lambda s: validated(s, True), range(50)))
# The same seed gives the same output streamed or not; different seeds differ.
assert plain == streamed
assert len({json.dumps(v, sort_keys=True) for v in plain}) > 40


class Pet(BaseModel):
    kind: Literal["cat", "dog", "bird"]
    legs: int = Field(ge=0, le=4)


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=130)
    pets: List[Pet] = Field(max_length=3)


for seed in range(5):
    parsed = client.chat.completions.parse(
        model=model, messages=messages, max_tokens=600, seed=seed, response_format=Person
    )
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person), parsed

# json_object: whatever finishes is a JSON object (a random model may also run to max_tokens,
# which says "length", as OpenAI does).
finished = 0
for seed in range(20):
    answer = client.chat.completions.create(
        model=model, messages=messages, max_tokens=400, seed=seed,
        response_format={"type": "json_object"},
    )
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content), dict), answer
        finished += 1
assert finished >= 10, finished

# Completions take response_format and the vLLM extensions too.
for seed in range(5):
    text = client.completions.create(
        model=model, prompt="JSON:", max_tokens=600, seed=seed,
        extra_body={"response_format": FORMAT},
    ).choices[0].text
    jsonschema.validate(json.loads(text), SCHEMA)
    choice = client.completions.create(
        model=model, prompt="Answer:", max_tokens=20, seed=seed,
        extra_body={"guided_choice": ["yes", "no", "maybe"]},
    ).choices[0].text
    assert choice in ("yes", "no", "maybe"), choice
    code = client.chat.completions.create(
        model=model, messages=messages, max_tokens=20, seed=seed,
        extra_body={"guided_regex": "[A-Z]{3}-[0-9]{4}"},
    ).choices[0].message.content
    assert re.fullmatch("[A-Z]{3}-[0-9]{4}", code), code

try:
    client.chat.completions.create(
        model=model, messages=messages, max_tokens=20,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
    )
    raise AssertionError("a schema that cannot compile was accepted")
except openai.BadRequestError as err:
    assert err.body["param"] == "response_format", err.body
    assert err.body["code"] == "invalid_grammar", err.body

print("structured outputs: all checks passed")
