// herd's dashboard: one server-sent event stream (/api/stream) keeps every table and chart live.
// No framework; charts are uPlot (vendored under static/vendor). Text from the server is only ever
// set as textContent, never parsed as HTML.
"use strict";

window.__herdLoadedAt = Date.now(); // a test checks that updates arrive without a reload

const $ = (sel) => document.querySelector(sel);
const state = { cluster: { workers: [], jobs: [] }, jobId: null, job: null, source: null,
                charts: {}, pinned: false, dirty: new Set() };
// What changed since the last redraw: only those parts are rebuilt (a redraw of every table and
// chart per report cost a browser on the training machine more than the ranks could spare).
const ALL = ["cluster", "summary", "points", "timing", "checkpoints", "log"];
const COLORS = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c); else td.textContent = c === null ? "" : String(c);
    tr.appendChild(td);
  }
  return tr;
}
const gb = (b) => (b / 1024 ** 3).toFixed(1) + " GB";
function ago(ms) {
  if (!ms) return "-";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 60 ? s.toFixed(0) + " s ago" : (s / 60).toFixed(0) + " min ago";
}
function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

// --- the overview -------------------------------------------------------------------------------

function renderCluster() {
  const { workers, jobs, health } = state.cluster;
  // A coordinator that cannot write its database records no progress: say why, not just stall.
  $("#degraded").hidden = !health;
  $("#degraded").textContent = health ? "The coordinator cannot record progress: " + health
    + ". The ranks train on; their reports wait until it can." : "";
  $("#worker-count").textContent = `(${workers.length})`;
  const wbody = $("#workers tbody");
  wbody.replaceChildren(...workers.map((w) => {
    const tr = row([w.id, w.chip || "-", `${gb(w.used_bytes)} / ${gb(w.memory_bytes)}`,
                    el("span", w.state, "state " + (w.state === "busy" ? "running" : "")),
                    w.job || "-", ago(w.last_seen_ms)]);
    tr.dataset.worker = w.id;
    return tr;
  }));
  const total = state.cluster.jobs_total || jobs.length;  // (the newest 100 are sent)
  $("#job-count").textContent = total > jobs.length
    ? `(the newest ${jobs.length} of ${total}: \`herd jobs\` lists them all)` : `(${jobs.length})`;
  const jbody = $("#jobs tbody");
  jbody.replaceChildren(...jobs.map((j) => {
    const bar = el("span", null, "bar");
    const fill = el("span");
    fill.style.width = (100 * Math.min(j.progress, 1)).toFixed(1) + "%";
    bar.appendChild(fill);
    const progress = el("span");
    progress.append(bar, el("span", `${j.iteration}/${j.iters}`, "progress-text"));
    const tr = row([j.id, el("span", j.state, "state " + j.state), progress,
                    duration(j.eta_s), j.restarts,
                    j.train_loss === null ? "-" : j.train_loss.toFixed(4),
                    (j.workers || []).join(", ") || "-"]);
    tr.dataset.job = j.id;
    tr.dataset.iteration = j.iteration;
    if (j.id === state.jobId) tr.className = "selected";
    tr.addEventListener("click", () => select(j.id, true));
    return tr;
  }));
  if (!state.pinned && jobs.length) {
    // Follow the newest job until the user picks one.
    const newest = jobs.find((j) => ["running", "placing", "restarting"].includes(j.state))
      || jobs[0];
    if (newest.id !== state.jobId) select(newest.id, false);
  }
}

// --- one job ------------------------------------------------------------------------------------

function select(jobId, pinned) {
  state.pinned = state.pinned || pinned;
  if (jobId === state.jobId) return;
  state.jobId = jobId;
  state.job = null;
  history.replaceState(null, "", "#job=" + encodeURIComponent(jobId));
  connect();
}

function tick(v) {
  if (v === null || v === undefined) return "";
  return Math.abs(v) >= 1000 ? Math.round(v).toLocaleString() : String(+v.toPrecision(3));
}

function lastBy(points, key, pick) {
  // The last value per iteration (a report redone after a restart replaces the earlier one).
  const m = new Map();
  for (const p of points) if (pick(p)) m.set(p.it, p[key]);
  return m;
}

function aligned(maps) {
  const xs = [...new Set(maps.flatMap((m) => [...m.keys()]))].sort((a, b) => a - b);
  return [xs, ...maps.map((m) => xs.map((x) => (m.has(x) ? m.get(x) : null)))];
}

function chart(id, names) {
  const box = $("#" + id);
  const key = id + ":" + names.join(",");
  if (state.charts[id] && state.charts[id].key === key) return state.charts[id].plot;
  if (state.charts[id]) state.charts[id].plot.destroy();
  box.replaceChildren();
  const opts = {
    width: Math.max(300, box.clientWidth - 4), height: 200,
    scales: { x: { time: false } },
    axes: [{ label: "iteration" }, { size: 64, values: (u, vals) => vals.map(tick) }],
    series: [{ label: "iteration" }, ...names.map((n, i) => ({
      label: n, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
      points: { show: true, size: 4 } }))],
  };
  const plot = new uPlot(opts, [[], ...names.map(() => [])], box);
  state.charts[id] = { key, plot };
  return plot;
}

function renderJob(dirty) {
  const j = state.job;
  $("#job").hidden = !j;
  if (!j) return;
  $("#job-title").textContent = j.id;
  const st = $("#job-state");
  st.textContent = j.state;
  st.className = "state " + j.state;
  $("#job-meta").textContent = `${j.model} · iteration ${j.iteration}/${j.iters} · ETA ` +
    `${duration(j.eta_s)} · attempt ${j.attempt} · restarts ${j.restarts}` +
    (j.message ? ` · ${j.message}` : "");

  const points = j.points;
  const ranks = [...new Set(points.map((p) => p.rank))].sort((a, b) => a - b);
  const workerOf = {};
  for (const p of points) workerOf[p.rank] = p.worker;
  if (dirty.has("points")) renderCharts(j, ranks, workerOf);
  if (dirty.has("timing")) renderTiming(j, workerOf);
  if (dirty.has("checkpoints")) renderCheckpoints(j);
  if (dirty.has("log")) {
    $("#log").replaceChildren(...j.log.slice(-200).map((l) => {
      const li = el("li", null, l.level);
      li.append(el("span", new Date(l.time_ms).toLocaleTimeString(), "t"), l.message);
      return li;
    }));
  }
}

function renderCharts(j, ranks, workerOf) {
  const points = j.points;
  // The lowest rank that reports each: every rank reports the same global loss, but a
  // pipeline's stages before the last report their speed and memory only (loss null).
  const lowest = (has) => Math.min(...points.filter(has).map((p) => p.rank));
  const first = lowest((p) => p.loss !== null);
  const firstVal = lowest((p) => p.val !== null);
  const train = lastBy(points, "loss", (p) => p.rank === first && p.loss !== null);
  const val = lastBy(points, "val", (p) => p.rank === firstVal && p.val !== null);
  chart("chart-loss", ["train", "validation"]).setData(aligned([train, val]));
  $("#chart-loss").dataset.points = String(train.size);
  $("#chart-loss").dataset.valPoints = String(val.size);

  const names = ranks.map((r) => `rank ${r} (${workerOf[r]})`);
  const perRank = (key) => ranks.map((r) => lastBy(points, key,
    (p) => p.rank === r && p.val === null));
  // Each rank measures the whole job's rate: one line (a line per rank read as a share each,
  // their sum twice the real rate: an outside run).
  const firstTps = lowest((p) => p.val === null && p.tps);
  const tps = lastBy(points, "tps", (p) => p.rank === firstTps && p.val === null);
  chart("chart-tps", ["the job"]).setData(aligned([tps]));
  $("#chart-tps").dataset.points = String(tps.size);
  chart("chart-mem", names).setData(aligned(perRank("mem")));
}

function renderTiming(j, workerOf) {
  const t = j.timing;
  const part = (k) => new Map(t.map((p) => [p.it, p[k]]));
  chart("chart-time", ["compute", "exchange", "waiting"])
    .setData(aligned([part("compute"), part("exchange"), part("wait")]));

  $("#split tbody").replaceChildren(...Object.entries(j.split).map(([rank, s]) => {
    const total = s.compute + s.exchange + s.wait || 1;
    const bar = el("span", null, "split");
    for (const k of ["compute", "exchange", "wait"]) {
      const seg = el("span", null, k);
      seg.style.width = (100 * s[k] / total).toFixed(1) + "%";
      bar.appendChild(seg);
    }
    return row([rank, workerOf[rank] || "-", s.compute.toFixed(3) + " s",
                s.exchange.toFixed(3) + " s", s.wait.toFixed(3) + " s", bar]);
  }));
}

function renderCheckpoints(j) {
  $("#checkpoints tbody").replaceChildren(...j.checkpoint_list.slice().reverse().map((c) => {
    const a = el("a", "download");
    a.href = `/api/jobs/${encodeURIComponent(j.id)}/checkpoints/${c.step}/adapter.tar.gz`;
    return row([c.step, (c.bytes / 1e6).toFixed(2) + " MB",
                new Date(c.time_ms).toLocaleTimeString(), a]);
  }));
}

function applyChange(c) {
  const j = state.job;
  if (!j || c.job_id !== j.id) return;
  Object.assign(j, c.summary);
  const changed = ["summary"];
  if (c.point) { j.points.push(c.point); changed.push("points"); }
  if (c.timing) {
    j.timing.push({ it: c.timing.it, compute: c.timing.compute, exchange: c.timing.exchange,
                    wait: c.timing.wait });
    j.split = c.timing.split;
    changed.push("timing");
  }
  if (c.checkpoint) {
    j.checkpoint_list = j.checkpoint_list.filter((x) => x.step !== c.checkpoint.step);
    j.checkpoint_list.push(c.checkpoint);
    changed.push("checkpoints");
  }
  if (c.log) { j.log.push(c.log); changed.push("log"); }
  redraw(changed);
}

// Redraw at most once a second however fast reports come, and only what changed: a browser open
// on the dashboard may share its machine's cores with training (bench/dashboard_overhead.py
// measures that). A hidden tab draws nothing until it is shown again.
const REDRAW_MS = 1000;
let redrawAt = 0, redrawTimer = null;
function redraw(parts) {
  for (const p of parts) state.dirty.add(p);
  if (redrawTimer || document.hidden) return;
  const wait = Math.max(0, redrawAt + REDRAW_MS - Date.now());
  redrawTimer = setTimeout(() => {
    redrawTimer = null;
    redrawAt = Date.now();
    const dirty = state.dirty;
    state.dirty = new Set();
    if (dirty.has("cluster")) renderCluster();
    if (dirty.size) renderJob(dirty);
  }, wait);
}
document.addEventListener("visibilitychange", () => { if (!document.hidden) redraw([]); });

// --- the stream ---------------------------------------------------------------------------------

function connect() {
  if (state.source) state.source.close();
  const url = "/api/stream" + (state.jobId ? "?job=" + encodeURIComponent(state.jobId) : "");
  const src = new EventSource(url);
  state.source = src;
  const conn = $("#conn");
  src.onopen = () => {
    state.lostAt = null;
    conn.textContent = "live"; conn.className = "conn live";
  };
  src.onerror = () => {
    // What the page shows stays as it was when the stream broke ("0 s ago" for ever, a frozen
    // ETA: an outside run): say since when.
    state.lostAt = state.lostAt || new Date();
    conn.textContent = "coordinator unreachable since " + state.lostAt.toLocaleTimeString()
      + ": the figures below are as of then; reconnecting…";
    conn.className = "conn lost";
    if (src.readyState === EventSource.CLOSED) setTimeout(start, 2000);
  };
  src.addEventListener("cluster", (e) => {
    state.cluster = JSON.parse(e.data);
    redraw(["cluster"]);
  });
  src.addEventListener("job", (e) => { state.job = JSON.parse(e.data); redraw(ALL); });
  src.addEventListener("change", (e) => applyChange(JSON.parse(e.data)));
}

async function start() {
  const r = await fetch("/api/cluster", { credentials: "same-origin" });
  if (r.status === 401) {
    $("#login").hidden = false;
    $("#main").hidden = true;
    return;
  }
  $("#login").hidden = true;
  $("#main").hidden = false;
  const m = location.hash.match(/^#job=(.+)$/);
  if (m) { state.jobId = decodeURIComponent(m[1]); state.pinned = true; }
  connect();
}

$("#login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  // The token goes in the request body, never in a URL; the reply sets an HttpOnly cookie.
  const body = new URLSearchParams({ token: e.target.token.value });
  e.target.token.value = "";
  const r = await fetch("/login", { method: "POST", body, credentials: "same-origin" });
  if (r.ok) { $("#login-error").textContent = ""; start(); }
  else $("#login-error").textContent = "That token was refused.";
});

window.addEventListener("resize", () => {
  for (const { plot } of Object.values(state.charts)) {
    plot.setSize({ width: Math.max(300, plot.root.parentNode.clientWidth - 4), height: 200 });
  }
});

start();
