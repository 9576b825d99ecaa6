// The pool: devices and replicas from /admin/events, updated in place as the listing changes.

import { bytes, el } from "./util.js";
import { evict, reload } from "./actions.js";

/** Renders one listing (`{"models": [...], "devices": [...]}`). */
export function renderPool(listing) {
  renderDevices(listing.devices ?? []);
  renderReplicas(listing.models ?? []);
}

function renderDevices(devices) {
  const rows = devices.map((d) =>
    row(`device:${d.device}`, d, () => [
      el("td", d.device),
      el("td", d.replicas, "num"),
      el("td", bytes(d.memory_bytes), "num"),
      el("td", bytes(d.memory_reserved_bytes), "num"),
      el("td", d.memory_budget_bytes == null ? "none" : bytes(d.memory_budget_bytes), "num"),
    ]),
  );
  place(document.querySelector("#devices tbody"), rows);
}

function renderReplicas(models) {
  const rows = [];
  for (const model of models) {
    const replicas = model.replicas.length ? model.replicas : [null];
    replicas.forEach((replica, index) => {
      const id = replica ? `replica:${replica.replica}` : `model:${model.name}`;
      const data = { model, replica, first: index === 0 };
      rows.push(row(id, data, () => replicaCells(model, replica, index === 0)));
    });
  }
  place(document.querySelector("#replicas tbody"), rows);
}

function replicaCells(model, replica, first) {
  const cells = [el("td", model.name, "model-name")];
  if (!replica) {
    cells.push(el("td", ""), el("td", ""), el("td", model.state, `state state-${model.state}`));
    for (let i = 0; i < 8; i += 1) cells.push(el("td", ""));
  } else {
    const b = replica.batching;
    const kv = b && b.kv_blocks_total ? `${((100 * b.kv_blocks_used) / b.kv_blocks_total).toFixed(1)}%` : "";
    cells.push(
      el("td", replica.node ? `${replica.replica} (node ${replica.node})` : replica.replica),
      el("td", replica.device),
      stateCell(replica),
      el("td", replica.generation, "num"),
      el("td", replica.in_flight, "num"),
      el("td", first ? model.queued : "", "num"),
      el("td", b ? `${b.running}/${b.max_sequences}` : "", "num"),
      el("td", kv, "num"),
      el("td", replica.restarts, "num"),
      el("td", bytes(replica.device_memory_bytes ?? replica.memory_bytes), "num"),
      el("td", replica.last_error ?? "", "error"),
    );
  }
  const actions = el("td", null, "actions");
  if (first) {
    actions.append(
      button("Reload", "reload", () => reload(model.name)),
      button("Evict", "evict", () => evict(model.name, false)),
      button("Abort", "abort", () => evict(model.name, true)),
    );
  }
  cells.push(actions);
  return cells;
}

function stateCell(replica) {
  const name = replica.standby ? `${replica.state} (standby)` : replica.state;
  const cell = el("td", name, `state state-${replica.state}`);
  const progress = replica.load_progress;
  if (progress) {
    const downloading = progress.bytes_total === 0 && progress.download_bytes_total > 0;
    const [done, total] = downloading
      ? [progress.bytes_downloaded, progress.download_bytes_total]
      : [progress.bytes_read, progress.bytes_total];
    if (total > 0) {
      const bar = document.createElement("progress");
      bar.max = total;
      bar.value = done;
      bar.title = `${bytes(done)} of ${bytes(total)}`;
      const percent = Math.floor((100 * done) / total);
      cell.append(" ", bar, ` ${downloading ? "downloading " : ""}${percent}%`);
    }
  }
  return cell;
}

function button(label, action, onClick) {
  const b = el("button", label);
  b.type = "button";
  b.dataset.action = action;
  b.addEventListener("click", onClick);
  return b;
}

/** A table row keyed by `id`, rebuilt only when its data changed. */
function row(id, data, cells) {
  const signature = JSON.stringify(data);
  let tr = document.getElementById(id);
  if (!tr) {
    tr = document.createElement("tr");
    tr.id = id;
  }
  if (tr.dataset.signature !== signature) {
    tr.dataset.signature = signature;
    tr.replaceChildren(...cells());
  }
  return tr;
}

/** Puts `rows` into `body` in order and drops the rows no longer listed. */
function place(body, rows) {
  const keep = new Set(rows);
  for (const old of [...body.children]) if (!keep.has(old)) old.remove();
  rows.forEach((tr, index) => {
    if (body.children[index] !== tr) body.insertBefore(tr, body.children[index] ?? null);
  });
}
