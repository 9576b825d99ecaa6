// The playground: a chat with one model, streamed token by token over
// /v1/chat/completions (or a plain continuation of the text over /v1/completions, for models
// without a chat template), with time to first token and tokens/s of each answer and a stop
// button that cancels the request.

import { el, headers, readEvents } from "./util.js";

const history = [];
let running = null;

/** Keeps the model picker in step with the listing, keeping the current choice. */
export function updateModels(models) {
  const select = document.getElementById("chat-model");
  const names = models.map((m) => m.name);
  const current = [...select.options].map((o) => o.value);
  if (names.join("\n") === current.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(
    ...names.map((name) => {
      const option = el("option", name);
      option.value = name;
      return option;
    }),
  );
  if (names.includes(chosen)) select.value = chosen;
}

/** Wires the chat form, the stop and the clear buttons. */
export function initPlayground() {
  const form = document.getElementById("chat-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!running) send(new FormData(form));
  });
  document.getElementById("chat-stop").addEventListener("click", () => running?.abort());
  document.getElementById("chat-clear").addEventListener("click", () => {
    history.length = 0;
    document.getElementById("transcript").replaceChildren();
    document.getElementById("chat-stats").textContent = "";
  });
}

function turn(role, text) {
  const node = el("div", null, `turn turn-${role}`);
  const body = el("span", text, "text");
  node.append(el("span", role, "role"), body);
  document.getElementById("transcript").append(node);
  return body;
}

function request(form, raw) {
  const body = {
    model: form.get("model"),
    stream: true,
    stream_options: { include_usage: true },
  };
  if (raw) {
    body.prompt = form.get("message");
  } else {
    body.messages = [];
    const system = form.get("system").trim();
    if (system) body.messages.push({ role: "system", content: system });
    body.messages.push(...history);
  }
  for (const field of ["temperature", "top_p", "max_tokens", "seed"]) {
    const value = form.get(field);
    if (value !== "" && value !== null) body[field] = Number(value);
  }
  const stop = form
    .get("stop")
    .split("\n")
    .filter((s) => s.length);
  if (stop.length) body.stop = stop;
  return body;
}

async function send(form) {
  const message = form.get("message");
  const raw = form.get("raw") === "on";
  if (!raw) history.push({ role: "user", content: message });
  turn(raw ? "prompt" : "user", message);
  document.getElementById("chat-input").value = "";
  const answer = turn(raw ? "completion" : "assistant", "");
  const stats = document.getElementById("chat-stats");
  const stopButton = document.getElementById("chat-stop");
  stats.className = "muted";
  stats.textContent = "waiting for the first token…";
  running = new AbortController();
  stopButton.disabled = false;
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let finish = null;
  let text = "";
  try {
    const response = await fetch(raw ? "/v1/completions" : "/v1/chat/completions", {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify(request(form, raw)),
      signal: running.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => null);
      throw new Error(error?.error?.message ?? `${response.status}`);
    }
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const choice = event.choices?.[0];
      if (!choice) return;
      const piece = (raw ? choice.text : choice.delta?.content) ?? "";
      if (piece) {
        first ??= performance.now();
        chunks += 1;
        text += piece;
        answer.textContent = text;
      }
      finish = choice.finish_reason ?? finish;
    });
    if (!raw) history.push({ role: "assistant", content: text });
    stats.textContent = summary(started, first, usage?.completion_tokens ?? chunks, finish);
  } catch (err) {
    if (!raw) history.pop();
    const stopped = err.name === "AbortError";
    stats.textContent = stopped
      ? `stopped · ${summary(started, first, chunks, "cancelled")}`
      : `error: ${err.message}`;
    stats.className = stopped ? "muted" : "error";
  } finally {
    running = null;
    stopButton.disabled = true;
  }
}

function summary(started, first, tokens, finish) {
  const end = performance.now();
  if (first === null) return `no tokens · finish: ${finish ?? "none"}`;
  const ttft = first - started;
  const rate = tokens > 1 ? ((tokens - 1) * 1000) / Math.max(end - first, 1) : 0;
  return `time to first token ${ttft.toFixed(0)} ms · ${rate.toFixed(1)} tokens/s · ${tokens} tokens · finish: ${finish ?? "none"}`;
}
