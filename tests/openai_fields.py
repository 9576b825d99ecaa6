"""Every field of the official `openai` client's chat and completions request types, sent to
the daemon: a field llorch honours is answered 200; a field the README's table lists as
ignored is answered 200; one it lists as refused is answered 400 `unsupported_parameter`
naming the field, and the value the table says is accepted is answered 200. A field the
client's types gain later, with no sample here and no row in the README, fails the run. A
field of no OpenAI schema is ignored (200); one of the other endpoint's is refused.

Usage: openai_fields.py BASE_URL MODEL README
"""

import json
import re
import sys
import typing
import urllib.error
import urllib.request

from openai.types import completion_create_params
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionDeveloperMessageParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
    completion_create_params as chat_create_params,
)

BASE, MODEL, README = sys.argv[1], sys.argv[2], sys.argv[3]

# Fields llorch honours, each with a value that exercises it.
SHARED = {
    "model": MODEL,
    "max_tokens": 3,
    "temperature": 0.5,
    "top_p": 0.9,
    "seed": 7,
    "stop": ["zz"],
    "stream_options": {"include_usage": True},
    "logit_bias": {"5": 1.5},
    "frequency_penalty": 0.5,
    "presence_penalty": -0.5,
}
HONOURED = {
    "chat": dict(
        SHARED,
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=3,
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "json_object"},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="auto",
        parallel_tool_calls=False,
    ),
    "message": {
        "tool_calls": (
            "assistant",
            [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        ),
        "tool_call_id": ("tool", "c1"),
    },
    "completions": dict(SHARED, prompt="hi", logprobs=2, echo=True),
}
# Fields an honoured field needs beside it.
NEEDS = {"top_logprobs": {"logprobs": True}, "tool_choice": {"tools": HONOURED["chat"]["tools"]}}

# Fields honoured up to a limit (the README's field paragraph says so): (refused, accepted).
LIMITED = {
    "chat": {"n": (9, 2)},
    "completions": {"n": (9, 2)},
}

# The README's table fields: a value that asks for the feature, and for refused fields with
# an accepted value, that value.
ASKS = {
    "chat": {
        "audio": {"voice": "alloy", "format": "mp3"},
        "function_call": {"name": "f"},
        "functions": [{"name": "f", "parameters": {"type": "object"}}],
        "metadata": {"team": "a"},
        "modalities": ["text", "audio"],
        "moderation": {"model": "omni-moderation-latest"},
        "prediction": {"type": "content", "content": "hello"},
        "prompt_cache_key": "key-1",
        "prompt_cache_options": {"ttl": "30m"},
        "prompt_cache_retention": "24h",
        "reasoning_effort": "low",
        "safety_identifier": "user-1",
        "service_tier": "flex",
        "store": True,
        "user": "user-1",
        "verbosity": "low",
        "web_search_options": {},
    },
    "completions": {"best_of": 2, "suffix": "!", "user": "user-1"},
    "message": {
        "name": ("user", "bob"),
        "refusal": ("assistant", "I cannot."),
        "function_call": ("assistant", {"name": "f", "arguments": "{}"}),
        "audio": ("assistant", {"id": "audio-1"}),
    },
}
ACCEPTED = {
    "chat": {
        "function_call": "none",
        "functions": [],
        "modalities": ["text"],
    },
    "completions": {"best_of": 1, "suffix": ""},
}


def schema_fields():
    """The request fields of the client's types, per endpoint."""
    chat = set(chat_create_params.CompletionCreateParamsBase.__annotations__)
    completions = set(completion_create_params.CompletionCreateParamsBase.__annotations__)
    message = set()
    for kind in (
        ChatCompletionAssistantMessageParam,
        ChatCompletionDeveloperMessageParam,
        ChatCompletionSystemMessageParam,
        ChatCompletionToolMessageParam,
        ChatCompletionUserMessageParam,
    ):
        message |= set(typing.get_type_hints(kind))
    return {"chat": chat, "completions": completions, "message": message - {"role", "content"}}


def readme_table():
    rows = {}
    with open(README, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^\| (chat|completions|message) \| `(\w+)` \| (ignored|refused) \|", line)
            if m:
                rows[(m.group(1), m.group(2))] = m.group(3)
    return rows


def post(endpoint, body):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    request = urllib.request.Request(
        BASE + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def base(endpoint):
    body = {"model": MODEL, "max_tokens": 2}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    return body


def with_field(endpoint, field, value):
    if endpoint == "message":
        role, value = value
        messages = [{"role": "user", "content": "hi"}, {"role": role, "content": "x", field: value}]
        if role != "user":
            messages.append({"role": "user", "content": "go on"})
        return "chat", dict(base("chat"), messages=messages)
    return endpoint, dict(base(endpoint), **{field: value})


def expect(ok, what, status, body):
    if not ok:
        raise SystemExit(f"{what}: got {status} {json.dumps(body)}")


def main():
    fields = schema_fields()
    table = readme_table()
    readme = open(README, encoding="utf-8").read()
    checked = 0
    for endpoint, names in fields.items():
        for field in sorted(names):
            honoured = HONOURED.get(endpoint, {})
            limited = LIMITED.get(endpoint, {})
            if field in honoured:
                named = re.search(rf"`{field}[`.]", readme) is not None
                expect(named, f"README names honoured {field}", 0, {})
                if field in ("model", "messages", "prompt"):
                    continue
                target, body = with_field(endpoint, field, honoured[field])
                body.update(NEEDS.get(field, {}))
                status, answer = post(target, body)
                expect(status == 200, f"{endpoint}.{field} honoured", status, answer)
            elif field in limited:
                refused, accepted = limited[field]
                status, answer = post(*with_field(endpoint, field, refused))
                expect(
                    status == 400 and answer["error"]["param"] == field,
                    f"{endpoint}.{field}={refused!r} refused",
                    status,
                    answer,
                )
                status, answer = post(*with_field(endpoint, field, accepted))
                expect(status == 200, f"{endpoint}.{field}={accepted!r}", status, answer)
            else:
                treatment = table.get((endpoint, field))
                expect(treatment is not None, f"README row for {endpoint}.{field}", 0, {})
                sample = ASKS.get(endpoint, {}).get(field)
                expect(sample is not None, f"a sample value for {endpoint}.{field}", 0, {})
                status, answer = post(*with_field(endpoint, field, sample))
                if treatment == "ignored":
                    expect(status == 200, f"{endpoint}.{field} ignored", status, answer)
                else:
                    param = f"messages.{field}" if endpoint == "message" else field
                    expect(
                        status == 400
                        and answer["error"]["code"] == "unsupported_parameter"
                        and answer["error"]["param"] == param,
                        f"{endpoint}.{field} refused",
                        status,
                        answer,
                    )
                    if field in ACCEPTED.get(endpoint, {}):
                        value = ACCEPTED[endpoint][field]
                        if endpoint == "message":
                            value = (sample[0], value)
                        status, answer = post(*with_field(endpoint, field, value))
                        expect(status == 200, f"{endpoint}.{field} accepted value", status, answer)
            checked += 1
    # A field of no schema is ignored (RELIABILITY.md); one of the other endpoint's is refused.
    status, answer = post("chat", dict(base("chat"), frobnicate={"type": "object"}))
    expect(status == 200, "unknown field", status, answer)
    status, answer = post("chat", dict(base("chat"), echo=True))
    expect(status == 400 and answer["error"]["param"] == "echo", "a completions field on chat", status, answer)
    status, answer = post("completions", dict(base("completions"), tools=HONOURED["chat"]["tools"]))
    expect(status == 400 and answer["error"]["param"] == "tools", "a chat field on completions", status, answer)
    print(f"{checked} fields checked; all checks passed")


main()
