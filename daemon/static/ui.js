// sharedpoold's page: the memory map and small charts, refreshed from the daemon's
// read-only JSON (GET /v1/memory-map, GET /v1/ui/summary) every few seconds.
// Dependency-free on purpose: the machines are offline, nothing comes from a CDN.
// Each map cell is a <div class="c"> with data attributes (data-r, data-leaf,
// data-encryption, data-pool, data-hazard, data-code): the colours are CSS rules written
// from /ui/palette.json (the palette compare --map's PNGs use too), one set per layer.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const COLS = 128; // 128 x 2 MiB = 256 MiB per row, 4 rows per GiB
  // The refresh interval is the daemon's (refresh_seconds in /v1/ui/summary, daemon/ui.py);
  // ?refresh=MS (at least 500) overrides it: tests and slow links
  const asked = Number(new URLSearchParams(window.location.search).get("refresh"));
  let refreshMs = asked >= 500 ? asked : 0;
  const RETRY_MS = 1000; // after a failed refresh (the daemon restarting, not ready)
  let palette = null;
  let cells = [];
  let codes = null;
  let fields = null;
  let hazardKinds = {};
  let layer = "overview";

  function fmtBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = n;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
  }

  function fmtSeconds(s) {
    if (s >= 1) return s + " s";
    if (s >= 1e-3) return +(s * 1e3).toPrecision(3) + " ms";
    return +(s * 1e6).toPrecision(3) + " µs";
  }

  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store" });
    if (!r.ok) throw new Error(url + ": HTTP " + r.status);
    return r.json();
  }

  function el(tag, attrs, parent) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }

  // ---- the map -------------------------------------------------------------------------

  function writeColourRules() {
    const rules = [];
    for (const [field, colours] of Object.entries(palette.colours)) {
      for (const [value, colour] of Object.entries(colours)) {
        rules.push(`#map.layer-${field} .c[data-${field}="${value}"]{background:${colour}}`);
      }
    }
    // overview: a cell takes the colour of the first field of palette.overview whose value
    // is not "none"; rules of later fields come first so that earlier ones win
    const order = palette.overview.slice().reverse();
    for (const field of order) {
      for (const [value, colour] of Object.entries(palette.colours[field])) {
        if (value === "none" && field !== order[0]) continue;
        rules.push(`#map.layer-overview .c[data-${field}="${value}"]{background:${colour}}`);
      }
    }
    const style = document.createElement("style");
    style.textContent = rules.join("\n");
    document.head.appendChild(style);
  }

  function legendItems() {
    const items = [];
    const add = (field, value) => items.push([palette.colours[field][value], palette.labels[field][value]]);
    if (layer === "overview") {
      const order = palette.overview;
      for (const field of order.slice().reverse()) {
        for (const value of Object.keys(palette.colours[field])) {
          if (value !== "none" || field === order[order.length - 1]) add(field, value);
        }
      }
      return items.reverse();
    }
    for (const value of Object.keys(palette.colours[layer])) add(layer, value);
    return items;
  }

  function drawLegend() {
    const box = $("legend");
    box.textContent = "";
    for (const [colour, label] of legendItems()) {
      const item = document.createElement("span");
      item.className = "item";
      const sw = document.createElement("span");
      sw.className = "sw";
      sw.style.background = colour;
      item.append(sw, label);
      box.appendChild(item);
    }
  }

  function build(n) {
    const map = $("map");
    const labels = $("rowlabels");
    map.textContent = "";
    labels.textContent = "";
    cells = new Array(n);
    const frag = document.createDocumentFragment();
    for (let i = 0; i < n; i += 1) {
      const c = document.createElement("div");
      c.className = "c";
      c.dataset.r = i;
      cells[i] = c;
      frag.appendChild(c);
    }
    map.appendChild(frag);
    const rows = Math.ceil(n / COLS);
    for (let r = 0; r < rows; r += 1) {
      const s = document.createElement("span");
      s.textContent = r % 4 === 0 ? (r / 4) + " GiB" : "";
      labels.appendChild(s);
    }
    codes = null;
  }

  function decodeBase64(text) {
    const bin = atob(text);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i += 1) out[i] = bin.charCodeAt(i);
    return out;
  }

  function valueOf(code, name) {
    const f = fields[name];
    return f.values[(code >> f.shift) & ((1 << f.bits) - 1)];
  }

  function drawMap(doc) {
    fields = doc.fields;
    const next = decodeBase64(doc.codes);
    if (cells.length !== next.length) build(next.length);
    let changed = 0;
    for (let i = 0; i < next.length; i += 1) {
      if (codes !== null && codes[i] === next[i]) continue;
      const c = cells[i];
      const code = next[i];
      c.dataset.code = code;
      for (const name of Object.keys(fields)) c.dataset[name] = valueOf(code, name);
      changed += 1;
    }
    codes = next;
    hazardKinds = {};
    for (const [kind, regions] of Object.entries(doc.hazard_regions)) {
      for (const r of regions) (hazardKinds[r] = hazardKinds[r] || []).push(kind.replaceAll("_", " "));
    }
    const t = doc.totals;
    $("mapinfo").textContent = `${doc.regions} regions · ${t.leaf["4k"]} split to 4 KiB · `
      + `${t.pool.none === doc.regions ? "no pool chunks" : (doc.regions - t.pool.none) + " with pool chunks"} · `
      + `${t.hazard.present} with hazard pages`;
    document.body.dataset.mapChanged = changed;
  }

  function hover(ev) {
    const c = ev.target.closest(".c");
    if (!c || codes === null) return;
    const r = Number(c.dataset.r);
    const lo = BigInt(r) * 2097152n;
    const hex = (v) => "0x" + v.toString(16).padStart(9, "0");
    const parts = [`region ${r}: ${hex(lo)}–${hex(lo + 2097152n - 1n)}`,
      `direct map ${c.dataset.leaf}`, c.dataset.encryption, `pool ${c.dataset.pool.replace("_", " ")}`];
    if (hazardKinds[r]) parts.push("HAZARD: " + hazardKinds[r].join(", "));
    $("hover").textContent = parts.join(" · ");
  }

  // ---- charts ----------------------------------------------------------------------------

  function clear(svg) { while (svg.firstChild) svg.removeChild(svg.firstChild); }

  function poolChart(s) {
    const svg = $("c-pool");
    clear(svg);
    const W = 420, H = 150, L = 46, B = 16, T = 14;
    const h = s.history;
    const now = s.time;
    // the last 10 minutes, or less while the daemon is younger (at least one minute)
    const span = Math.min(600, Math.max(60, now - (h.t.length ? h.t[0] : now)));
    const x = (t) => L + (W - L - 4) * Math.max(0, 1 - (now - t) / span);
    const top = Math.max(1, ...h.size_bytes, ...h.used_bytes);
    const y = (v) => T + (H - T - B) * (1 - v / top);
    el("line", { x1: L, y1: y(0), x2: W - 4, y2: y(0), class: "axis" }, svg);
    el("text", { x: 2, y: y(top) + 3 }, svg).textContent = fmtBytes(top);
    el("text", { x: 2, y: y(0) }, svg).textContent = "0";
    for (const f of [1, 0.5, 0]) {
      const ago = span * f;
      const label = ago === 0 ? "now" : ago >= 120 ? `−${Math.round(ago / 60)} min` : `−${Math.round(ago)} s`;
      el("text", { x: x(now - ago) - (f === 0 ? 18 : 10), y: H - 3 }, svg).textContent = label;
    }
    const series = [["size_bytes", "#1d3557", "size"], ["used_bytes", "#e76f51", "used"], ["free_bytes", "#52b788", "free"]];
    series.forEach(([key, colour, label], k) => {
      const pts = h.t.map((t, i) => `${x(t).toFixed(1)},${y(h[key][i]).toFixed(1)}`).join(" ");
      el("polyline", { points: pts, fill: "none", stroke: colour, "stroke-width": 1.6 }, svg);
      el("rect", { x: L + 8 + k * 60, y: 2, width: 9, height: 9, fill: colour }, svg);
      el("text", { x: L + 20 + k * 60, y: 10 }, svg).textContent = label;
    });
    for (const e of h.events) {
      const ex = x(e.t);
      el("line", { x1: ex, y1: T, x2: ex, y2: y(0), stroke: "#999", "stroke-dasharray": "2 2" }, svg);
      el("text", { x: ex - 3, y: T + 8, fill: e.kind === "grow" ? "#2a9d8f" : "#e76f51" }, svg)
        .textContent = e.kind === "grow" ? "▲" : "▼";
    }
  }

  function directMapChart(s) {
    const svg = $("c-dm");
    clear(svg);
    const sizes = [["1G", "1 GiB"], ["2M", "2 MiB"], ["4k", "4 KiB"]];
    const total = sizes.reduce((a, [k]) => a + s.direct_map_bytes[k], 0) || 1;
    let x0 = 4;
    sizes.forEach(([k, label], i) => {
      const w = (412 * s.direct_map_bytes[k]) / total;
      el("rect", { x: x0, y: 6, width: Math.max(w, 0), height: 22, fill: palette.colours.leaf[k] }, svg);
      el("rect", { x: 4 + i * 138, y: 40, width: 9, height: 9, fill: palette.colours.leaf[k] }, svg);
      el("text", { x: 16 + i * 138, y: 48 }, svg).textContent = `${label}: ${fmtBytes(s.direct_map_bytes[k])}`;
      x0 += w;
    });
    el("text", { x: 4, y: 64 }, svg).textContent =
      `splits since boot: ${s.direct_map_splits.level2} × 2 MiB→4 KiB, ${s.direct_map_splits.level3} × 1 GiB→2 MiB`;
  }

  function orderBars(box, zones, key, lo, hi, colour) {
    box.textContent = "";
    for (const z of zones) {
      const fig = document.createElement("figure");
      const cap = document.createElement("figcaption");
      cap.textContent = z.name;
      const svg = el("svg", { viewBox: "0 0 100 60" });
      const y = (v) => 4 + 46 * (1 - (v - lo) / (hi - lo));
      el("line", { x1: 0, y1: y(0), x2: 100, y2: y(0), class: "axis" }, svg);
      z[key].forEach((v, order) => {
        const bx = 2 + order * 8.8;
        const y0 = y(Math.max(0, v)), y1 = y(Math.min(0, v));
        el("rect", { x: bx, y: y0, width: 7, height: Math.max(0.5, y1 - y0), fill: v < 0 ? "#a8dadc" : colour }, svg)
          .appendChild(document.createElementNS(SVG, "title")).textContent = `order ${order}: ${(v / 1000).toFixed(3)}`;
      });
      el("text", { x: 1, y: 59 }, svg).textContent = "0";
      el("text", { x: 88, y: 59 }, svg).textContent = "10";
      fig.append(cap, svg);
      box.appendChild(fig);
    }
  }

  function histogram(svg, bounds, stacks, H) {
    clear(svg);
    const W = 420, L = 30, B = 22;
    const n = bounds.length + 1;
    const totals = new Array(n).fill(0);
    for (const [, counts] of stacks) counts.forEach((c, i) => { totals[i] += c; });
    const top = Math.max(1, ...totals);
    const bw = (W - L - 4) / n;
    const y = (v) => 12 + (H - 12 - B) * (1 - v / top);
    el("line", { x1: L, y1: y(0), x2: W - 4, y2: y(0), class: "axis" }, svg);
    el("text", { x: 2, y: y(top) + 3 }, svg).textContent = String(top);
    const base = new Array(n).fill(0);
    stacks.forEach(([label, counts, colour], k) => {
      counts.forEach((c, i) => {
        if (!c) return;
        el("rect", { x: L + i * bw + 1, y: y(base[i] + c), width: bw - 2, height: y(base[i]) - y(base[i] + c), fill: colour }, svg);
        base[i] += c;
      });
      if (stacks.length > 1) {
        el("rect", { x: L + k * 90, y: 1, width: 8, height: 8, fill: colour }, svg);
        el("text", { x: L + 11 + k * 90, y: 8 }, svg).textContent = label.replace("le_", "≤ ").replace("gt_", "> ");
      }
    });
    bounds.forEach((b, i) => {
      if (i % 2 === 0 || bounds.length < 10) {
        el("text", { x: L + (i + 1) * bw - 10, y: H - 10 }, svg).textContent = fmtSeconds(b);
      }
    });
    el("text", { x: W - 4, y: H - 1, "text-anchor": "end" }, svg).textContent = "bucket upper bound";
  }

  function drawSummary(s) {
    $("what").textContent = `${s.strategy} on a ${fmtBytes(s.memory_bytes)} ${s.platform} guest`;
    const setStat = (id, text, alarm) => {
      $(id).querySelector(".v").textContent = text;
      $(id).classList.toggle("alarm", Boolean(alarm));
    };
    const hz = s.hazard_pages;
    setStat("s-fatal", hz.private_alias_to_shared, hz.private_alias_to_shared > 0);
    setStat("s-benign", hz.shared_alias_to_private, hz.shared_alias_to_private > 0);
    setStat("s-unknown", hz.unknown_state, hz.unknown_state > 0);
    setStat("s-leaked", fmtBytes(s.pool.leaked_bytes), s.pool.leaked_bytes > 0);
    setStat("s-size", fmtBytes(s.pool.size_bytes));
    setStat("s-used", fmtBytes(s.pool.used_bytes));
    setStat("s-free", fmtBytes(s.pool.free_bytes));
    poolChart(s);
    directMapChart(s);
    orderBars($("c-frag"), s.zones, "fragmentation_index", -1000, 1000, "#e76f51");
    orderBars($("c-unus"), s.zones, "unusable_free_index", 0, 1000, "#f4a261");
    const classColours = ["#a8dadc", "#457b9d", "#1d3557", "#e63946"];
    const measured = Object.entries(s.latency.measured.by_size_class)
      .map(([label, counts], i) => [label, counts, classColours[i % classColours.length]]);
    histogram($("c-lat"), s.latency.measured.bounds, measured, 130);
    histogram($("c-mod"), s.latency.modeled.bounds, [["modeled", s.latency.modeled.counts, "#6d597a"]], 110);
  }

  // ---- refresh ---------------------------------------------------------------------------

  async function refresh() {
    try {
      const [doc, summary] = await Promise.all([getJSON("/v1/memory-map"), getJSON("/v1/ui/summary")]);
      drawMap(doc);
      drawSummary(summary);
      if (!(asked >= 500)) refreshMs = summary.refresh_seconds * 1000;
      document.body.dataset.refreshMs = refreshMs;
      const n = Number(document.body.dataset.refreshes) + 1;
      document.body.dataset.refreshes = n;
      $("status").textContent = "updated " + new Date().toLocaleTimeString();
      $("status").classList.remove("err");
    } catch (err) {
      $("status").textContent = String(err.message || err);
      $("status").classList.add("err");
    }
    setTimeout(refresh, refreshMs || RETRY_MS);
  }

  async function start() {
    palette = await getJSON("/ui/palette.json");
    writeColourRules();
    drawLegend();
    $("layers").addEventListener("click", (ev) => {
      const b = ev.target.closest("button");
      if (!b) return;
      layer = b.dataset.layer;
      for (const other of $("layers").querySelectorAll("button")) other.classList.toggle("on", other === b);
      $("map").className = "layer-" + layer;
      drawLegend();
    });
    $("map").addEventListener("mouseover", hover);
    refresh();
  }

  start().catch((err) => {
    $("status").textContent = String(err.message || err);
    $("status").classList.add("err");
  });
})();
