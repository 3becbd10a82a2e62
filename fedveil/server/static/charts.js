// Small line charts on <canvas>: no library, nothing fetched from the internet.
"use strict";

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f",
                 "#7c2d12", "#1e3a8a"];

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toFixed(10));
  return ticks;
}

// series: [{name, points: [[x, y], ...], color?, dashed?}]; options: {yMin, yMax, xLabel, yLabel, hlines: [{y, label}]}
function drawLineChart(canvas, series, options) {
  const opts = options || {};
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 480;
  const cssH = canvas.clientHeight || 240;
  canvas.width = Math.round(cssW * dpr);
  canvas.height = Math.round(cssH * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const pad = { left: 48, right: 12, top: 12, bottom: 36 };
  const w = cssW - pad.left - pad.right;
  const h = cssH - pad.top - pad.bottom;
  const pts = series.flatMap((s) => s.points.filter((p) => p[1] !== null && Number.isFinite(p[1])));
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#64748b";
  if (pts.length === 0) {
    ctx.fillText(opts.empty || "no data yet", pad.left + 8, pad.top + h / 2);
    return;
  }
  let xMin = Math.min(...pts.map((p) => p[0]));
  let xMax = Math.max(...pts.map((p) => p[0]));
  if (xMax === xMin) { xMax = xMin + 1; }
  const hl = (opts.hlines || []).map((l) => l.y);
  let yMin = opts.yMin !== undefined ? opts.yMin : Math.min(...pts.map((p) => p[1]), ...hl);
  let yMax = opts.yMax !== undefined ? opts.yMax : Math.max(...pts.map((p) => p[1]), ...hl);
  if (yMax === yMin) { yMax = yMin + 1; }
  const span = yMax - yMin;  // breathing room where the caller did not fix the axis
  if (opts.yMin === undefined) yMin -= 0.08 * span;
  if (opts.yMax === undefined) yMax += 0.08 * span;
  const X = (x) => pad.left + ((x - xMin) / (xMax - xMin)) * w;
  const Y = (y) => pad.top + h - ((y - yMin) / (yMax - yMin)) * h;
  // grid and axes
  ctx.strokeStyle = "#e2e8f0";
  ctx.lineWidth = 1;
  for (const t of niceTicks(yMin, yMax, 5)) {
    ctx.beginPath(); ctx.moveTo(pad.left, Y(t)); ctx.lineTo(pad.left + w, Y(t)); ctx.stroke();
    ctx.fillText(String(+t.toFixed(3)), 4, Y(t) + 4);
  }
  const xTicks = niceTicks(xMin, xMax, Math.min(8, Math.max(1, xMax - xMin))).filter((t) => Number.isInteger(t));
  for (const t of xTicks) {
    ctx.fillText(String(t), X(t) - 4, pad.top + h + 16);
  }
  ctx.strokeStyle = "#94a3b8";
  ctx.beginPath(); ctx.moveTo(pad.left, pad.top); ctx.lineTo(pad.left, pad.top + h); ctx.lineTo(pad.left + w, pad.top + h);
  ctx.stroke();
  if (opts.xLabel) ctx.fillText(opts.xLabel, pad.left + w / 2 - 20, cssH - 4);
  for (const line of opts.hlines || []) {
    ctx.strokeStyle = "#f59e0b"; ctx.setLineDash([6, 4]);
    ctx.beginPath(); ctx.moveTo(pad.left, Y(line.y)); ctx.lineTo(pad.left + w, Y(line.y)); ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = "#b45309"; ctx.fillText(line.label || "", pad.left + w - 90, Y(line.y) - 4); ctx.fillStyle = "#64748b";
  }
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const good = s.points.filter((p) => p[1] !== null && Number.isFinite(p[1]));
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = s.width || 2;
    ctx.setLineDash(s.dashed ? [5, 3] : []);
    ctx.beginPath();
    good.forEach((p, j) => { if (j === 0) ctx.moveTo(X(p[0]), Y(p[1])); else ctx.lineTo(X(p[0]), Y(p[1])); });
    ctx.stroke();
    ctx.setLineDash([]);
    for (const p of good) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 2.5, 0, 2 * Math.PI); ctx.fill(); }
  });
  ctx.fillStyle = "#64748b";
}

function legend(node, series) {
  node.replaceChildren(...series.map((s, i) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = s.color || PALETTE[i % PALETTE.length];
    return el("span", { class: "legend-item" }, [swatch, s.name]);
  }));
}
