"""The heartbeat dashboard: one self-contained HTML page (inline CSS and JS, no CDN).

Rules of this page:

* It holds no data: it polls `/snapshot` every second and redraws, so it updates live
  without reloading and works on a machine with no network.
* With a monitor token, open it as `http://HOST:PORT/#token=TOKEN`: the part after `#`
  never leaves the browser, and the page sends it as `Authorization: Bearer`.
* Names come from registrations (untrusted): they are set with `textContent`, never
  parsed as HTML.
* Rows carry `data-node` and `data-state` so a browser test can find a node and its state.
"""

from __future__ import annotations

from typing import Final

__all__ = ["PAGE"]

PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mesh monitor</title>
<style>
:root{--bg:#0f1419;--panel:#182028;--line:#2a3440;--text:#d8dee6;--dim:#8b97a5;
--up:#3fb950;--suspect:#d29922;--dead:#f85149;--a:#58a6ff;--b:#bc8cff;--c:#f0883e}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;background:var(--bg);color:var(--text)}
header{display:flex;align-items:center;gap:16px;padding:10px 20px;border-bottom:1px solid var(--line)}
header h1{font-size:18px;margin:0}
.pill{padding:2px 10px;border-radius:10px;font-size:12px;font-weight:600;color:#000}
.up{background:var(--up)}.suspect{background:var(--suspect)}.dead,.stale{background:var(--dead)}
.dim{color:var(--dim)}
main{padding:16px 20px;display:grid;gap:16px;grid-template-columns:repeat(12,1fr)}
section{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:12px 14px;min-width:0}
section h2{font-size:13px;text-transform:uppercase;letter-spacing:.06em;color:var(--dim);margin:0 0 8px}
.kpis{grid-column:span 12;display:grid;grid-template-columns:repeat(auto-fit,minmax(130px,1fr));gap:12px}
.kpi b{display:block;font-size:22px;font-variant-numeric:tabular-nums}
.chart{grid-column:span 4}
.wide{grid-column:span 8}.narrow{grid-column:span 4}.full{grid-column:span 12}
@media (max-width:1100px){.chart,.wide,.narrow{grid-column:span 12}}
svg{width:100%;height:150px;display:block}
svg .grid{stroke:var(--line);stroke-width:1}
svg polyline{fill:none;stroke-width:2;vector-effect:non-scaling-stroke}
.legend span{margin-right:12px;font-size:12px}.legend i{display:inline-block;width:10px;height:3px;margin-right:4px;vertical-align:middle}
table{width:100%;border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);white-space:nowrap}
th{color:var(--dim);font-weight:500;font-size:12px}
td.svc{white-space:normal;color:var(--dim);font-size:12px}
.bar{width:120px;height:8px;background:var(--line);border-radius:4px;overflow:hidden}
.bar>div{height:100%}
#msg{color:var(--dead)}
</style></head>
<body>
<header><h1>mesh monitor</h1><span id="broker" class="dim"></span><span id="health" class="pill stale">connecting</span>
<span id="updated" class="dim"></span><span id="msg"></span></header>
<main>
<section class="kpis" id="kpis"></section>
<section class="chart"><h2>Throughput (commands/s)</h2><svg id="c-thr" viewBox="0 0 600 150" preserveAspectRatio="none"></svg><div class="legend" id="l-thr"></div></section>
<section class="chart"><h2>Latency (ms)</h2><svg id="c-lat" viewBox="0 0 600 150" preserveAspectRatio="none"></svg><div class="legend" id="l-lat"></div></section>
<section class="chart"><h2>Errors (per s, by category)</h2><svg id="c-err" viewBox="0 0 600 150" preserveAspectRatio="none"></svg><div class="legend" id="l-err"></div></section>
<section class="full"><h2>Brokers and nodes</h2><table><thead><tr><th>kind</th><th>name</th><th>state</th>
<th>last heartbeat</th><th>liveness</th><th>load</th><th>in flight</th><th>completed</th><th>services</th></tr></thead>
<tbody id="members"></tbody></table></section>
<section class="wide"><h2>Errors by code</h2><table><thead><tr><th>code</th><th>name</th><th>category</th><th>count</th></tr></thead>
<tbody id="errors"></tbody></table></section>
<section class="narrow"><h2>Cluster</h2><table><thead><tr><th>broker</th><th>role</th><th>state</th></tr></thead>
<tbody id="cluster"></tbody></table><h2 style="margin-top:14px">Events</h2><table><tbody id="events"></tbody></table></section>
</main>
<script>
"use strict";
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const headers = token ? {Authorization: "Bearer " + token} : {};
const $ = id => document.getElementById(id);
const COLORS = {a: "var(--a)", b: "var(--b)", c: "var(--c)", protocol: "var(--a)", security: "var(--dead)", system: "var(--suspect)"};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function row(cells) { const tr = el("tr"); for (const c of cells) tr.append(c instanceof Node ? c : el("td", c)); return tr; }
function td(child) { const t = el("td"); t.append(child); return t; }
function bar(fraction, color) {
  const b = el("div", null, "bar"), f = el("div");
  f.style.width = Math.max(0, Math.min(1, fraction)) * 100 + "%"; f.style.background = color;
  b.append(f); return b;
}
function ago(s) { return s < 1 ? "just now" : s < 90 ? s.toFixed(1) + " s ago" : Math.round(s / 60) + " min ago"; }
function num(x, d) { return x === null || x === undefined ? "–" : Number(x).toFixed(d); }
function bytes(n) { return n > 1 << 30 ? (n / (1 << 30)).toFixed(1) + " GiB" : (n / (1 << 20)).toFixed(1) + " MiB"; }

function chart(svgId, legendId, history, series) {
  const svg = $(svgId), W = 600, H = 150, n = history.length;
  let max = 0;
  for (const s of series) for (const p of history) max = Math.max(max, s.get(p) || 0);
  max = max > 0 ? max * 1.15 : 1;
  const parts = [];
  for (let i = 1; i < 4; i++) parts.push(`<line class="grid" x1="0" x2="${W}" y1="${H * i / 4}" y2="${H * i / 4}"/>`);
  for (const s of series) {
    const pts = history.map((p, i) => {
      const v = s.get(p);
      return v === null || v === undefined ? null : `${(n < 2 ? W : i * W / (n - 1)).toFixed(1)},${(H - v / max * H).toFixed(1)}`;
    }).filter(Boolean).join(" ");
    parts.push(`<polyline points="${pts}" style="stroke:${s.color}"/>`);
  }
  svg.innerHTML = parts.join("");  // numbers and fixed colours only
  const legend = $(legendId); legend.replaceChildren();
  for (const s of series) {
    const last = n ? s.get(history[n - 1]) : null, item = el("span"), sw = el("i");
    sw.style.background = s.color; item.append(sw, `${s.label} ${num(last, s.digits)}`); legend.append(item);
  }
  legend.append(el("span", `max ${num(max / 1.15, 1)} · last ${n} s`, "dim"));
}

function render(snap) {
  const v = snap.varz, nodes = snap.nodes.nodes, hist = snap.history;
  $("broker").textContent = "broker " + snap.broker;
  const health = snap.healthz.ready ? ["up", "live"] : ["suspect", "draining"];
  $("health").className = "pill " + health[0]; $("health").textContent = health[1];
  $("updated").textContent = "updated " + new Date(snap.time * 1000).toLocaleTimeString();
  const count = s => nodes.filter(n => n.state === s).length;
  const kpis = [["throughput", num(v.throughput.commands_per_s, 0) + "/s"], ["p50", num(v.latency_ms.p50, 2) + " ms"],
    ["p95", num(v.latency_ms.p95, 2) + " ms"], ["p99", num(v.latency_ms.p99, 2) + " ms"],
    ["in flight", Object.values(v.commands.in_flight).reduce((a, b) => a + b, 0)], ["queued", v.queued],
    ["nodes up / suspect / dead", `${count("up")} / ${count("suspect")} / ${count("dead")}`], ["clients", v.clients],
    ["errors", snap.errors.total], ["memory", bytes(v.memory.rss_bytes)], ["CPU", num(v.cpu.percent, 0) + " %"],
    ["uptime", Math.floor(v.uptime_s / 3600) + " h " + Math.floor(v.uptime_s % 3600 / 60) + " min"]];
  $("kpis").replaceChildren(...kpis.map(([k, x]) => { const d = el("div", k, "kpi dim"); d.append(el("b", x)); d.lastChild.style.color = "var(--text)"; return d; }));
  chart("c-thr", "l-thr", hist, [{label: "commands/s", color: COLORS.a, digits: 0, get: p => p.commands_per_s}]);
  chart("c-lat", "l-lat", hist, [{label: "p50", color: COLORS.a, digits: 2, get: p => p.p50_ms},
                                 {label: "p99", color: COLORS.c, digits: 2, get: p => p.p99_ms}]);
  chart("c-err", "l-err", hist, ["protocol", "security", "system"].map(c => ({label: c, color: COLORS[c], digits: 2, get: p => p.errors_per_s[c]})));

  const members = [];
  for (const b of snap.cluster.brokers) {
    const tr = row(["broker", b.name, td(el("span", b.state, "pill " + b.state)), ago(snap.time - b.last_seen),
      td(bar(0, "var(--up)")), "", "", "", b.role]);
    tr.dataset.broker = b.name; tr.dataset.state = b.state; members.push(tr);
  }
  for (const n of nodes) {
    const color = `var(--${n.state})`;
    const tr = row(["node", n.name, td(el("span", n.state, "pill " + n.state)), ago(n.silence_s),
      td(bar(n.state === "dead" ? 1 : n.silence_s / n.liveness_s, color)), td(bar(n.load, "var(--a)")),
      `${n.in_flight} / ${n.capacity}`, n.completed, el("td", n.services.join(", "), "svc")]);
    tr.dataset.node = n.name; tr.dataset.state = n.state; tr.title = "id " + n.id; members.push(tr);
  }
  $("members").replaceChildren(...members);
  const errs = snap.errors.by_code.map(e => row([e.code, e.name, e.category, e.count]));
  $("errors").replaceChildren(...(errs.length ? errs : [row(["", "no errors", "", ""])]));
  $("cluster").replaceChildren(...snap.cluster.brokers.map(b => row([b.name, b.role, b.state])));
  const ev = snap.events;
  $("events").replaceChildren(...[["topics", ev.topics], ["retained events", ev.retained_events],
    ["retained", bytes(ev.retained_bytes)], ["subscribers", ev.subscribers], ["missed by subscribers", ev.missed]].map(row));
}

async function poll() {
  try {
    const r = await fetch("/snapshot", {headers, cache: "no-store"});
    if (r.status === 401) { $("msg").textContent = "unauthorised: open this page as /#token=TOKEN"; }
    else if (!r.ok) { $("msg").textContent = "broker answered " + r.status; }
    else { render(await r.json()); $("msg").textContent = ""; }
  } catch (e) {
    $("health").className = "pill stale"; $("health").textContent = "unreachable";
    for (const tr of $("members").children) { tr.dataset.state = "dead"; tr.style.opacity = 0.5; }
  }
  setTimeout(poll, 1000);
}
poll();
</script>
</body></html>
"""
