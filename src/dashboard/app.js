// Fuke finance dashboard: reads /v1/usage and /v1/usage/budgets with a finance key and draws
// SVG charts. No dependencies; served from the binary.
"use strict";

const PALETTE = ["#2563eb", "#ea580c", "#059669", "#9333ea", "#db2777", "#0891b2", "#ca8a04", "#4b5563"];
const SVG = "http://www.w3.org/2000/svg";
const $ = (s) => document.querySelector(s);
let key = sessionStorage.getItem("fuke_key");

// `#key=…` signs in (for bookmarks and automation); the fragment never reaches a server and is
// removed from the address bar at once.
if (location.hash.startsWith("#key=")) {
  key = decodeURIComponent(location.hash.slice(5));
  sessionStorage.setItem("fuke_key", key);
  history.replaceState(null, "", location.pathname);
}

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: "Bearer " + key } });
  const body = await r.json();
  if (!r.ok) {
    const e = new Error(body.error ? body.error.message : r.statusText);
    e.status = r.status;
    throw e;
  }
  return body;
}

// Exact decimal strings from the API ("0.000190000") shown with 6 places; never summed as floats
// for display of totals (the API's totals are exact).
const usd = (s) => "$" + Number(s).toFixed(6);
const fmt = (n) => Number(n).toLocaleString("en-US");

function el(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(width, height) {
  return el("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img" });
}

function legend(tenants, colors) {
  const d = document.createElement("div");
  d.className = "legend";
  for (const t of tenants) {
    const s = document.createElement("span");
    const i = document.createElement("i");
    i.style.background = colors(t);
    s.append(i, t);
    d.append(s);
  }
  return d;
}

// Horizontal bars: one per row, length proportional to value.
function hbars(target, rows, color, label, kind) {
  const W = 900, rowH = 26, left = 160, right = 220;
  const max = Math.max(1, ...rows.map((r) => r.value));
  const s = svg(W, rows.length * rowH + 6);
  rows.forEach((r, i) => {
    const w = ((W - left - right) * r.value) / max;
    const y = i * rowH + 4;
    s.append(el("text", { x: 0, y: y + 15 }, r.name));
    s.append(el("rect", { x: left, y, width: w.toFixed(2), height: rowH - 8, fill: color(r),
      "data-kind": kind, "data-name": r.name, "data-value": r.value }));
    s.append(el("text", { x: left + w + 6, y: y + 15, "data-label": r.name }, label(r)));
  });
  target.replaceChildren(s);
}

// Stacked columns per day, one colour per tenant.
function columns(target, days, tenants, colors, valueOf, label, kind) {
  const W = 900, H = 220, bottom = 24, left = 70;
  const totals = days.map((d) => tenants.reduce((a, t) => a + valueOf(d, t), 0));
  const max = Math.max(1, ...totals);
  const bw = Math.max(4, Math.min(40, (W - left) / Math.max(1, days.length) - 6));
  const s = svg(W, H);
  s.append(el("text", { x: 0, y: 12 }, label(max)));
  s.append(el("line", { x1: left - 4, y1: 0, x2: left - 4, y2: H - bottom, stroke: "#9ca3af" }));
  days.forEach((d, i) => {
    let y = H - bottom;
    const x = left + i * (bw + 6);
    for (const t of tenants) {
      const v = valueOf(d, t);
      if (!v) continue;
      const h = ((H - bottom - 16) * v) / max;
      y -= h;
      s.append(el("rect", { x, y: y.toFixed(2), width: bw, height: h.toFixed(2), fill: colors(t),
        "data-kind": kind, "data-name": t, "data-day": d, "data-value": v }));
    }
    if (days.length <= 16 || i % Math.ceil(days.length / 8) === 0) {
      s.append(el("text", { x, y: H - 6 }, d.slice(5)));
    }
  });
  target.replaceChildren(s, legend(tenants, colors));
}

async function load() {
  const now = new Date();
  const from = new Date(now.getTime() - 30 * 86400000).toISOString().slice(0, 10);
  const q = `from=${from}`;
  const [byTenant, byDay, byModel, budgets] = await Promise.all([
    api(`/v1/usage?${q}&group_by=tenant`),
    api(`/v1/usage?${q}&group_by=day`),
    api(`/v1/usage?${q}&group_by=model`),
    api("/v1/usage/budgets"),
  ]);
  $("#range").textContent = `${byTenant.from.slice(0, 10)} – ${byTenant.to.slice(0, 10)} (UTC)`;
  const tenants = byTenant.data.map((l) => l.tenant).sort();
  const palette = new Map(tenants.map((t, i) => [t, PALETTE[i % PALETTE.length]]));
  const colors = (t) => palette.get(t);

  const t = byTenant.total;
  const totals = $("#totals");
  totals.replaceChildren();
  for (const [name, value, id] of [
    ["Spend", "$" + t.cost_usd, "total-spend"],
    ["Requests", fmt(t.requests), "total-requests"],
    ["Tokens", fmt(t.total_tokens), "total-tokens"],
    ["Cache hits", fmt(t.cache_hits), "total-hits"],
  ]) {
    const d = document.createElement("div");
    const b = document.createElement("b");
    b.id = id;
    b.textContent = value;
    d.append(name, b);
    totals.append(d);
  }

  hbars($("#spend-tenant"),
    byTenant.data.map((l) => ({ name: l.tenant, value: l.cost_nanousd, cost: l.cost_usd, tokens: l.total_tokens })),
    (r) => colors(r.name),
    (r) => `$${r.cost}  ·  ${fmt(r.tokens)} tokens`, "tenant-spend");

  // Every day of the range, so gaps show as gaps.
  const days = [];
  for (let t = Date.parse(byDay.from.slice(0, 10)); t < Date.parse(byDay.to); t += 86400000) {
    days.push(new Date(t).toISOString().slice(0, 10));
  }
  const cell = new Map();
  for (const l of byDay.data) cell.set(l.group + "|" + l.tenant, l);
  columns($("#spend-day"), days, tenants, colors,
    (d, t) => (cell.has(d + "|" + t) ? cell.get(d + "|" + t).cost_nanousd : 0),
    (max) => usd(max / 1e9), "day-spend");
  columns($("#tokens-day"), days, tenants, colors,
    (d, t) => (cell.has(d + "|" + t) ? cell.get(d + "|" + t).total_tokens : 0),
    (max) => fmt(max) + " tok", "day-tokens");

  const models = new Map();
  for (const l of byModel.data) {
    if (!models.has(l.group)) models.set(l.group, { name: l.group, value: 0, tokens: 0 });
    const m = models.get(l.group);
    m.value += l.cost_nanousd;
    m.tokens += l.total_tokens;
  }
  const top = [...models.values()].sort((a, b) => b.value - a.value).slice(0, 8);
  hbars($("#top-models"), top, () => "#6b7280",
    (r) => `${usd(r.value / 1e9)}  ·  ${fmt(r.tokens)} tokens`, "model-spend");

  const list = $("#budgets");
  list.replaceChildren();
  if (!budgets.data.length) list.textContent = "No tenant or key has a budget.";
  for (const b of budgets.data) {
    const pct = b.budget_nanousd > 0 ? (100 * b.spent_nanousd) / b.budget_nanousd : 0;
    const d = document.createElement("div");
    d.className = "budget";
    d.dataset.name = b.name;
    d.dataset.period = b.period;
    d.textContent = `${b.scope} ${b.name}, ${b.period}: $${b.spent_usd} of $${b.budget_usd} (${pct.toFixed(1)}%)`;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = Math.min(100, pct).toFixed(1) + "%";
    if (pct >= 100) fill.className = "over";
    bar.append(fill);
    d.append(bar);
    list.append(d);
  }
  document.body.dataset.loaded = "true";
}

function show(signedIn) {
  $("#login").hidden = signedIn;
  $("#board").hidden = !signedIn;
  $("#logout").hidden = !signedIn;
}

async function start() {
  if (!key) return show(false);
  show(true);
  try {
    await load();
  } catch (e) {
    if (e.status === 401 || e.status === 403) {
      sessionStorage.removeItem("fuke_key");
      key = null;
      show(false);
      $("#login-error").textContent = e.status === 403 ? "This key is not a finance or admin key." : "Unknown key.";
    } else {
      $("#error").textContent = "Could not load usage: " + e.message;
    }
  }
}

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  key = $("#key").value.trim();
  sessionStorage.setItem("fuke_key", key);
  $("#key").value = "";
  start();
});
$("#logout").addEventListener("click", () => {
  sessionStorage.removeItem("fuke_key");
  key = null;
  show(false);
});
start();
