"""The dashboard's one page: static HTML and a small script that polls the JSON API every second
and draws what it returns (no build step, no library; text goes in with textContent only).
Kept in a module so that an installed package carries it without package data."""

INDEX = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>elastic-run dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f5f6f8; }
  header { background: #1d2330; color: #fff; padding: 10px 18px; display: flex; gap: 18px;
           align-items: baseline; }
  header h1 { font-size: 17px; margin: 0; }
  header .muted { color: #aab; }
  main { padding: 12px 18px; display: grid; grid-template-columns: 1fr 1fr; gap: 14px;
         align-items: start; }
  .column { display: grid; gap: 14px; }
  section { background: #fff; border: 1px solid #dde; border-radius: 6px; padding: 10px 12px;
            overflow: auto; }
  h2 { font-size: 15px; margin: 2px 0 8px; }
  h3 { font-size: 13px; margin: 12px 0 4px; color: #445; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 3px 8px 3px 0; border-bottom: 1px solid #eef;
           white-space: nowrap; }
  th { font-weight: 600; color: #556; font-size: 12px; }
  tr.job { cursor: pointer; }
  tr.job.selected { background: #e8f0ff; }
  .state-running, .state-active, .state-alive { color: #0a7a2f; }
  .state-failed, .state-dead { color: #b3261e; }
  .state-waiting, .state-spare, .state-pending, .state-stopping { color: #a15c00; }
  .muted { color: #778; }
  .error { background: #fde8e6; color: #8c1d13; padding: 6px 10px; border-radius: 4px;
           margin: 6px 0; }
  .big { font-size: 28px; font-weight: 600; }
  .bar { background: #e6e8ee; height: 10px; border-radius: 5px; width: 180px;
         display: inline-block; vertical-align: middle; }
  .alloc span:first-child { display: inline-block; width: 115px; }
  .bar span { display: block; height: 10px; border-radius: 5px; background: #3b6fd8; }
  svg text { font-size: 11px; fill: #334; }
  .reason { white-space: normal; color: #556; }
</style>
</head>
<body>
<header><h1>elastic-run</h1><span id="etcd" class="muted"></span>
  <span id="updated" class="muted"></span></header>
<main>
  <div class="column">
  <section>
    <h2>Jobs</h2>
    <div id="jobs-error" class="error" hidden></div>
    <table id="jobs"><thead><tr><th>JOB</th><th>STATE</th><th>WORLD</th><th>ROUND</th>
      <th>CAUSE</th><th>NODES</th><th>MIN..MAX</th></tr></thead><tbody></tbody></table>
    <p id="no-jobs" class="muted" hidden>No job in this etcd.</p>
  </section>
  <section id="pool" hidden>
    <h2>Pool <span id="pool-controller" class="muted"></span></h2>
    <div id="pool-error" class="error" hidden></div>
    <div id="allocation"></div>
    <h3>Queues</h3>
    <table id="queues"><thead><tr><th>QUEUE</th><th>RUNNING</th><th>PENDING</th>
      <th>CPU</th><th>GPU</th><th>WAITING, AND WHY</th></tr></thead><tbody></tbody>
    </table>
    <h3>Endpoints</h3>
    <div id="ray-error" class="error" hidden></div>
    <table id="endpoints"><thead><tr><th>ENDPOINT</th><th>STATE</th><th>REPLICAS</th>
      <th>GRANTED / ASKED</th><th>REQ/S</th><th>P50</th><th>P95</th><th>REQUESTS</th></tr></thead>
      <tbody></tbody></table>
  </section>
  </div>
  <section id="job" hidden>
    <h2>Job <span id="job-id"></span> <span id="job-state"></span></h2>
    <div id="job-error" class="error" hidden></div>
    <div>world size <span id="world-size" class="big"></span>
      <span id="round-cause" class="muted"></span></div>
    <h3>Members</h3>
    <table id="members"><thead><tr><th>NODE</th><th>STATE</th><th>HOST</th><th>RANKS</th>
      <th>LABELS</th><th>METRICS</th></tr></thead><tbody></tbody></table>
    <h3>World size over time</h3>
    <svg id="chart" viewBox="0 0 640 150" width="100%" role="img"
         aria-label="world size timeline"></svg>
    <table id="timeline"><thead><tr><th>TIME</th><th>ROUND</th><th>WORLD</th><th>CAUSE</th>
      <th>LEFT</th><th>RESCALE</th></tr></thead><tbody></tbody></table>
    <h3>Recent events</h3>
    <table id="events"><thead><tr><th>TIME</th><th>EVENT</th><th>NODE</th><th>ROUND</th>
      <th>CAUSE</th></tr></thead><tbody></tbody></table>
  </section>
</main>
<script src="app.js"></script>
</body>
</html>
"""

APP_JS = r"""
"use strict";
const POLL_MS = 1000;
let selected = decodeURIComponent((location.hash.match(/job=([^&]+)/) || [])[1] || "");

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function row(cells, cls) {
  const tr = el("tr", null, cls);
  for (const c of cells) {
    if (c instanceof Node) { const td = el("td"); td.appendChild(c); tr.appendChild(td); }
    else tr.appendChild(el("td", c === null || c === undefined ? "-" : c));
  }
  return tr;
}
function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows);
}
function showError(id, text) {
  const box = document.getElementById(id);
  box.hidden = !text;
  box.textContent = text || "";
}
function clock(t) {
  return t ? new Date(t * 1000).toLocaleTimeString() : "-";
}
function state(text) { return el("span", text, "state-" + text); }
async function getJSON(path) {
  const r = await fetch(path, {cache: "no-store"});
  let body;
  try { body = await r.json(); } catch (e) { body = {error: path + ": HTTP " + r.status}; }
  return body;
}

function drawJobs(data) {
  showError("jobs-error", data.error);
  document.getElementById("etcd").textContent = data.endpoint ? "etcd " + data.endpoint : "";
  const jobs = data.jobs || [];
  document.getElementById("no-jobs").hidden = jobs.length > 0 || !!data.error;
  if (!selected && jobs.length) {
    const running = jobs.find(j => j.state === "running");
    selected = (running || jobs[jobs.length - 1]).job;
  }
  fill("jobs", jobs.map(j => {
    const tr = row([j.job, state(j.state), j.world_size, j.round, j.cause,
                    j.nodes.active + (j.nodes.spare ? " + " + j.nodes.spare + " spare" : ""),
                    j.size.min + ".." + j.size.max +
                      (j.size.desired !== j.size.max ? ", want " + j.size.desired : "")],
                   "job" + (j.job === selected ? " selected" : ""));
    tr.dataset.job = j.job;
    tr.onclick = () => {
      selected = j.job;
      location.hash = "job=" + encodeURIComponent(j.job);
      poll();
    };
    return tr;
  }));
}

function drawChart(timeline, now) {
  const svg = document.getElementById("chart");
  const W = 640, H = 150, L = 34, R = 10, T = 20, B = 22;
  svg.replaceChildren();
  const pts = timeline.filter(r => r.time !== null && r.time !== undefined);
  if (!pts.length) return;
  const t0 = pts[0].time, t1 = Math.max(now, pts[pts.length - 1].time + 1);
  const maxW = Math.max(1, ...pts.map(p => p.world_size || 0));
  const x = t => L + (W - L - R) * (t - t0) / (t1 - t0);
  const y = w => H - B - (H - B - T) * (w || 0) / maxW;
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  };
  add("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#99a"});
  for (const w of [0, maxW]) add("text", {x: 4, y: y(w) + 4}, String(w));
  let d = "";
  pts.forEach((p, i) => {
    const nx = i + 1 < pts.length ? pts[i + 1].time : t1;
    d += (i ? " L" : "M") + x(p.time) + " " + y(p.world_size) +
         " L" + x(nx) + " " + y(p.world_size);
  });
  add("path", {d: d, fill: "none", stroke: "#3b6fd8", "stroke-width": 2});
  pts.forEach(p => {
    const c = add("circle", {cx: x(p.time), cy: y(p.world_size), r: 4, fill: "#3b6fd8"});
    const title = document.createElementNS(ns, "title");
    title.textContent = "round " + p.round + ": world " + p.world_size + " (" + p.cause + ")";
    c.appendChild(title);
    add("text", {x: x(p.time) + 5, y: y(p.world_size) - 6}, p.cause);
  });
  add("text", {x: L, y: H - 6}, clock(t0));
  add("text", {x: W - R - 60, y: H - 6}, clock(t1));
}

function drawJob(data) {
  const box = document.getElementById("job");
  box.hidden = false;
  showError("job-error", data.error);
  if (!data.job) return;
  document.getElementById("job-id").textContent = data.job;
  document.getElementById("job-state").replaceChildren(state(data.state));
  document.getElementById("world-size").textContent = data.world_size;
  document.getElementById("round-cause").textContent =
    data.round === null ? "no round yet" : "round " + data.round + ", cause " + data.cause;
  fill("members", data.members.map(m => {
    const link = m.metrics ? el("a", "metrics") : el("span", "-");
    if (m.metrics) link.href = m.metrics;
    const labels = Object.entries(m.labels).map(([k, v]) => k + "=" + v).join(",");
    const tr = row([m.node_id, state(m.state), m.host, m.ranks, labels || "-", link], "member");
    tr.dataset.nodeId = m.node_id;
    tr.dataset.state = m.state;
    return tr;
  }));
  fill("timeline", data.timeline.slice().reverse().map(r => {
    const tr = row([clock(r.time), r.round, r.world_size, r.cause,
                    r.left.length ? r.left.join(", ") : "-",
                    r.duration_s === null ? "-" : r.duration_s.toFixed(2) + " s"], "round");
    tr.dataset.round = r.round;
    tr.dataset.worldSize = r.world_size;
    tr.dataset.cause = r.cause;
    return tr;
  }));
  drawChart(data.timeline, data.time);
  fill("events", data.events.slice(-8).reverse().map(e =>
    row([clock(e.time), e.event, e.node, e.round, e.cause])));
}

function fmt(v, unit) { return v === null || v === undefined ? "-" : v + (unit || ""); }

let poolSeen = false;  // an etcd out of reach is said once, by the jobs, until a pool was seen
function drawPool(data) {
  const box = document.getElementById("pool");
  poolSeen = poolSeen || !!data.pool || !!data.ray_error;
  box.hidden = !poolSeen;
  showError("pool-error", data.error);
  showError("ray-error", data.ray_error);
  const pool = data.pool;
  if (!pool) return;
  const c = pool.controller;
  document.getElementById("pool-controller").textContent =
    pool.nodes + " node(s); " + (c ? "controller pid " + c.pid + ", seen " + c.age_s + " s ago"
                                   : "no controller heartbeat");
  const alloc = document.getElementById("allocation");
  alloc.replaceChildren(...Object.entries(pool.allocation).map(([r, a]) => {
    const line = el("div", null, "alloc");
    line.dataset.resource = r;
    const bar = el("span", null, "bar");
    const fillBar = el("span");
    fillBar.style.width = (a.capacity ? Math.min(100, 100 * a.allocated / a.capacity) : 0) + "%";
    bar.appendChild(fillBar);
    line.append(el("span", r.replace("_mib", " (MiB)").padEnd(13) + " "), bar,
                el("span", " " + +a.allocated.toFixed(2) + " of " + +a.capacity.toFixed(2) +
                           " allocated"));
    return line;
  }));
  fill("queues", pool.queues.map(q => {
    const waiting = el("div", null, "reason");
    for (const w of q.pending_workloads) waiting.appendChild(el("div", w.name + ": " + w.reason));
    const tr = row([q.queue, q.running, q.pending, q.used.cpu, q.used.gpu, waiting], "queue");
    tr.dataset.queue = q.queue;
    return tr;
  }));
  fill("endpoints", pool.endpoints.map(e => {
    const t = e.traffic || {};
    const replicas = e.replicas ? e.replicas.running + " running" +
      (e.replicas.starting ? ", " + e.replicas.starting + " starting" : "") : "-";
    const tr = row([e.name, e.reason ? e.state + " (" + e.reason + ")" : e.state, replicas,
                    e.in_pool ? fmt(e.granted) + " / " + fmt(e.asked) : "not in the pool",
                    fmt(t.rate_per_s), fmt(t.p50_ms, " ms"), fmt(t.p95_ms, " ms"),
                    fmt(t.requests_total)], "endpoint");
    tr.dataset.endpoint = e.name;
    return tr;
  }));
}

let busy = false;
async function poll() {
  if (busy) return;
  busy = true;
  try {
    const [jobs, pool] = await Promise.all([getJSON("api/jobs"), getJSON("api/pool")]);
    drawJobs(jobs);
    if (selected) drawJob(await getJSON("api/jobs/" + encodeURIComponent(selected)));
    drawPool(pool);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    showError("jobs-error", "the dashboard's server does not answer: " + e);
  } finally {
    busy = false;
  }
}
poll();
setInterval(poll, POLL_MS);
"""
