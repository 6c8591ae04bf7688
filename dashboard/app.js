// Strobe dashboard: reads only the public API (/api/v1/stream, /api/v1/alerts, POST /api/v1/alerts/{id}/ack,
// /api/v1/services, /api/v1/cluster).
// Overview tiles come from "overview" frames; the service view from "second" frames of one service.
"use strict";

const HISTORY_SECONDS = 600;
const SPARK_SECONDS = 120;
const STALE_AFTER = 5;
const ERROR_BAD = 0.05;
const ERROR_WARN = 0.02;
const COLORS = ["#4ea1ff", "#ff6b6b", "#f7c948", "#3ddc97", "#c77dff", "#ff9f43", "#48dbfb", "#ee5a9b"];

const state = {
  services: new Map(),   // name -> { points: [{t, versions}], tile }
  alerts: new Map(),     // id -> record
  deploys: new Map(),    // service -> Map(candidate -> newest canary verdict)
  selected: null,        // service in the detail view
  series: new Map(),     // key -> { metric, tags, kind, bySplit: Map(splitKey -> Map(t -> summary)) }
  newest: 0,
  ws: null,
  retryMs: 500,
  dirty: true,
  filter: "",
};

const $ = (id) => document.getElementById(id);
const nowSeconds = () => Date.now() / 1000;
const fmt = (v, digits = 1) => (v === null || v === undefined || !Number.isFinite(v)) ? "–" : v.toFixed(digits);
const fmtRate = (v) => !Number.isFinite(v) ? "–" : v >= 10000 ? (v / 1000).toFixed(1) + "k" : v.toFixed(0);
const pct = (r) => r === null || r === undefined ? "–" : (100 * r).toFixed(2) + "%";

// ---------- stream ----------

function subscription() {
  return { subscribe: { overview: true, services: state.selected ? [state.selected] : [] } };
}

// ---------- access ----------
// When the aggregator asks for a token, the page asks once and keeps it for this browser tab (sessionStorage).
// It travels as `Authorization: Bearer` on requests and, on the websocket (where browsers cannot set headers), as
// a `strobe.token.<hex>` subprotocol value beside `strobe`: never in a URL.

const TOKEN_KEY = "strobe-token";
const token = () => sessionStorage.getItem(TOKEN_KEY);
const authHeaders = (extra = {}) => token() ? { ...extra, authorization: `Bearer ${token()}` } : extra;
const hex = (text) => Array.from(new TextEncoder().encode(text), (b) => b.toString(16).padStart(2, "0")).join("");

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  if (response.status === 401) askForToken(token() ? "That token was not accepted." : "This aggregator needs a token.");
  return response;
}

function askForToken(message) {
  const form = $("token-form");
  $("token-message").textContent = message;
  form.hidden = false;
  setConn("down", "token needed");
  $("token-input").focus();
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("token-input").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token-form").hidden = true;
  start();
});

/// Checks access, then loads alerts and opens the stream.
async function start() {
  let response;
  try { response = await api("/api/v1/services"); } catch (e) { setTimeout(start, 2000); return; }
  if (response.status === 401) return;  // the token form is up
  if (response.status === 403) { setConn("down", "this token may not read"); return; }
  loadAlerts();
  loadCluster();
  connect();
}

// A node of a cluster says which it is and whether etcd answers; while it does not, this node keeps its services
// but takes no new ones, and the page says so.
async function loadCluster() {
  try {
    const response = await api("/api/v1/cluster");
    const body = await response.json();
    const pill = $("cluster");
    if (body.enabled) {
      const members = (body.members || []).length;
      pill.hidden = false;
      if (body.etcd === "up") {
        pill.className = "pill";
        pill.textContent = `node ${body.node} of ${members}`;
        pill.title = (body.members || []).map(m => `${m.id}: ${m.http}`).join("\n");
      } else {
        pill.className = "pill down";
        pill.textContent = `node ${body.node}: etcd unreachable, taking no new services`;
      }
    }
  } catch (e) { /* tried again below */ }
  setTimeout(loadCluster, 5000);
}

function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const protocols = token() ? ["strobe", "strobe.token." + hex(token())] : ["strobe"];
  const ws = new WebSocket(`${proto}://${location.host}/api/v1/stream`, protocols);
  state.ws = ws;
  ws.onopen = () => {
    state.retryMs = 500;
    ws.send(JSON.stringify(subscription()));
    setConn("live", "live");
    $("banner").hidden = true;
  };
  ws.onmessage = (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch (e) { return; }
    onFrame(frame);
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    const wait = state.retryMs;
    state.retryMs = Math.min(state.retryMs * 2, 10000);
    setConn("down", `disconnected, retrying in ${(wait / 1000).toFixed(1)} s`);
    const banner = $("banner");
    banner.textContent = "Live stream lost: the numbers below are frozen. Reconnecting…";
    banner.hidden = false;
    // A refused handshake looks like any lost connection: ask the API whether the token still holds.
    setTimeout(start, wait);
  };
}

function setConn(cls, text) {
  const el = $("conn");
  el.className = "pill " + cls;
  el.textContent = text;
}

function onFrame(frame) {
  switch (frame.type) {
    case "overview": onOverview(frame); break;
    case "second": onSecond(frame); break;
    case "alert": onAlert(frame.alert); break;
    case "deploy": {
      const d = frame.deploy;
      if (!state.deploys.has(d.service)) state.deploys.set(d.service, new Map());
      state.deploys.get(d.service).set(d.candidate, d);
      state.dirty = true;
      break;
    }
    case "lagged": {
      const el = $("lagged");
      el.textContent = `dropped ${frame.dropped} frames (this page fell behind)`;
      el.hidden = false;
      clearTimeout(el._timer);
      el._timer = setTimeout(() => { el.hidden = true; }, 10000);
      break;
    }
    case "error": console.warn("stream:", frame.error); break;
  }
}

function onOverview(frame) {
  let svc = state.services.get(frame.service);
  if (!svc) {
    svc = { points: [], tile: null };
    state.services.set(frame.service, svc);
  }
  upsertByT(svc.points, { t: frame.t, versions: frame.versions });
  trim(svc.points, frame.t - HISTORY_SECONDS);
  if (!frame.correction) state.newest = Math.max(state.newest, frame.t);
  state.dirty = true;
}

function onSecond(frame) {
  if (frame.service !== state.selected) return;
  for (const s of frame.series) {
    const tagKey = Object.entries(s.tags).map(([k, v]) => `${k}=${v}`).join(",");
    const key = `${s.metric}{${tagKey}}`;
    let entry = state.series.get(key);
    if (!entry) {
      entry = { metric: s.metric, tags: tagKey, kind: s.kind, bySplit: new Map() };
      state.series.set(key, entry);
    }
    const split = s.version !== null ? "version:" + s.version : s.zone !== null ? "zone:" + s.zone : "all";
    let points = entry.bySplit.get(split);
    if (!points) { points = new Map(); entry.bySplit.set(split, points); }
    points.set(frame.t, s);
  }
  state.detailDirty = true;
}

function onAlert(alert) {
  if (alert.state === "cleared") state.alerts.delete(alert.id);
  else state.alerts.set(alert.id, { ...alert, seenAt: Date.now() });
  state.alertsDirty = true;
  state.dirty = true;
}

function upsertByT(points, point) {
  let i = points.length - 1;
  while (i >= 0 && points[i].t > point.t) i--;
  if (i >= 0 && points[i].t === point.t) points[i] = point;
  else points.splice(i + 1, 0, point);
}

function trim(points, oldest) {
  let n = 0;
  while (n < points.length && points[n].t < oldest) n++;
  if (n) points.splice(0, n);
}

// ---------- health ----------

function alertsOf(service) {
  const out = [];
  for (const a of state.alerts.values()) if (a.service === service && a.state !== "resolved") out.push(a);
  return out;
}

function versionHealth(service, v, alerts) {
  const mine = alerts.filter((a) => (a.labels && a.labels.version) === v.version);
  const verdict = (state.deploys.get(service) || new Map()).get(v.version);
  if (verdict && verdict.state === "bad") return "bad";
  if (mine.some((a) => a.state === "firing")) return "bad";
  if (v.error_ratio !== null && v.error_ratio > ERROR_BAD) return "bad";
  if (mine.some((a) => a.state === "acknowledged" || a.state === "pending")) return "warn";
  if (v.error_ratio !== null && v.error_ratio > ERROR_WARN) return "warn";
  return "ok";
}

function serviceHealth(name, svc) {
  const latest = svc.points[svc.points.length - 1];
  if (!latest || nowSeconds() - 1 - latest.t > STALE_AFTER) return { level: "stale", rank: 1, alerts: alertsOf(name) };
  const alerts = alertsOf(name);
  const levels = latest.versions.map((v) => versionHealth(name, v, alerts));
  if (alerts.some((a) => a.state === "firing")) levels.push("bad");
  if (alerts.some((a) => a.state !== "firing")) levels.push("warn");
  const level = levels.includes("bad") ? "bad" : levels.includes("warn") ? "warn" : "ok";
  const all = latest.versions[0] || {};
  const rank = { bad: 3, warn: 2, ok: 0 }[level];
  return { level, rank, alerts, score: rank * 1e6 + (all.error_ratio || 0) * 1e4 + (all.p99 || 0) / 1e3 };
}

// ---------- overview tiles ----------

// Only tiles on screen are drawn; the others keep their place in the order and catch up when scrolled to.
const visibility = new IntersectionObserver((entries) => {
  for (const e of entries) e.target._visible = e.isIntersecting;
  state.dirty = true;
});

function makeTile(name) {
  const el = document.createElement("div");
  el.className = "tile";
  el.dataset.service = name;
  el._visible = true;
  visibility.observe(el);
  el.innerHTML = `<div class="name"><span class="svc"></span><span class="state"></span></div>
    <div class="nums"><span><b class="rate"></b><i>req/s</i></span><span><b class="err"></b><i>errors</i></span>
    <span><b class="p50"></b><i>p50 ms</i></span><span><b class="p99"></b><i>p99 ms</i></span></div>
    <canvas width="240" height="36"></canvas><div class="versions"></div><div class="verdict"></div>`;
  el.querySelector(".svc").textContent = name;
  el.addEventListener("click", () => openDetail(name));
  return el;
}

function setText(el, text) { if (el.textContent !== text) el.textContent = text; }

function renderTiles() {
  const container = $("tiles");
  const entries = [];
  let shown = 0, bad = 0;
  for (const [name, svc] of state.services) {
    if (!svc.tile) svc.tile = makeTile(name);
    const health = serviceHealth(name, svc);
    const visible = !state.filter || name.includes(state.filter);
    svc.tile.hidden = !visible;
    if (visible) shown++;
    if (health.level === "bad") bad++;
    entries.push({ name, svc, health });
  }
  entries.sort((a, b) => (b.health.score || 0) - (a.health.score || 0) || a.name.localeCompare(b.name));
  // Reorder only when the order changed, so the layout is not redone every second.
  const order = entries.map((e) => e.name).join("\n");
  const reordered = order !== state.tileOrder;
  if (reordered) {
    for (const e of entries) container.appendChild(e.svc.tile);
    state.tileOrder = order;
  }
  // After a reorder, visibility is not known until the observer runs: draw every tile once.
  for (const { name, svc, health } of entries) updateTile(name, svc, health, reordered);
  setText($("counts"), `${shown} services${bad ? `, ${bad} unhealthy` : ""}`);
}

function updateTile(name, svc, health, force) {
  const el = svc.tile;
  const latest = svc.points[svc.points.length - 1];
  const cls = "tile " + health.level;
  if (el.className !== cls) el.className = cls;
  if (!latest) return;
  if (!force && !el._visible && el.dataset.t) { el.dataset.t = latest.t; return; }
  el.dataset.t = latest.t;
  const all = latest.versions[0];
  setText(el.querySelector(".rate"), fmtRate(all.rate));
  setText(el.querySelector(".err"), pct(all.error_ratio));
  setText(el.querySelector(".p50"), fmt(all.p50));
  setText(el.querySelector(".p99"), fmt(all.p99));
  const firing = health.alerts.filter((a) => a.state === "firing").length;
  setText(el.querySelector(".state"), `${all.instances} inst` + (firing ? ` · ${firing} firing` : health.level === "stale" ? " · no data" : ""));
  const versions = latest.versions.slice(1);
  const box = el.querySelector(".versions");
  if (versions.length > 1) {
    // Newest (by first report) last, next to the baseline.
    versions.sort((a, b) => (a.first_seen || 0) - (b.first_seen || 0));
    const html = versions.map((v, i) => {
      const level = versionHealth(name, v, health.alerts);
      const newest = i === versions.length - 1 ? " newest" : "";
      return `<div class="version ${level}${newest}" data-version="${escapeHtml(v.version)}"><span class="v">${escapeHtml(v.version)}</span> ` +
        `${v.instances}i<br>${pct(v.error_ratio)} err · p99 ${fmt(v.p99, 0)}</div>`;
    }).join("");
    if (box._html !== html) { box.innerHTML = html; box._html = html; }
  } else if (box._html) { box.innerHTML = ""; box._html = ""; }
  const shown = shownVerdict(name);
  setText(el.querySelector(".verdict"), verdictText(shown, versions.length));
  el.querySelector(".verdict").className = "verdict " + ((shown || {}).state || "");
  drawSpark(el.querySelector("canvas"), svc.points, latest.t);
}

// The verdict a tile shows: a bad candidate first, else the newest candidate's.
function shownVerdict(service) {
  const all = [...(state.deploys.get(service) || new Map()).values()];
  return all.find((v) => v.state === "bad") || all.sort((a, b) => b.since - a.since)[0];
}

function verdictText(v, versions) {
  if (!v || (versions < 2 && !["promoted", "rolled_back"].includes(v.state))) return "";
  const head = `canary ${v.candidate} vs ${v.baseline}: ${v.state.replaceAll("_", " ")}`;
  const r = v.reason;
  if (!r) return head;
  const show = (x) => r.metric === "error_ratio" ? pct(x) : fmt(x) + " ms";
  return `${head} · ${r.metric} ${show(r.candidate)} vs ${show(r.baseline)}`;
}

function drawSpark(canvas, points, newest) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const from = newest - SPARK_SECONDS;
  const recent = points.filter((p) => p.t > from);
  if (recent.length < 2) return;
  const x = (t) => ((t - from) / SPARK_SECONDS) * w;
  const maxRate = Math.max(1, ...recent.map((p) => p.versions[0].rate || 0));
  const maxP99 = Math.max(1, ...recent.map((p) => p.versions[0].p99 || 0));
  ctx.fillStyle = "#2c3440";
  for (const p of recent) {
    const bh = ((p.versions[0].rate || 0) / maxRate) * (h - 2);
    ctx.fillRect(x(p.t), h - bh, Math.max(1, w / SPARK_SECONDS), bh);
  }
  ctx.fillStyle = "#d93a3a";
  for (const p of recent) {
    const r = p.versions[0].error_ratio || 0;
    if (r <= 0) continue;
    const bh = Math.min(1, r / 0.1) * (h - 2);
    ctx.fillRect(x(p.t), h - bh, Math.max(1, w / SPARK_SECONDS), bh);
  }
  ctx.strokeStyle = "#4ea1ff";
  ctx.lineWidth = 1.2;
  ctx.beginPath();
  let started = false;
  for (const p of recent) {
    const v = p.versions[0].p99;
    if (v === null || v === undefined) { started = false; continue; }
    const y = h - 2 - (v / maxP99) * (h - 4);
    if (started) ctx.lineTo(x(p.t), y); else { ctx.moveTo(x(p.t), y); started = true; }
  }
  ctx.stroke();
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// ---------- alerts panel ----------

function renderAlerts() {
  const list = $("alert-list");
  const now = Date.now();
  const order = { firing: 0, acknowledged: 1, pending: 2, resolved: 3 };
  const alerts = [...state.alerts.values()]
    .filter((a) => a.state !== "resolved" || now - (a.resolved_at_ms || a.seenAt) < 60000)
    .sort((a, b) => order[a.state] - order[b.state] || b.since - a.since);
  if (!alerts.length) { list.innerHTML = `<p class="dim empty">No alerts.</p>`; list._key = ""; return; }
  const key = alerts.map((a) => a.id + a.state).join();
  if (list._key === key) return;
  list._key = key;
  list.innerHTML = "";
  for (const a of alerts) {
    const el = document.createElement("div");
    el.className = "alert " + a.state;
    el.dataset.alertId = a.id;
    el.dataset.service = a.service;
    const labels = Object.entries(a.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ");
    const reason = a.evidence && a.evidence.reason;
    const evidence = reason
      ? `${reason.metric}: ${fmt(reason.candidate, 4)} vs ${fmt(reason.baseline, 4)} ` +
        `(floor ${fmt(reason.floor, 2)}x, z ${fmt(reason.z, 1)}, ` +
        `${reason.candidate_samples} vs ${reason.baseline_samples} samples)`
      : a.evidence ? JSON.stringify(a.evidence).slice(0, 300) : "";
    el.innerHTML = `<div class="head"><span>${escapeHtml(a.service)} · ${escapeHtml(a.rule)}</span><span>${a.state}</span></div>
      <div>${escapeHtml(a.summary)} ${escapeHtml(labels)}</div>
      <div class="meta">value ${fmt(a.value, 3)} / threshold ${fmt(a.threshold, 3)} · since ${new Date(a.since * 1000).toLocaleTimeString()}` +
      (a.detected_after_ms !== null && a.detected_after_ms !== undefined ? ` · detected after ${a.detected_after_ms} ms` : "") +
      (a.acknowledged_by ? ` · acked by ${escapeHtml(a.acknowledged_by)}` : "") + `</div>` +
      (a.hint ? `<div class="meta">${escapeHtml(a.hint)}</div>` : "") +
      (evidence ? `<div class="evidence">${escapeHtml(evidence)}</div>` : "") +
      (a.state === "firing" ? `<button type="button" class="ack">Acknowledge</button>` : "");
    const button = el.querySelector("button.ack");
    if (button) button.addEventListener("click", (e) => { e.stopPropagation(); acknowledge(a.id, button); });
    el.addEventListener("click", () => openDetail(a.service));
    list.appendChild(el);
  }
}

async function acknowledge(id, button) {
  button.disabled = true;
  button.textContent = "acknowledging…";
  try {
    const response = await api(`/api/v1/alerts/${encodeURIComponent(id)}/ack`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ by: "dashboard" }),
    });
    const body = await response.json();
    if (response.ok) onAlert(body.alert);
    else if (response.status === 403) { button.textContent = "this token may not acknowledge"; }
    else { button.textContent = body.error || "failed"; }
  } catch (e) {
    button.textContent = "failed: " + e.message;
  }
}

async function loadAlerts() {
  try {
    const response = await api("/api/v1/alerts");
    const body = await response.json();
    for (const a of body.alerts) if (!state.alerts.has(a.id)) onAlert(a);
  } catch (e) { /* the stream will bring them */ }
}

// ---------- service view ----------

function openDetail(name) {
  state.selected = name;
  state.series = new Map();
  $("detail-name").textContent = name;
  $("detail").hidden = false;
  $("charts").innerHTML = "";
  state.charts = new Map();
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(subscription()));
  state.detailDirty = true;
}

function closeDetail() {
  state.selected = null;
  state.series = new Map();
  $("detail").hidden = true;
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(subscription()));
}

function versionMarkers() {
  const svc = state.services.get(state.selected);
  if (!svc || !svc.points.length) return [];
  const latest = svc.points[svc.points.length - 1];
  const versions = latest.versions.slice(1).filter((v) => v.first_seen);
  if (versions.length < 2) return [];
  versions.sort((a, b) => a.first_seen - b.first_seen);
  return versions.slice(1).map((v) => ({ t: v.first_seen, label: v.version }));
}

function linesFor(entry, split, splitStat) {
  const lines = [];
  const pick = (prefix) => [...entry.bySplit.entries()].filter(([k]) => k.startsWith(prefix)).sort();
  if (split === "all") {
    const points = entry.bySplit.get("all");
    if (!points) return lines;
    const stats = entry.kind === "histogram" ? ["p50", "p90", "p99", "p999", "max"]
      : entry.kind === "gauge" ? ["min", "mean", "max"] : ["sum"];
    stats.forEach((stat, i) => lines.push({ label: stat === "sum" ? "per second" : stat, color: COLORS[i], points, stat }));
  } else {
    const stat = entry.kind === "histogram" ? splitStat : entry.kind === "gauge" ? "mean" : "sum";
    pick(split + ":").forEach(([k, points], i) => lines.push({ label: `${k.slice(split.length + 1)} ${stat}`, color: COLORS[i % COLORS.length], points, stat }));
  }
  return lines;
}

function renderDetail() {
  if (!state.selected) return;
  const split = $("split").value;
  const splitStat = $("split-stat").value;
  const markers = versionMarkers();
  const newest = state.newest;
  const keys = [...state.series.keys()].sort();
  for (const key of keys) {
    const entry = state.series.get(key);
    let chart = state.charts.get(key);
    if (!chart) {
      const el = document.createElement("div");
      el.className = "chart";
      el.innerHTML = `<h3></h3><div class="legend"></div><canvas width="640" height="170"></canvas>`;
      el.querySelector("h3").textContent = `${entry.metric}${entry.tags ? " {" + entry.tags + "}" : ""} · ${entry.kind}${entry.kind === "histogram" ? " (ms)" : ""}`;
      $("charts").appendChild(el);
      chart = { el, canvas: el.querySelector("canvas"), entry };
      attachHover(chart);
      state.charts.set(key, chart);
    }
    chart.lines = linesFor(entry, split, splitStat);
    // Show the data there is (at least two minutes, at most the history), so a fresh page is not a flat line.
    let oldest = newest;
    for (const points of entry.bySplit.values()) for (const t of points.keys()) if (t < oldest) oldest = t;
    chart.from = newest - Math.min(HISTORY_SECONDS - 1, Math.max(SPARK_SECONDS, newest - oldest));
    chart.to = newest;
    const legend = chart.lines.map((l) => `<span style="color:${l.color}">■ ${escapeHtml(l.label)}</span>`).join(" ");
    const legendEl = chart.el.querySelector(".legend");
    if (legendEl._html !== legend) { legendEl.innerHTML = legend; legendEl._html = legend; }
    drawChart(chart, markers);
  }
  const svc = state.services.get(state.selected);
  const latest = svc && svc.points[svc.points.length - 1];
  setText($("detail-info"), latest ? `${latest.versions[0].instances} instances · ${latest.versions.length - 1} versions · last ${HISTORY_SECONDS / 60} min` : "");
}

function drawChart(chart, markers) {
  const { canvas, lines, from, to } = chart;
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, padL = 44, padB = 14;
  ctx.clearRect(0, 0, w, h);
  let max = 0;
  for (const l of lines) for (const [t, s] of l.points) if (t >= from && Number.isFinite(s[l.stat])) max = Math.max(max, s[l.stat]);
  max = max > 0 ? max * 1.1 : 1;
  chart.scale = { from, to, max, padL, padB, w, h };
  const x = (t) => padL + ((t - from) / Math.max(1, to - from)) * (w - padL - 2);
  const y = (v) => h - padB - (v / max) * (h - padB - 4);
  ctx.strokeStyle = "#262c36";
  ctx.fillStyle = "#8a919c";
  ctx.font = "10px system-ui";
  for (let i = 0; i <= 4; i++) {
    const v = (max / 4) * i;
    ctx.beginPath(); ctx.moveTo(padL, y(v)); ctx.lineTo(w, y(v)); ctx.stroke();
    ctx.fillText(v >= 1000 ? (v / 1000).toFixed(1) + "k" : v.toFixed(v < 10 ? 1 : 0), 2, y(v) + 3);
  }
  const step = to - from > 240 ? 60 : 30;
  for (let t = to; t >= from; t -= step) {
    const ago = to - t;
    ctx.fillText(step === 60 ? `-${ago / 60}m` : `-${ago}s`, x(t) - 8, h - 2);
  }
  ctx.setLineDash([4, 3]);
  ctx.strokeStyle = "#c77dff";
  for (const m of markers) {
    if (m.t < from) continue;
    ctx.beginPath(); ctx.moveTo(x(m.t), 0); ctx.lineTo(x(m.t), h - padB); ctx.stroke();
    ctx.fillStyle = "#c77dff";
    const width = ctx.measureText(m.label).width;
    const lx = x(m.t) + 3 + width > w ? x(m.t) - 3 - width : x(m.t) + 3;
    ctx.fillText(m.label, lx, 10);
  }
  ctx.setLineDash([]);
  for (const l of lines) {
    ctx.strokeStyle = l.color;
    ctx.lineWidth = 1.3;
    ctx.beginPath();
    let prev = null;
    const ts = [...l.points.keys()].filter((t) => t >= from).sort((a, b) => a - b);
    for (const t of ts) {
      const v = l.points.get(t)[l.stat];
      if (!Number.isFinite(v)) { prev = null; continue; }
      if (prev !== null && t === prev + 1) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      prev = t;
    }
    ctx.stroke();
  }
}

function attachHover(chart) {
  const tip = $("tooltip");
  chart.canvas.addEventListener("mousemove", (e) => {
    const s = chart.scale;
    if (!s) return;
    const rect = chart.canvas.getBoundingClientRect();
    const px = ((e.clientX - rect.left) / rect.width) * s.w;
    const t = Math.round(s.from + ((px - s.padL) / (s.w - s.padL - 2)) * (s.to - s.from));
    const rows = chart.lines.map((l) => {
      const p = l.points.get(t);
      return `${l.label.padEnd(14)} ${p ? fmt(p[l.stat], 2) : "–"}` + (p && p.instances ? `  (${p.instances} inst)` : "");
    });
    tip.textContent = `${new Date(t * 1000).toLocaleTimeString()}\n` + rows.join("\n");
    tip.style.left = e.clientX + 12 + "px";
    tip.style.top = e.clientY + 12 + "px";
    tip.hidden = false;
  });
  chart.canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
}

// ---------- loop ----------

function tick() {
  const behind = state.newest ? Math.max(0, Math.floor(nowSeconds()) - 1 - state.newest) : null;
  setText($("behind"), behind === null ? "waiting for data…" : `newest second ${new Date(state.newest * 1000).toLocaleTimeString()} · ${behind} s behind`);
  $("behind").className = behind !== null && behind > 3 ? "pill warn" : "dim";
  state.dirty = true;
  state.alertsDirty = true;
  state.detailDirty = true;
}

// Redraw at most four times a second whatever the frame rate: data changes once a second per service.
const MIN_REDRAW_MS = 250;
let lastDraw = 0;
function frame(now) {
  if (now - lastDraw >= MIN_REDRAW_MS) {
    lastDraw = now;
    if (state.dirty) { state.dirty = false; renderTiles(); }
    if (state.alertsDirty) { state.alertsDirty = false; renderAlerts(); }
    if (state.detailDirty && state.selected) { state.detailDirty = false; renderDetail(); }
  }
  requestAnimationFrame(frame);
}

$("detail-close").addEventListener("click", closeDetail);
$("split").addEventListener("change", () => { state.detailDirty = true; });
$("split-stat").addEventListener("change", () => { state.detailDirty = true; });
$("filter").addEventListener("input", (e) => { state.filter = e.target.value.trim(); state.dirty = true; });
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.selected) closeDetail(); });
setInterval(tick, 1000);
start();
requestAnimationFrame(frame);
