// medrelay console: local times, confirmations, live dashboard counters and sparklines.
// No framework, no other origin; every page works without this file.
"use strict";

function localTimes(root) {
  for (const t of (root || document).querySelectorAll("time[datetime]")) {
    const d = new Date(t.getAttribute("datetime"));
    if (!isNaN(d)) {
      t.textContent = d.toLocaleString();
      t.title = t.getAttribute("datetime") + " (UTC)";
    }
  }
}

function confirmations() {
  for (const b of document.querySelectorAll("[data-confirm]")) {
    b.addEventListener("click", (ev) => {
      if (!window.confirm(b.getAttribute("data-confirm"))) ev.preventDefault();
    });
  }
}

// Deltas between consecutive samples ([time, a, b] totals) as an SVG polyline.
function spark(svg, history, index) {
  const w = +svg.getAttribute("width"), h = +svg.getAttribute("height");
  const deltas = [];
  for (let i = 1; i < history.length; i++) deltas.push(Math.max(0, history[i][index] - history[i - 1][index]));
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  if (deltas.length < 2) return;
  const max = Math.max(1, ...deltas);
  const step = w / (deltas.length - 1);
  const points = deltas.map((v, i) => `${(i * step).toFixed(1)},${(h - 1 - (v / max) * (h - 2)).toFixed(1)}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "currentColor");
  line.setAttribute("stroke-width", "1.5");
  svg.appendChild(line);
  const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
  title.textContent = `last ${deltas.length * 10} s: ${deltas.reduce((a, b) => a + b, 0)} (max ${max} per 10 s)`;
  svg.appendChild(title);
}

function setField(scope, name, value) {
  const el = scope.querySelector(`[data-field="${name}"]`);
  if (el && el.textContent !== String(value)) el.textContent = value;
}

function paint(data) {
  for (const ch of data.channels) {
    const sec = document.querySelector(`section[data-channel="${CSS.escape(ch.name)}"]`);
    if (!sec) continue;
    for (const k of ["received", "acked", "rejected", "queue_depth"]) setField(sec.querySelector("table"), k, ch[k]);
    const status = sec.querySelector('[data-field="status"]');
    if (status) {
      status.textContent = ch.listening ? "listening" : "down";
      status.className = ch.listening ? "up" : "down";
    }
    const deadCell = sec.querySelector('table [data-field="dead"]');
    if (deadCell && String(ch.dead) !== deadCell.textContent) {
      deadCell.textContent = "";
      if (ch.dead) {
        const a = document.createElement("a");
        a.href = `/dead-letters?channel=${encodeURIComponent(ch.name)}`;
        a.textContent = ch.dead;
        deadCell.appendChild(a);
      } else deadCell.textContent = "0";
    }
    const svg = sec.querySelector(`svg[data-spark="${CSS.escape(ch.name)}"]`);
    if (svg) spark(svg, ch.history, 1);
    for (const r of ch.routes) {
      const row = sec.querySelector(`tr[data-route="${CSS.escape(ch.name + "/" + r.name)}"]`);
      if (!row) continue;
      for (const k of ["delivered", "filtered", "failed", "queue_depth", "dead"]) setField(row, k, r[k]);
      setField(row, "last_error", r.last_error ? r.last_error.error.slice(0, 120) : "");
      const rs = row.querySelector("svg[data-spark]");
      if (rs) spark(rs, r.history, 1);
    }
  }
  const up = document.getElementById("updated");
  if (up) {
    up.setAttribute("datetime", data.at);
    localTimes(up.parentNode);
  }
}

function live() {
  const box = document.querySelector("[data-live]");
  if (!box) return;
  const initial = document.getElementById("initial");
  if (initial) paint(JSON.parse(initial.textContent));
  const url = box.getAttribute("data-live");
  const tick = async () => {
    try {
      const r = await fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}});
      if (r.status === 401) { window.location = "/login?next=/"; return; }
      if (r.ok) paint(await r.json());
    } catch (e) { /* the engine restarting: try again at the next tick */ }
  };
  setInterval(tick, 5000);
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes();
  confirmations();
  live();
});
