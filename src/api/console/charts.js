// Charts of the last five minutes per model, from the daemon's own Prometheus counters
// (/metrics, read every two seconds): generated tokens/s, mean time to first token, and the
// queue depth; drawn as SVG polylines.

import { el, headers } from "./util.js";

const PERIOD_MS = 2000;
const POINTS = 150;
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"];
const SVG = "http://www.w3.org/2000/svg";

const series = { tokens: new Map(), ttft: new Map(), queue: new Map() };
let previous = null;

/** Parses Prometheus text into `name -> [{labels, value}]`. */
export function parseMetrics(text) {
  const out = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[3] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[pair[1]] = pair[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    if (!out.has(match[1])) out.set(match[1], []);
    out.get(match[1]).push({ labels, value: Number(match[4]) });
  }
  return out;
}

function byModel(metrics, name) {
  const values = new Map();
  for (const sample of metrics.get(name) ?? []) {
    const model = sample.labels.model;
    if (model !== undefined) values.set(model, (values.get(model) ?? 0) + sample.value);
  }
  return values;
}

function push(map, model, value) {
  if (!map.has(model)) map.set(model, []);
  const points = map.get(model);
  points.push(value);
  if (points.length > POINTS) points.shift();
}

function sample(metrics, now) {
  const current = {
    time: now,
    tokens: byModel(metrics, "llorch_generated_tokens_total"),
    ttftSum: byModel(metrics, "llorch_time_to_first_token_seconds_sum"),
    ttftCount: byModel(metrics, "llorch_time_to_first_token_seconds_count"),
    queue: byModel(metrics, "llorch_queue_depth"),
  };
  if (previous) {
    const seconds = (now - previous.time) / 1000;
    const models = new Set([...current.tokens.keys(), ...current.queue.keys()]);
    for (const model of models) {
      const delta = (a, b) => Math.max((a.get(model) ?? 0) - (b.get(model) ?? 0), 0);
      push(series.tokens, model, delta(current.tokens, previous.tokens) / seconds);
      const count = delta(current.ttftCount, previous.ttftCount);
      push(series.ttft, model, count ? delta(current.ttftSum, previous.ttftSum) / count : null);
      push(series.queue, model, current.queue.get(model) ?? 0);
    }
  }
  previous = current;
}

function svg(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function draw(id, map, colors) {
  const chart = document.getElementById(id);
  const [width, height, left, bottom] = [1000, 160, 44, 16];
  let max = 0;
  for (const points of map.values()) for (const v of points) if (v !== null) max = Math.max(max, v);
  max = max > 0 ? max * 1.1 : 1;
  const children = [
    svg("line", { x1: left, y1: 4, x2: left, y2: height - bottom, class: "axis" }),
    svg("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom, class: "axis" }),
  ];
  const label = (x, y, text) => {
    const t = svg("text", { x, y });
    t.textContent = text;
    return t;
  };
  children.push(label(2, 14, max.toPrecision(3)), label(2, height - bottom, "0"));
  children.push(label(left, height - 2, "−5 min"), label(width - 30, height - 2, "now"));
  const step = (width - left) / (POINTS - 1);
  for (const [model, points] of map) {
    const offset = POINTS - points.length;
    const coords = [];
    points.forEach((v, i) => {
      if (v === null) return;
      const x = left + (offset + i) * step;
      const y = height - bottom - (v / max) * (height - bottom - 8);
      coords.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    });
    if (coords.length) {
      children.push(svg("polyline", { points: coords.join(" "), stroke: colors.get(model) }));
    }
  }
  chart.replaceChildren(...children);
}

function render() {
  const models = [...new Set([...series.tokens.keys(), ...series.queue.keys()])].sort();
  const colors = new Map(models.map((m, i) => [m, COLORS[i % COLORS.length]]));
  draw("chart-tokens", series.tokens, colors);
  draw("chart-ttft", series.ttft, colors);
  draw("chart-queue", series.queue, colors);
  document.getElementById("legend").replaceChildren(
    ...models.map((model) => {
      const item = el("li");
      const swatch = svg("svg", { width: 12, height: 12, class: "swatch" });
      swatch.append(svg("rect", { width: 12, height: 12, fill: colors.get(model) }));
      item.append(swatch, document.createTextNode(model));
      return item;
    }),
  );
}

/** Reads /metrics every two seconds and redraws; a refusal is shown once in the note. */
export function startCharts() {
  const note = document.getElementById("charts-note");
  const tick = async () => {
    try {
      const response = await fetch("/metrics", { headers: headers(false) });
      if (!response.ok) {
        note.textContent = `the metrics are not readable with this key (${response.status})`;
        return;
      }
      note.textContent = "";
      sample(parseMetrics(await response.text()), performance.now());
      render();
    } catch (err) {
      note.textContent = `metrics: ${err.message}`;
    }
  };
  tick();
  return setInterval(tick, PERIOD_MS);
}
