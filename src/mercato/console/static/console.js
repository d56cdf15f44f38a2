// The Mercato console: one EventSource of snapshots, rendered into the page; charts are SVG polylines.
"use strict";

const $ = (id) => document.getElementById(id);
const history = { sagas: [], completed: [], rss: [], burn: [] };
const HISTORY = 120;
let source = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else if (k === "onclick") node.addEventListener("click", v);
    else node[k] = v;
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  return node;
}

function push(series, value) {
  series.push(value);
  if (series.length > HISTORY) series.shift();
}

function chart(svg, seriesList, colors) {
  const [, , width, height] = svg.getAttribute("viewBox").split(" ").map(Number);
  const max = Math.max(1, ...seriesList.flat());
  svg.replaceChildren();
  seriesList.forEach((series, i) => {
    const step = width / Math.max(1, HISTORY - 1);
    const offset = HISTORY - series.length; // the newest point at the right edge
    const points = series.map((v, j) => `${((offset + j) * step).toFixed(1)},${(height - 2 - (v / max) * (height - 4)).toFixed(1)}`);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("stroke", colors[i]);
    svg.append(line);
  });
  const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
  label.setAttribute("x", "4"); label.setAttribute("y", "10"); label.setAttribute("font-size", "10");
  label.textContent = `max ${max.toLocaleString()}`;
  svg.append(label);
}

function dl(target, pairs) {
  target.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

async function action(method, url, body) {
  const response = await fetch(url, {
    method, credentials: "same-origin",
    headers: { "X-Console": "1", "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) alert(`${method} ${url}: ${response.status} ${await response.text()}`);
  return response;
}

function render(s) {
  $("processes").replaceChildren(...(s.processes || []).map((q) => el("li", { class: q.last_seen_s < 10 ? "ok" : "bad", "data-process": q.process },
    `${q.process}: ${q.last_seen_s === 0 ? "this process" : `seen ${q.last_seen_s} s ago`}`)));
  const p = s.process || {};
  dl($("process"), [["pid", p.pid], ["uptime", `${p.uptime_s} s`], ["CPU", `${(p.cpu_s || 0).toFixed(1)} s`],
    ["RSS", `${((p.rss_bytes || 0) / 1048576).toFixed(1)} MiB`], ["open fds", p.open_fds]]);
  push(history.rss, (p.rss_bytes || 0) / 1048576);
  chart($("chart-rss"), [history.rss], ["#3d6fb6"]);

  const health = Array.isArray(s.health) ? s.health : [];
  $("health").replaceChildren(...health.map((c) => el("li", { class: c.ok ? "ok" : "bad", "data-check": c.name },
    `${c.name}: ${c.ok ? "ok" : "DOWN " + (c.error || "")} (${c.duration_ms} ms)`)));

  const slo = s.slo || {};
  $("slo").textContent = `availability ${slo.objective * 100} %: ${slo.errors} errors / ${slo.requests} requests, burn rate ${slo.burn_rate}`;
  push(history.burn, slo.burn_rate || 0);
  chart($("chart-burn"), [history.burn], ["#b3261e"]);

  $("protection").replaceChildren(...(s.protection || []).map((m) => el("tr", {},
    el("td", {}, m.metric), el("td", { class: "steps" }, m.labels), el("td", {}, m.value))));
  dl($("connections"), Object.entries(s.connections || {}).map(([k, v]) => [k, v]));

  const sagas = s.sagas || {};
  const counts = sagas.counts || {};
  $("saga-counts").textContent = Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(" · ");
  push(history.sagas, (counts.running || 0) + (counts.compensating || 0));
  push(history.completed, counts.completed || 0);
  chart($("chart-sagas"), [history.sagas, history.completed], ["#a66b00", "#2a7a3b"]);
  $("sagas").replaceChildren(...(sagas.items || []).map((saga) => el("tr", { "data-order-id": saga.order_id, "data-status": saga.status },
    el("td", {}, saga.type), el("td", {}, saga.order_id.slice(0, 13) + "…"),
    el("td", { class: `status-${saga.status}` }, saga.status),
    el("td", { class: "steps" }, saga.steps.map((h) => `${h.direction === "compensate" ? "↶ " : ""}${h.step} ${h.outcome}${h.attempt > 1 ? " #" + h.attempt : ""} (${h.ms} ms)`).join(" → ")),
    el("td", {}, saga.failure || ""))));

  const breakers = Array.isArray(s.breakers) ? s.breakers : [];
  $("breakers").replaceChildren(...breakers.map((b) => el("tr", { "data-breaker": b.name, "data-state": b.state },
    el("td", {}, b.name), el("td", {}, b.process), el("td", { class: `state-${b.state}` }, b.state),
    el("td", {}, b.calls), el("td", {}, `${Math.round((b.failure_rate || 0) * 100)} %`))));

  const faults = s.faults || {};
  $("faults").replaceChildren(...Object.entries(faults).map(([name, f]) => {
    const state = f.unreachable ? `unreachable` : f.outage_active ? `OUTAGE (${Math.round(f.outage_remaining_s)} s left)`
      : `errors ${Math.round((f.error_rate || 0) * 100)} %, latency p50 ${f.latency_p50_ms || 0} ms`;
    return el("div", { class: "fault-row", "data-provider": name },
      el("strong", {}, name), el("span", { class: f.outage_active ? "bad" : "", "data-fault-state": name }, state),
      el("button", { type: "button", id: `fault-${name}-outage`, onclick: () => action("PUT", `/console/faults/${name}`, { outage_for_s: 60 }) }, "outage 60 s"),
      el("button", { type: "button", id: `fault-${name}-errors`, onclick: () => action("PUT", `/console/faults/${name}`, { error_rate: 0.5 }) }, "50 % errors"),
      el("button", { type: "button", id: `fault-${name}-slow`, onclick: () => action("PUT", `/console/faults/${name}`, { latency_p50_ms: 300, latency_p99_ms: 1500 }) }, "slow"),
      el("button", { type: "button", id: `fault-${name}-clear`, onclick: () => action("PUT", `/console/faults/${name}`, {}) }, "clear"));
  }));

  $("lag").replaceChildren(...(s.lag || []).map((l) => el("tr", { "data-group": l.group }, el("td", {}, l.group), el("td", {}, l.topic), el("td", {}, l.messages))));
  const outbox = s.outbox || {};
  $("outbox").textContent = Object.keys(outbox).length ? `outbox: ${Object.entries(outbox).map(([k, v]) => `${k} ${v}`).join(", ")}` : "";

  const dead = Array.isArray(s.dead_letters) ? s.dead_letters : [];
  $("dead-letters").replaceChildren(...dead.map((d) => el("tr", { "data-dead-letter": d.id, "data-status": d.status },
    el("td", {}, d.group), el("td", {}, d.type), el("td", {}, d.attempts), el("td", {}, d.status), el("td", {}, (d.error || "").slice(0, 80)),
    el("td", {}, d.status === "dead" ? el("button", { type: "button", class: "replay", onclick: () => action("POST", `/console/dead-letters/${d.id}/replay`) }, "replay") : ""))));
}

async function loadLabs() {
  const response = await fetch("/console/labs", { credentials: "same-origin" });
  if (!response.ok) return;
  const labs = await response.json();
  $("labs").replaceChildren(...labs.map((lab) => {
    const latest = lab.latest;
    const word = !latest ? "never run" : latest.held === true ? "held" : latest.held === false ? "did not hold" : "not judged";
    const detail = el("td", { class: latest && latest.held === false ? "bad" : latest && latest.held ? "ok" : "" }, word,
      ...(latest ? [el("br"), el("small", {}, `${latest.run}: ${(latest.verdict || []).slice(0, 3).join("; ")}`)] : []));
    const figure = latest && latest.figure ? el("img", { class: "figure", src: `/console/labs/${lab.name}/figure`, alt: `${lab.name} figure` }) : "";
    return el("tr", { "data-lab": lab.name }, el("td", {}, lab.name), el("td", {}, lab.guide), el("td", {}, lab.claim), detail, el("td", {}, figure));
  }));
}

function showTab(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.tab === name));
  $("live").hidden = name !== "live";
  $("lab").hidden = name !== "lab";
  if (name === "lab") loadLabs();
}

function connect() {
  if (source) source.close();
  source = new EventSource("/console/events");
  source.addEventListener("snapshot", (event) => {
    $("connection").textContent = "live";
    $("connection").classList.add("live");
    $("login").hidden = true;
    $("logout").hidden = false;
    if ($("lab").hidden) $("live").hidden = false;
    render(JSON.parse(event.data));
  });
  source.addEventListener("session", () => { source.close(); showLogin(); });
  source.onerror = async () => {
    $("connection").textContent = "reconnecting";
    $("connection").classList.remove("live");
    const probe = await fetch("/console/labs", { credentials: "same-origin" });
    if (probe.status === 401) { source.close(); showLogin(); }
  };
}

function showLogin() {
  $("login").hidden = false;
  $("live").hidden = true;
  $("lab").hidden = true;
  $("logout").hidden = true;
  $("connection").textContent = "offline";
}

async function login(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  $("login-error").textContent = "";
  const answer = await fetch("/v1/auth/login", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ email: form.get("email"), password: form.get("password") }),
  });
  if (!answer.ok) { $("login-error").textContent = `login refused (${answer.status})`; return; }
  const { access_token: token } = await answer.json();
  const session = await fetch("/console/session", { method: "POST", credentials: "same-origin", headers: { Authorization: `Bearer ${token}` } });
  if (!session.ok) { $("login-error").textContent = "this account is not staff"; return; }
  connect();
}

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", async () => { await fetch("/console/session", { method: "DELETE" }); if (source) source.close(); showLogin(); });
  document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => showTab(t.dataset.tab)));
  const probe = await fetch("/console/labs", { credentials: "same-origin" });
  if (probe.status === 401) showLogin(); else { $("live").hidden = false; connect(); }
});
