// The console's entry: asks for the admin key where the daemon wants one, then follows
// /admin/events (the pool listing, pushed on every change) and starts the playground and
// the charts.

import { ApiError, call, headers, key, readEvents, setKey } from "./util.js";
import { renderPool } from "./pool.js";
import { initActions } from "./actions.js";
import { initPlayground, updateModels } from "./playground.js";
import { startCharts } from "./charts.js";

const status = (text) => {
  document.getElementById("status").textContent = text;
};

function showKeyPrompt(message) {
  document.getElementById("console").hidden = true;
  document.getElementById("key-prompt").hidden = false;
  document.getElementById("key-error").textContent = message ?? "";
  document.getElementById("forget-key").hidden = !key();
  status("locked");
}

function onListing(listing) {
  if (listing.error) {
    status(`error: ${listing.error.message}`);
    return;
  }
  renderPool(listing);
  updateModels(listing.models ?? []);
  status(`live · ${(listing.models ?? []).length} models`);
}

async function follow() {
  for (;;) {
    try {
      const response = await fetch("/admin/events", { headers: headers(false) });
      if (response.status === 401 || response.status === 403) {
        const body = await response.json().catch(() => null);
        showKeyPrompt(body?.error?.message);
        return;
      }
      await readEvents(response, (data) => onListing(JSON.parse(data)));
      status("disconnected; retrying…");
    } catch (err) {
      status(`disconnected (${err.message}); retrying…`);
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

let started = false;

async function open() {
  try {
    onListing(await call("GET", "/admin/models"));
  } catch (err) {
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
      showKeyPrompt(key() ? `the key was refused: ${err.message}` : err.message);
      return;
    }
    status(`error: ${err.message}`);
    return;
  }
  document.getElementById("key-prompt").hidden = true;
  document.getElementById("console").hidden = false;
  document.getElementById("forget-key").hidden = !key();
  if (!started) {
    started = true;
    initActions();
    initPlayground();
    startCharts();
    follow();
  }
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setKey(document.getElementById("key-input").value);
  document.getElementById("key-input").value = "";
  open();
});
document.getElementById("forget-key").addEventListener("click", () => {
  setKey(null);
  location.reload();
});
open();
