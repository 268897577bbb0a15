// The pgtenant control panel: a single page over the HTTP API (/api), served from the binary. No framework,
// no CDN. The API token is kept in this tab's sessionStorage only.
"use strict";

const $ = (sel) => document.querySelector(sel);
const STATES = ["pending", "bulk_copy", "dual_write", "cutover_paused", "migrated", "completed"];
let token = sessionStorage.getItem("pgtenant-token") || "";
let stream = null; // the monitor's event stream
let tenantPage = { offset: 0, limit: 50, search: "" };

async function api(method, path, body) {
  const opts = { method, headers: { Authorization: "Bearer " + token } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  const data = await resp.json().catch(() => ({ ok: false, error: { message: resp.statusText } }));
  if (resp.status === 401) { logout(); }
  if (!data.ok) { throw new Error(data.error ? data.error.message : resp.statusText); }
  return data.result;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "-" : String(c)));
  return e;
}

function rows(table, list, cells) {
  const body = $(table + " tbody");
  body.replaceChildren(...list.map((item) => el("tr", {}, ...cells(item).map((c) => el("td", {}, c)))));
}

function tile(key, value) {
  return el("div", { class: "tile" }, el("div", { class: "v" }, value), el("div", { class: "k" }, key));
}

const place = (p) => (p ? `${p.backend}/${p.database}${p.schema ? "/" + p.schema : ""}` : "-");
const ms = (v) => (v == null ? "-" : `${Number(v).toFixed(1)} ms`);
const secs = (v) => (v == null ? "-" : v >= 90 ? `${(v / 60).toFixed(1)} min` : `${Number(v).toFixed(1)} s`);
const badge = (s) => el("span", { class: "badge " + s }, s);
// A tenant name in a URL path is always encoded: a name taken from the address bar could otherwise add path
// segments (`..%2Fpause`) and turn a click into another request.
const seg = (s) => encodeURIComponent(s);
const monitorLink = (t) => el("a", { href: "#monitor/" + seg(t) }, t);

function tier(t) {
  if (t.tenant_column) return "shared rows";
  if (t.schema) return "schema";
  return "database";
}

// Views ------------------------------------------------------------------------------------------------------

async function dashboard() {
  const [hist, migr, stats] = await Promise.all([
    api("GET", "/api/history?limit=1"),
    api("GET", "/api/migrations"),
    api("GET", "/api/stats"),
  ]);
  const s = hist.summary;
  $("#tiles").replaceChildren(
    tile("active moves", s.active),
    tile("completed today", s.completed_today),
    tile("failed in 7 days", s.failed_last_7_days),
    tile("average duration", secs(s.average_duration_s)),
    tile("pause p50", ms(s.pause_p50_ms)),
    tile("pause p99", ms(s.pause_p99_ms)),
    tile("tenants", stats.tenants),
    tile("client sessions", stats.client_sessions),
  );
  const active = migr.migrations.filter((m) => !["completed", "rolled_back"].includes(m.state));
  rows("#active", active, (m) => [monitorLink(m.tenant), badge(m.state), `${m.progress_percent}%`,
    place(m.source), place(m.target), ms(m.last_pause_ms)]);
}

async function tenants() {
  const q = new URLSearchParams({ offset: tenantPage.offset, limit: tenantPage.limit, search: tenantPage.search });
  const [list, stats] = await Promise.all([api("GET", "/api/tenants?" + q), api("GET", "/api/stats")]);
  const tps = Object.fromEntries((stats.tenant_stats || []).map((t) => [t.tenant, t.xact_per_s]));
  const end = Math.min(list.offset + list.tenants.length, list.total);
  $("#tenant-count").textContent = `${list.total ? list.offset + 1 : 0}-${end} of ${list.total}`;
  $("#prev").disabled = list.offset === 0;
  $("#next").disabled = end >= list.total;
  rows("#tenant-table", list.tenants, (t) => [
    t.tenant, tier(t), t.backend, t.database, t.schema, t.sessions,
    tps[t.tenant] == null ? "0.0" : tps[t.tenant].toFixed(1),
    t.gate.paused ? badge("paused") : "open",
    el("button", { class: "secondary", onclick: () => gate(t.tenant, t.gate.paused) }, t.gate.paused ? "Resume" : "Pause"),
  ]);
}

async function gate(tenant, paused) {
  try { await api("POST", `/api/tenants/${seg(tenant)}/${paused ? "resume" : "pause"}`, {}); }
  catch (e) { alert(e.message); }
  tenants();
}

async function wizard() {
  const [backends, list] = await Promise.all([api("GET", "/api/backends"), api("GET", "/api/tenants?limit=1000")]);
  $("#w-backend").replaceChildren(...backends.backends.map((b) => el("option", { value: b.backend }, b.backend)));
  $("#tenant-names").replaceChildren(...list.tenants.map((t) => el("option", { value: t.tenant })));
  $("#estimate-out").hidden = true;
}

function moveRequest() {
  const req = { tenant: $("#w-tenant").value.trim(), to: $("#w-backend").value, verify: $("#w-verify").value,
    cutover: $("#w-cutover").value };
  for (const [id, key] of [["#w-database", "database"], ["#w-schema", "schema"], ["#w-window", "cutover_window"]]) {
    if ($(id).value.trim()) req[key] = $(id).value.trim();
  }
  return req;
}

async function estimate() {
  const out = $("#estimate-out");
  out.hidden = false;
  out.replaceChildren(el("p", {}, "Estimating..."));
  let e;
  try { e = await api("POST", "/api/estimate", moveRequest()); }
  catch (err) { out.replaceChildren(el("p", { class: "error" }, err.message)); return; }
  const risks = [...e.problems, ...e.tables_without_primary_key.map((t) => `table ${t} has no primary key (rows matched on all columns)`),
    ...e.missing_on_target.map((m) => `target lacks ${m}`)];
  const dl = el("dl", { class: "est" },
    el("dt", {}, "tables"), el("dd", {}, e.tables.length),
    el("dt", {}, "rows"), el("dd", {}, e.rows.toLocaleString()),
    el("dt", {}, "bytes"), el("dd", {}, `${(e.bytes / 1e6).toFixed(1)} MB`),
    el("dt", {}, "copy"), el("dd", {}, `${secs(e.copy_s)} (${e.copy_rows_per_s.from})`),
    el("dt", {}, "catch-up"), el("dd", {}, secs(e.catch_up_s)),
    el("dt", {}, "verification"), el("dd", {}, secs(e.verify_s)),
    el("dt", {}, "expected pause"), el("dd", {}, ms(e.expected_pause_ms)),
    el("dt", {}, "preflight"), el("dd", {}, e.preflight_passed ? "passed" : "refused"));
  const at = el("input", { id: "w-at", placeholder: "+2h, 02:30 or 2026-12-07T02:30Z" });
  const start = el("button", { id: "start-now", onclick: () => startMove(null) }, "Start now");
  const later = el("button", { class: "secondary", id: "schedule", onclick: () => startMove(at.value.trim()) }, "Schedule");
  start.disabled = later.disabled = !e.preflight_passed;
  out.replaceChildren(el("h2", {}, `Estimate for ${e.tenant}`), dl,
    el("ul", {}, ...risks.map((r) => el("li", { class: "risk" }, r))),
    el("div", { class: "actions" }, start, at, later), el("p", { id: "start-error", class: "error" }));
}

async function startMove(at) {
  const req = moveRequest();
  if ($("#w-backup").checked) req.backup = true;
  if (at) req.at = at;
  try {
    await api("POST", "/api/migrations", req);
    location.hash = at ? "#migrations" : "#monitor/" + seg(req.tenant);
  } catch (e) { $("#start-error").textContent = e.message; }
}

async function migrations() {
  const [m, q] = await Promise.all([api("GET", "/api/migrations"), api("GET", "/api/queue")]);
  const queued = q.queued.map((x) => ({ tenant: x.request.tenant, state: "queued", progress_percent: 0,
    source: null, target: { backend: x.request.to, database: x.request.database || "" }, started_at: "at " + x.at }));
  rows("#migration-table", [...queued, ...m.migrations], (x) => [monitorLink(x.tenant), badge(x.state),
    `${x.progress_percent}%`, place(x.source), place(x.target), x.started_at]);
}

function showStatus(s) {
  $("#m-state").textContent = s.state;
  $("#m-state").className = "badge " + s.state;
  const rowsText = `${s.rows_copied.toLocaleString()} / ${s.rows_total.toLocaleString()} rows, lag ${s.lag_events}`;
  $("#m-detail").textContent = `${rowsText}, last pause ${ms(s.last_pause_ms)}, ${place(s.source)} → ${place(s.target)}`;
  $("#m-bar").style.width = `${s.progress_percent}%`;
  const spent = {};
  for (const st of s.steps || []) spent[st.state] = (spent[st.state] || 0) + st.seconds;
  const at = STATES.indexOf(s.phase);
  $("#m-steps").replaceChildren(...STATES.map((name, i) =>
    el("li", { class: i < at || s.state === "completed" ? "done" : i === at ? "now" : "" },
      `${name}${spent[name] != null ? " " + secs(spent[name]) : ""}`)));
}

function log(text) {
  const li = el("li", {}, `${new Date().toLocaleTimeString()}  ${text}`);
  $("#m-log").prepend(li);
}

async function monitor(tenant) {
  $("#m-tenant").textContent = tenant;
  $("#m-log").replaceChildren();
  $("#m-error").textContent = "";
  for (const b of document.querySelectorAll("#monitor [data-act]")) {
    b.onclick = () => act(tenant, b.dataset.act, b.dataset.confirm);
  }
  try { showStatus(await api("GET", "/api/migrations/" + seg(tenant))); } catch (e) { $("#m-error").textContent = e.message; }
  follow(tenant);
}

async function act(tenant, action, question) {
  if (question && !confirm(question)) return;
  $("#m-error").textContent = "";
  try {
    const r = await api("POST", `/api/migrations/${seg(tenant)}/${action}`, {});
    log(`${action}: ${r.pause_ms != null ? "pause " + ms(r.pause_ms) : r.passed != null ? (r.passed ? "passed" : "FAILED") : "done"}`);
  } catch (e) { $("#m-error").textContent = `${action}: ${e.message}`; }
}

// Server-sent events over fetch (EventSource cannot send the Authorization header).
async function follow(tenant) {
  if (stream) stream.abort();
  stream = new AbortController();
  try {
    const resp = await fetch(`/api/migrations/${seg(tenant)}/events`, { headers: { Authorization: "Bearer " + token }, signal: stream.signal });
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "", event = "message";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trimEnd();
        buf = buf.slice(nl + 1);
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) handle(event, JSON.parse(line.slice(5)));
        else if (line === "") event = "message";
      }
    }
  } catch (e) { /* aborted when the view changes */ }
}

function handle(event, data) {
  if (event === "progress") { if (!data.error) showStatus(data); return; }
  const d = data.data || {};
  if (event === "migration.state") log(`state ${d.from || "-"} → ${d.to}`);
  else if (event === "migration.cutover") log(`cutover ${d.outcome}, pause ${ms(d.pause_ms)}`);
  else if (event === "migration.verification") log(`verification ${d.level}: ${d.passed ? "passed" : "FAILED"} (${d.rows} rows)`);
  else if (event === "migration.failed") log(`FAILED: ${d.error}`);
}

async function history() {
  const h = await api("GET", "/api/history?limit=200");
  const s = h.summary;
  $("#h-tiles").replaceChildren(tile("completed today", s.completed_today), tile("failed in 7 days", s.failed_last_7_days),
    tile("average duration", secs(s.average_duration_s)), tile("pause p50", ms(s.pause_p50_ms)), tile("pause p99", ms(s.pause_p99_ms)));
  rows("#history-table", h.entries, (e) => [e.tenant, badge(e.outcome), place(e.source), place(e.target), e.ended_at,
    secs(e.duration_s), e.rows_copied.toLocaleString(), ms(e.pause_ms), e.started_by]);
}

async function audit() {
  const a = await api("GET", "/api/audit?tail=200");
  rows("#audit-table", a.entries.slice().reverse(), (e) => [e.seq, e.time, e.actor, e.command, e.tenant, e.result]);
}

// Navigation -------------------------------------------------------------------------------------------------

const VIEWS = { dashboard, tenants, wizard, migrations, history, audit };

async function route() {
  if (!token) { show("login"); return; }
  if (stream) { stream.abort(); stream = null; }
  const [name, arg] = (location.hash.slice(1) || "dashboard").split("/");
  show(name === "monitor" ? "monitor" : VIEWS[name] ? name : "dashboard");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === name);
  try {
    if (name === "monitor") await monitor(decodeURIComponent(arg || ""));
    else await (VIEWS[name] || dashboard)();
  } catch (e) { console.error(e); }
}

function show(id) {
  $("#login").hidden = id !== "login";
  $("#nav").hidden = id === "login";
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== id;
}

function logout() {
  token = "";
  sessionStorage.removeItem("pgtenant-token");
  show("login");
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  token = $("#token").value.trim();
  try {
    await api("GET", "/api/stats");
    sessionStorage.setItem("pgtenant-token", token);
    $("#login-error").textContent = "";
    route();
  } catch (e) {
    $("#login-error").textContent = "Sign-in failed: " + e.message;
    token = "";
  }
});
$("#logout").addEventListener("click", logout);
$("#estimate").addEventListener("click", estimate);
$("#tenant-search").addEventListener("input", (e) => { tenantPage.search = e.target.value; tenantPage.offset = 0; tenants(); });
$("#prev").addEventListener("click", () => { tenantPage.offset = Math.max(0, tenantPage.offset - tenantPage.limit); tenants(); });
$("#next").addEventListener("click", () => { tenantPage.offset += tenantPage.limit; tenants(); });
window.addEventListener("hashchange", route);
setInterval(() => {
  const name = (location.hash.slice(1) || "dashboard").split("/")[0];
  if (token && ["dashboard", "migrations"].includes(name)) VIEWS[name]().catch(() => {});
}, 3000);
route();
