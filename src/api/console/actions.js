// Admin actions: evict, reload one model, reload pool.toml, load from a form. Each shows the
// daemon's answer (every model's outcome, or the error with its diagnostics) as text.

import { call } from "./util.js";

function show(lines, isError) {
  const out = document.getElementById("outcome");
  out.className = isError ? "error" : "";
  out.textContent = lines.join("\n");
}

async function run(label, method, path, body) {
  show([`${label}…`], false);
  try {
    const answer = await call(method, path, body);
    const lines = (answer?.models ?? []).map(
      (o) => `${o.name}: ${o.action}${o.error ? ` (${o.error})` : ""}`,
    );
    show([`${label}: done`, ...lines], lines.some((l) => l.includes(": failed")));
  } catch (err) {
    show([`${label}: refused (${err.status ?? "network"})`, err.message], true);
  }
}

const model = (name) => `/admin/models/${encodeURIComponent(name)}`;

/** Evicts a model, draining its requests (or aborting them). */
export function evict(name, abort) {
  const mode = abort ? "abort" : "drain";
  return run(`evict ${name} (${mode})`, "POST", `${model(name)}/evict?mode=${mode}`);
}

/** Reloads a model. */
export function reload(name) {
  return run(`reload ${name}`, "POST", `${model(name)}/reload`);
}

/** Wires the pool reload button and the load form. */
export function initActions() {
  document.getElementById("reload-pool").addEventListener("click", () => {
    run("reload pool.toml", "POST", "/admin/reload");
  });
  document.getElementById("load-form").addEventListener("submit", (event) => {
    event.preventDefault();
    let entry;
    try {
      entry = entryOf(new FormData(event.target));
    } catch (err) {
      show(["load: the form is not valid", err.message], true);
      return;
    }
    run(`load ${entry.name}`, "POST", "/admin/models", entry);
  });
}

/** A `[[models]]` entry from the load form; empty fields are left to the daemon's defaults. */
function entryOf(form) {
  const extra = form.get("extra").trim();
  const entry = extra ? JSON.parse(extra) : {};
  if (typeof entry !== "object" || Array.isArray(entry) || entry === null) {
    throw new Error("more fields must be a JSON object");
  }
  entry.name = form.get("name");
  entry.source = form.get("source");
  const devices = form
    .get("devices")
    .split(",")
    .map((d) => d.trim())
    .filter(Boolean);
  if (devices.length) entry.devices = devices;
  entry.dtype = form.get("dtype");
  const max = form.get("max_concurrent");
  if (max) entry.max_concurrent = Number(max);
  const keepAlive = form.get("keep_alive").trim();
  if (keepAlive) entry.keep_alive = keepAlive;
  entry.preload = form.get("preload") === "on";
  return entry;
}
