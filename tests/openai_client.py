"""Drives a running llorch daemon with the official `openai` Python client.

Usage: python3 openai_client.py BASE_URL MODEL SLOW_MODEL
SLOW_MODEL is a model whose streams run past its request deadline after a few tokens.
Exits non-zero (with the failing assertion) when anything differs from what a user expects.
"""

import sys

import openai

base_url, model, slow_model = sys.argv[1], sys.argv[2], sys.argv[3]
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

# Log probabilities as the client parses them: one entry per token, streamed and not, the
# same values either way; the greedy token is the most likely of its alternatives.
chat_lp = client.chat.completions.create(
    model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
)
entries = chat_lp.choices[0].logprobs.content
assert len(entries) == chat_lp.usage.completion_tokens, chat_lp
for entry in entries:
    assert len(entry.top_logprobs) == 3, entry
    assert entry.logprob == entry.top_logprobs[0].logprob <= 0, entry
    assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token, entry
streamed = []
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
    stream=True,
):
    if chunk.choices and chunk.choices[0].logprobs:
        streamed.extend(chunk.choices[0].logprobs.content)
assert [e.logprob for e in streamed] == [e.logprob for e in entries], (streamed, entries)
lp = client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=2
).choices[0].logprobs
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4, lp
assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset), lp
assert all(max(top.values()) == chosen for top, chosen in zip(lp.top_logprobs, lp.token_logprobs)), lp

# n choices: indexed 0..n, each seeded with the request's seed plus its index (so the same
# request streamed gives the same texts), usage counting the prompt once.
several = client.chat.completions.create(
    model=model, messages=messages, max_tokens=10, seed=5, n=3, logprobs=True
)
assert [c.index for c in several.choices] == [0, 1, 2], several
texts = [c.message.content for c in several.choices]
assert len(set(texts)) > 1, texts
assert all(len(c.logprobs.content) >= 1 for c in several.choices), several
single = client.chat.completions.create(model=model, messages=messages, max_tokens=10, seed=5)
assert several.usage.prompt_tokens == single.usage.prompt_tokens, (several.usage, single.usage)
pieces = {}
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=10, seed=5, n=3, stream=True,
    stream_options={"include_usage": True},
):
    for c in chunk.choices:
        pieces[c.index] = pieces.get(c.index, "") + (c.delta.content or "")
    if chunk.usage:
        assert chunk.usage.completion_tokens == several.usage.completion_tokens, chunk.usage
assert [pieces[i] for i in range(3)] == texts, (pieces, texts)
assert texts[0] == single.choices[0].message.content, (texts, single)

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

# An error after the first byte: one `data: {"error":...}` event, which the client raises as
# APIError with our message, after the chunks that came before it.
stream = client.chat.completions.create(
    model=slow_model, messages=messages, max_tokens=1000, stream=True
)
received = 0
try:
    for chunk in stream:
        received += 1
    raise AssertionError("a stream past its deadline ended without an error")
except openai.APIError as err:
    assert not isinstance(err, openai.APIStatusError), err
    assert "request_timeout" in err.message, err.message
    assert err.body["code"] == "deadline_exceeded", err.body
assert received >= 2, received

print("openai client: all checks passed")
