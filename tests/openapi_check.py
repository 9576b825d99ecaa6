"""Checks /openapi.json with the standard validators: the document is valid OpenAPI 3.1
(openapi-spec-validator), and real responses of the daemon validate against the schemas it
gives for them (openapi-schema-validator; unknown fields are refused by the schemas), so the
document cannot drift from what the daemon sends.

Usage: openapi_check.py URL MODEL
Prints the document's "METHOD path" lines, then "all checks passed".
"""

import json
import sys
import time
import urllib.error
import urllib.request

from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

URL, MODEL = sys.argv[1], sys.argv[2]


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        URL + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get("content-type", ""), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read().decode()


def events(text):
    out = []
    for block in text.split("\n\n"):
        data = "\n".join(l[5:].lstrip() for l in block.split("\n") if l.startswith("data:"))
        if data and data != "[DONE]":
            out.append(json.loads(data))
    return out


status, _, text = call("GET", "/openapi.json")
assert status == 200, (status, text)
doc = json.loads(text)
validate(doc)
assert doc["openapi"].startswith("3.1"), doc["openapi"]
registry = Registry().with_resource("urn:doc", Resource.from_contents(doc, default_specification=DRAFT202012))


def response_schema(method, path, status, content_type):
    """A reference to the schema the document gives a response (its own references then
    resolve within the document)."""
    assert "schema" in doc["paths"][path][method.lower()]["responses"][str(status)]["content"][content_type]
    escape = lambda part: part.replace("~", "~0").replace("/", "~1")
    pointer = "/".join(escape(p) for p in ["paths", path, method.lower(), "responses", str(status), "content", content_type, "schema"])
    return {"$ref": f"urn:doc#/{pointer}"}


def check(method, path, status_expected, body=None, stream=False, template=None):
    status, content_type, text = call(method, path, body)
    assert status == status_expected, (method, path, status, text)
    kind = "text/event-stream" if stream else "application/json"
    assert content_type.startswith(kind), (path, content_type)
    schema = response_schema(method, template or path.split("?")[0], status, kind)
    instances = events(text) if stream else [json.loads(text)]
    assert instances, (path, text)
    for instance in instances:
        errors = list(OAS31Validator(schema, registry=registry).iter_errors(instance))
        assert not errors, (method, path, body, instance, [e.message for e in errors])
    return instances


chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
tool = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}
check("GET", "/health", 200)
check("GET", "/ready", 200)
check("GET", "/v1/models", 200)
check("POST", "/v1/chat/completions", 200, chat)
check("POST", "/v1/chat/completions", 200, {**chat, "logprobs": True, "top_logprobs": 2, "return_token_ids": True, "n": 2})
check("POST", "/v1/chat/completions", 200, {**chat, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True}, stream=True)
called = check("POST", "/v1/chat/completions", 200, {**chat, "max_tokens": 800, "seed": 2, "parallel_tool_calls": False, "tools": [tool], "tool_choice": "required"})
assert called[0]["choices"][0]["message"]["tool_calls"], called
check("POST", "/v1/chat/completions", 200, {**chat, "max_tokens": 800, "seed": 2, "parallel_tool_calls": False, "tools": [tool], "tool_choice": "required", "stream": True}, stream=True)
completion = {"model": MODEL, "prompt": "Once", "max_tokens": 3}
check("POST", "/v1/completions", 200, completion)
check("POST", "/v1/completions", 200, {**completion, "logprobs": 2, "echo": True, "return_token_ids": True})
check("POST", "/v1/completions", 200, {**completion, "stream": True, "stream_options": {"include_usage": True}}, stream=True)
check("POST", "/v1/chat/completions", 404, {**chat, "model": "no-such-model"})
check("POST", "/v1/completions", 400, {**completion, "max_tokens": -1})
check("POST", "/execute", 200, {"job_id": "j", "model": MODEL, "prompt": "Once", "max_tokens": 2}, stream=True)
check("GET", "/admin/models", 200)
check("POST", "/admin/models", 200, {"name": "second", "source": "builtin:demo"})
check("POST", "/admin/models/second/evict?wait=false", 202, {}, template="/admin/models/{name}/evict")
check("POST", "/admin/models/nope/reload", 404, {}, template="/admin/models/{name}/reload")
# The eviction runs on after its 202; a pool reload meanwhile is refused (409), so wait it out.
deadline = time.time() + 60
while "second" in call("GET", "/admin/models")[2] and time.time() < deadline:
    time.sleep(0.1)
check("POST", "/admin/reload", 200, {})

for path, item in sorted(doc["paths"].items()):
    for method in item:
        print(method.upper(), path)
print("all checks passed")
