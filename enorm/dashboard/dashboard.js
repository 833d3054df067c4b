// The node's dashboard: polls GET /v1/dashboard with the bearer token and redraws.
// Everything a tenant could have chosen is set with textContent, never as HTML.
"use strict";

const POLL_MS = 2000;
const SERIES = [
  ["basic_service", "#ef6c00"], ["reserve", "#9e9e9e"],
  ["allocated", "#1565c0"], ["free", "#2e7d32"],
];
const charts = {};
let token = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fmt(n, digits = 2) {
  return n === null || n === undefined ? "–" : Number(n).toFixed(digits).replace(/\.?0+$/, "");
}

function chart(id, history, key) {
  const xs = history.map((p) => p.t);
  const data = [xs, ...SERIES.map(([name]) => history.map((p) => p[key][name]))];
  if (!charts[id]) {
    const opts = {
      width: 460, height: 200,
      series: [{}, ...SERIES.map(([label, stroke]) => ({ label, stroke, width: 2 }))],
      axes: [{}, { size: 50 }],
    };
    charts[id] = new uPlot(opts, data, document.getElementById(id));
  } else {
    charts[id].setData(data);
  }
}

function summary(node) {
  const box = document.getElementById("summary");
  box.replaceChildren();
  const cards = [
    ["capacity", `${fmt(node.capacity.cores)} cores / ${node.capacity.memory_mb} MB`],
    ["basic service", `${fmt(node.basic_service.cores)} cores / ${node.basic_service.memory_mb} MB`],
    ["allocated", `${fmt(node.allocated.cores)} cores / ${node.allocated.memory_mb} MB`],
    ["free", `${fmt(node.free.cores)} cores / ${node.free.memory_mb} MB`],
    ["unit", `${fmt(node.unit.cores)} core / ${node.unit.memory_mb} MB`],
    ["admission", node.admission],
    ["auto-scaling every", `${fmt(node.autoscale_interval_s, 1)} s`],
  ];
  for (const [label, value] of cards) {
    const c = el("div", null, "card");
    c.append(el("span", label), el("b", value));
    box.append(c);
  }
}

function servers(list) {
  const body = document.querySelector("#servers tbody");
  body.replaceChildren();
  document.getElementById("server-count").textContent = `(${list.length})`;
  for (const s of list) {
    const tr = el("tr");
    tr.dataset.server = s.id;
    tr.dataset.state = s.state;
    const over = s.latency_ms !== null && s.latency_ms > s.objective_ms;
    if (over) tr.classList.add("over");
    const latency = `${fmt(s.latency_ms, 1)} / ${fmt(s.objective_ms, 1)} ms`;
    const cells = [s.id, s.app, s.owner, s.priority, fmt(s.units),
      `${fmt(s.limits.cores)} cores / ${s.limits.memory_mb} MB`, latency, s.users, s.state];
    cells.forEach((v, i) => tr.append(el("td", v, i === 6 ? "latency" : "")));
    body.append(tr);
  }
}

function describe(ev) {
  const d = ev.data || {};
  if (ev.type === "server.scaled" && d.from && d.to) {
    return `${fmt(d.from.cores)} → ${fmt(d.to.cores)} cores, ${d.from.memory_mb} → ${d.to.memory_mb} MB`;
  }
  if (ev.type === "server.terminated") return `${d.keys_migrated ?? 0} keys merged back`;
  if (ev.type === "server.migration_failed") return d.error || "";
  if (ev.type === "server.limits_restored") return `found ${JSON.stringify(d.found || {})}`;
  return "";
}

function decisions(events, rounds) {
  const items = events.map((ev) => ({
    at: ev.at, kind: ev.type.replace("server.", ""),
    text: `${ev.server_id} (${ev.app}) because ${ev.reason} ${describe(ev)}`,
  }));
  for (const r of rounds) {
    const acts = r.actions.map((a) => `${a.action} ${a.server_id}: ${a.reason}`).join("; ");
    items.push({
      at: r.at, kind: "round",
      text: `${fmt(r.duration_s, 3)} s, ${r.error ? "error: " + r.error : acts || "nothing to do"}`,
    });
  }
  items.sort((a, b) => b.at - a.at);
  const list = document.getElementById("decisions");
  list.replaceChildren();
  for (const it of items.slice(0, 60)) {
    const li = el("li");
    li.append(el("time", new Date(it.at * 1000).toLocaleTimeString()),
      el("span", it.kind, `kind ${it.kind}`), el("span", it.text));
    list.append(li);
  }
}

function status(text, ok) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = `status ${ok ? "ok" : "bad"}`;
}

async function poll() {
  try {
    const resp = await fetch("/v1/dashboard", { headers: { Authorization: `Bearer ${token}` } });
    if (resp.status === 401) {
      sessionStorage.removeItem("enorm-token");
      showLogin("token refused");
      return;
    }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const view = await resp.json();
    document.getElementById("node-name").textContent = view.node.name;
    document.title = `enorm ${view.node.name}`;
    summary(view.node);
    chart("chart-cores", view.history, "cores");
    chart("chart-memory", view.history, "memory_mb");
    servers(view.servers);
    decisions(view.decisions, view.rounds);
    status(`updated ${new Date(view.now * 1000).toLocaleTimeString()}`, true);
    document.body.dataset.updated = String(view.now);
  } catch (err) {
    status(`node not reachable (${err.message})`, false);
  }
  setTimeout(poll, POLL_MS);
}

function showLogin(why) {
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  status(why, false);
}

function start() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("enorm-token", fromHash);
    history.replaceState(null, "", location.pathname);  // keep it out of the address bar
  }
  token = sessionStorage.getItem("enorm-token");
  document.getElementById("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("enorm-token", document.getElementById("token").value);
    location.reload();
  });
  if (!token) return showLogin("token needed");
  document.getElementById("main").hidden = false;
  poll();
}

start();
