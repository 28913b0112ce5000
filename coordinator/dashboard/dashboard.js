// pairfarm dashboard: polls the coordinator's GET /api/v1/stats (FarmStats, see
// pairfarm/protocol.py) and renders it. No dependencies; text goes in via textContent only.
// Each key figure is an element with a stable id whose data-value holds the raw number.
"use strict";

const STATS_URL = "api/v1/stats";
const POLL_MS = 5000;
const BATCH_STATES = ["pending", "leased", "downloaded", "postprocessing", "done", "failed"];

const $ = (id) => document.getElementById(id);

function fmtInt(n) {
  return Number(n).toLocaleString("en-US");
}

function fmtPct(p) {
  return `${Number(p).toFixed(1)} %`;
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "\u2013";
  s = Math.round(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m > 0) return `${m}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

function fmtBytes(b) {
  const units = ["B", "KB", "MB", "GB", "TB", "PB"];
  let i = 0;
  while (b >= 1000 && i < units.length - 1) { b /= 1000; i += 1; }
  return `${i === 0 ? b : b.toFixed(1)} ${units[i]}`;
}

function fmtRate(r) {
  if (r === null || r === undefined) return "\u2013";
  return `${r >= 10 ? r.toFixed(0) : r.toFixed(2)}/s`;
}

// One figure: its text, and the raw value for scripts and tests.
function setFigure(id, value, text) {
  const el = $(id);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fillTable(id, rows, columns, emptyText) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = body.insertRow();
    const td = cell(tr, emptyText, "empty");
    td.colSpan = columns;
    return;
  }
  for (const values of rows) {
    const tr = body.insertRow();
    values.forEach(([text, cls]) => cell(tr, text, cls));
  }
}

function renderProgress(s) {
  const done = s.candidates_total - s.candidates_pending;
  setFigure("progress-pct", s.progress_pct, fmtPct(s.progress_pct));
  setFigure("candidates-total", s.candidates_total, fmtInt(s.candidates_total));
  setFigure("candidates-done", done, fmtInt(done));
  setFigure("candidates-pending", s.candidates_pending, fmtInt(s.candidates_pending));
  setFigure("download-rate", s.download_rate_per_s, fmtRate(s.download_rate_per_s));
  setFigure("eta", s.eta_s, s.candidates_pending === 0 ? "done" : fmtDuration(s.eta_s));
  setFigure("bytes-downloaded", s.bytes_downloaded, fmtBytes(s.bytes_downloaded));
  $("progress-fill").style.width = `${Math.min(100, s.progress_pct)}%`;
  $("progress-bar").setAttribute("aria-valuenow", s.progress_pct.toFixed(1));
}

function renderBatches(s) {
  const rows = BATCH_STATES.map((state) => {
    const n = s.batches[state] || 0;
    const c = s.candidates_by_status[state] || 0;
    return [[state], [fmtInt(n), "num"], [fmtInt(c), "num"]];
  });
  rows.unshift([["unbatched"], ["\u2013", "num"], [fmtInt(s.candidates_unbatched), "num"]]);
  fillTable("batches-table", rows, 3, "");
  const body = $("batches-table").tBodies[0];
  [...body.rows].forEach((tr, i) => {
    tr.dataset.state = i === 0 ? "unbatched" : BATCH_STATES[i - 1];
  });
}

function renderOutcomes(s) {
  const entries = Object.entries(s.outcomes).sort((a, b) => b[1] - a[1]);
  const total = entries.reduce((sum, [, n]) => sum + n, 0);
  const rows = entries.map(([name, n]) => [[name], [fmtInt(n), "num"],
    [fmtPct(total ? (100 * n) / total : 0), "num"]]);
  fillTable("outcomes-table", rows, 3, "no completed batch yet");
  const body = $("outcomes-table").tBodies[0];
  entries.forEach(([name, n], i) => {
    body.rows[i].dataset.outcome = name;
    body.rows[i].dataset.value = String(n);
  });
}

function renderPostprocess(s) {
  const total = s.postprocess_batches_total;
  const done = s.postprocess_batches_done;
  setFigure("postprocess-done", done, fmtInt(done));
  setFigure("postprocess-total", total, fmtInt(total));
  setFigure("kept", s.kept, fmtInt(s.kept));
  setFigure("dropped", s.dropped, fmtInt(s.dropped));
  setFigure("kept-ratio", s.kept_ratio,
    s.kept_ratio === null ? "\u2013" : fmtPct(100 * s.kept_ratio));
  $("postprocess-fill").style.width = `${total ? (100 * done) / total : 0}%`;
}

function renderWorkers(s) {
  setFigure("workers-alive", s.workers_alive, fmtInt(s.workers_alive));
  const rows = s.workers.map((w) => [
    [w.name], [w.role], [`${fmtDuration(w.last_seen_s)} ago`, "num"],
    [fmtRate(w.rate_per_s), "num"],
    [w.batches.length ? w.batches.join(", ") : "\u2013"],
    [w.role === "worker" ? fmtInt(w.downloaded) : "\u2013", "num"],
  ]);
  fillTable("workers-table", rows, 6, "no worker seen recently");
  const body = $("workers-table").tBodies[0];
  s.workers.forEach((w, i) => {
    body.rows[i].dataset.worker = w.name;
    if (w.quarantined_until) {
      body.rows[i].dataset.quarantinedUntil = w.quarantined_until;
      body.rows[i].classList.add("quarantined");
    }
  });
}

// Workers the coordinator refuses leases to (their batches kept failing): who, until
// when (with the time left by the coordinator's clock) and why.
function renderQuarantine(s) {
  const now = s.generated_at ? Date.parse(s.generated_at) : Date.now();
  const held = s.workers.filter((w) => w.quarantined_until);
  setFigure("workers-quarantined", held.length, fmtInt(held.length));
  const rows = held.map((w) => {
    const until = Date.parse(w.quarantined_until);
    return [[w.name], [new Date(until).toLocaleString()],
      [fmtDuration(Math.max(0, (until - now) / 1000)), "num"], [w.quarantine_reason || ""]];
  });
  fillTable("quarantine-table", rows, 4, "no worker quarantined");
  const body = $("quarantine-table").tBodies[0];
  held.forEach((w, i) => {
    body.rows[i].dataset.quarantine = w.name;
    body.rows[i].dataset.until = w.quarantined_until;
  });
}

// A canvas sized to its box at the device's pixel ratio; returns its 2D context.
function prepareCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  const height = Number(canvas.getAttribute("height")) || 200;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx, width, height };
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((m) => m * p).find((m) => m >= v);
}

// Bars of `series` (arrays of equal length, drawn over each other) with x labels.
function drawBars(canvas, series, colors, labelAt) {
  const { ctx, width, height } = prepareCanvas(canvas);
  const left = 48, right = 8, top = 8, bottom = 20;
  const plotW = width - left - right, plotH = height - top - bottom;
  const n = series[0].length;
  const max = niceMax(Math.max(0, ...series.flat()));
  ctx.strokeStyle = "#dde1e8";
  ctx.fillStyle = "#6b7385";
  ctx.textAlign = "right";
  for (let i = 0; i <= 4; i += 1) {
    const y = top + plotH - (plotH * i) / 4;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(width - right, y); ctx.stroke();
    const tick = (max * i) / 4;
    ctx.fillText(tick.toLocaleString("en-US", { maximumFractionDigits: 1 }), left - 4, y + 4);
  }
  const step = n ? plotW / n : plotW;
  series.forEach((values, k) => {
    ctx.fillStyle = colors[k];
    values.forEach((v, i) => {
      const h = (plotH * v) / max;
      ctx.fillRect(left + i * step + 1, top + plotH - h, Math.max(1, step - 2), h);
    });
  });
  ctx.fillStyle = "#6b7385";
  ctx.textAlign = "center";
  for (let i = 0; i < n; i += 1) {
    const label = labelAt(i);
    if (label) ctx.fillText(label, left + i * step + step / 2, height - 5);
  }
}

function renderThroughput(s) {
  const points = s.throughput;
  const all = points.map((p) => p.candidates), ok = points.map((p) => p.ok);
  const total = all.reduce((a, b) => a + b, 0);
  $("throughput-total").textContent = `${fmtInt(total)} candidates in the last hour`;
  $("throughput-chart").dataset.total = String(total);
  if (points.length === 0) return;
  drawBars($("throughput-chart"), [all, ok], ["#a9c2f0", "#1f9d6b"], (i) => {
    if (i % 10 !== points.length % 10 && i !== points.length - 1) return "";
    const t = new Date(points[i].start);
    return `${String(t.getHours()).padStart(2, "0")}:${String(t.getMinutes()).padStart(2, "0")}`;
  });
}

function renderSimilarity(s) {
  const { edges, counts } = s.similarity;
  const total = counts.reduce((a, b) => a + b, 0);
  $("similarity-chart").dataset.total = String(total);
  $("similarity-total").textContent = counts.length
    ? `${fmtInt(total)} samples scored` : "no post-processing report yet";
  if (counts.length === 0) {
    prepareCanvas($("similarity-chart"));
    return;
  }
  const every = Math.max(1, Math.round(counts.length / 8));
  drawBars($("similarity-chart"), [counts], ["#2f6fde"],
    (i) => (i % every === 0 ? edges[i].toFixed(2) : ""));
}

function render(s) {
  renderProgress(s);
  renderBatches(s);
  renderOutcomes(s);
  renderPostprocess(s);
  renderWorkers(s);
  renderQuarantine(s);
  renderThroughput(s);
  renderSimilarity(s);
  const at = s.generated_at ? new Date(s.generated_at) : new Date();
  $("updated").textContent = `updated ${at.toLocaleTimeString()}`;
}

function setConnection(ok, text) {
  const el = $("connection");
  el.className = `connection ${ok ? "ok" : "error"}`;
  el.textContent = text;
}

async function refresh() {
  try {
    const response = await fetch(STATS_URL, { cache: "no-store" });
    if (!response.ok) throw new Error(`${STATS_URL}: HTTP ${response.status}`);
    render(await response.json());
    setConnection(true, "live");
    document.body.dataset.loaded = "1";
  } catch (err) {
    setConnection(false, `no answer: ${err.message}`);
  } finally {
    window.setTimeout(refresh, POLL_MS);
  }
}

refresh();
