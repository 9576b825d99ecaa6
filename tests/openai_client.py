"""Drives a running llorch daemon with the official `openai` Python client.

Usage: python3 openai_client.py BASE_URL MODEL
Exits non-zero (with the failing assertion) when anything differs from what a user expects.
"""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)

ids = [m.id for m in client.models.list().data]
assert model in ids, ids

messages = [{"role": "user", "content": "Say hello"}]
chat = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, seed=1
)
assert chat.object == "chat.completion", chat
assert chat.choices[0].message.role == "assistant", chat
assert chat.choices[0].finish_reason in ("stop", "length"), chat
assert chat.usage.completion_tokens >= 1, chat

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, seed=1, stream=True
)
pieces, reasons = [], []
for chunk in stream:
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
assert "".join(pieces) == chat.choices[0].message.content, (pieces, chat)
assert reasons[-1] == chat.choices[0].finish_reason, reasons

completion = client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=8, temperature=0
)
assert completion.object == "text_completion", completion
assert completion.usage.completion_tokens == 8, completion
assert isinstance(completion.choices[0].text, str), completion

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as err:
    assert err.status_code == 404, err
    assert err.body["code"] == "model_not_found", err.body

print("openai client: all checks passed")
