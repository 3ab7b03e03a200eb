// imgdb serve: the page. Vanilla JS, everything from this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {query: null, response: null, box: null, mapResult: null};

function status(text, error) {
  const el = $("status");
  el.textContent = text || "";
  el.className = error ? "error" : "";
}

async function loadInfo() {
  const r = await fetch("/info");
  const info = await r.json();
  $("store").textContent = `${info.store} · ${info.images_ok} images`;
  const select = $("choice");
  select.innerHTML = "";
  const groups = {index: document.createElement("optgroup"), exact: document.createElement("optgroup")};
  groups.index.label = "indexes";
  groups.exact.label = "descriptors (exact search)";
  for (const c of info.choices) {
    const o = document.createElement("option");
    o.value = c.key;
    o.textContent = c.index ? `${c.index} (${c.model}${c.state === "current" ? "" : ", stale"})` : c.descriptor;
    if (c.key === info.default) o.selected = true;
    groups[c.search].appendChild(o);
  }
  for (const g of Object.values(groups)) if (g.children.length) select.appendChild(g);
}

function form() {
  const f = new FormData();
  f.append("k", $("k").value || "12");
  f.append("qe", $("qe").value || "0");
  f.append("index", $("choice").value);
  if ($("rerank").value) f.append("rerank", $("rerank").value);
  if ($("regions").checked) f.append("regions", "1");
  if (state.box) f.append("bbox", state.box.map((v) => Math.round(v)).join(","));
  if (state.query.kind === "upload") f.append("image", state.query.file, state.query.file.name || "query");
  else f.append("id", String(state.query.id));
  return f;
}

let latest = 0;  // only the answer to the latest request is shown

async function runQuery() {
  if (!state.query) return;
  const query = state.query, ticket = ++latest;
  status("searching…");
  let r, data;
  try {
    r = await fetch("/query", {method: "POST", body: form()});
    data = await r.json();
  } catch (e) {
    if (ticket === latest) status(`the server did not answer (${e})`, true);
    return;
  }
  if (ticket !== latest) return;
  if (!r.ok) {
    status(data.error || `error ${r.status}`, true);
    return;
  }
  state.response = data;
  const t = data.timing_ms || {};
  const how = data.search.exact ? "exact search" : `index ${data.search.index}`;
  status(`${data.results.length} results · ${how} · ${Math.round(t.total_ms || 0)} ms` +
         (data.search.note ? ` · ${data.search.note}` : ""));
  $("query-caption").textContent =
    (query.kind === "upload" ? `uploaded image` : `stored image ${query.id}`) +
    ` (${data.query.width}×${data.query.height}, ${data.query.source})` +
    (data.query.bbox ? ` · box ${data.query.bbox.map(Math.round).join(",")}` : "");
  $("clear-box").hidden = !state.box;
  showResults(data.results);
}

function showResults(results) {
  const box = $("results");
  box.innerHTML = "";
  for (const hit of results) {
    const fig = document.createElement("figure");
    fig.dataset.id = hit.id;
    const img = document.createElement("img");
    img.src = hit.thumbnail;
    img.alt = hit.name;
    img.title = "search from this image";
    img.addEventListener("click", () => queryId(hit.id));
    const cap = document.createElement("figcaption");
    cap.innerHTML = `#${hit.rank} <span class="score">${hit.score.toFixed(4)}</span> · id ${hit.id}<br>`;
    cap.appendChild(document.createTextNode(hit.name));
    const maps = document.createElement("button");
    maps.type = "button";
    maps.className = "maps";
    maps.textContent = "maps";
    maps.addEventListener("click", () => openMaps(hit));
    fig.append(img, cap, maps);
    if (hit.verification) {
      const v = document.createElement("span");
      v.className = "verified";
      v.textContent = `verified: ${hit.verification.inliers} inliers`;
      cap.prepend(v, document.createElement("br"));
      const m = document.createElement("button");
      m.type = "button";
      m.className = "matches";
      m.textContent = "matches";
      m.addEventListener("click", () => openMatches(hit));
      fig.append(m);
    }
    box.appendChild(fig);
  }
}

function showQueryImage(src) {
  $("drop").hidden = false;
  $("query").hidden = false;
  $("query-img").src = src;
  state.box = null;
  $("box").hidden = true;
}

function queryFile(file) {
  if (!file) return;
  state.query = {kind: "upload", file};
  showQueryImage(URL.createObjectURL(file));
  runQuery();
}

function queryId(id) {
  state.query = {kind: "id", id};
  showQueryImage(`/images/${id}?size=full`);
  runQuery();
}

// drop / pick
const drop = $("drop");
$("file").addEventListener("change", (e) => {
  queryFile(e.target.files[0]);
  e.target.value = "";  // picking the same file again searches again
});
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  queryFile(e.dataTransfer.files[0]);
});
for (const id of ["choice", "k", "qe"]) $(id).addEventListener("change", runQuery);
$("clear-box").addEventListener("click", () => { state.box = null; $("box").hidden = true; runQuery(); });

// drawing a box on the query
const frame = $("query-frame");
let drag = null;
function framePoint(e) {
  const r = $("query-img").getBoundingClientRect();
  return [Math.min(Math.max(e.clientX - r.left, 0), r.width), Math.min(Math.max(e.clientY - r.top, 0), r.height)];
}
frame.addEventListener("mousedown", (e) => { e.preventDefault(); drag = {start: framePoint(e)}; });
window.addEventListener("mousemove", (e) => {
  if (!drag) return;
  const [x0, y0] = drag.start, [x1, y1] = framePoint(e);
  const b = $("box");
  b.hidden = false;
  Object.assign(b.style, {left: `${Math.min(x0, x1)}px`, top: `${Math.min(y0, y1)}px`,
                          width: `${Math.abs(x1 - x0)}px`, height: `${Math.abs(y1 - y0)}px`});
  drag.end = [x1, y1];
});
window.addEventListener("mouseup", () => {
  if (!drag) return;
  const d = drag;
  drag = null;
  if (!d.end || Math.abs(d.end[0] - d.start[0]) < 8 || Math.abs(d.end[1] - d.start[1]) < 8) {
    $("box").hidden = true;
    return;
  }
  const img = $("query-img");
  const q = state.response && state.response.query;
  const w = q ? q.width : img.naturalWidth, h = q ? q.height : img.naturalHeight;
  const sx = w / img.clientWidth, sy = h / img.clientHeight;
  state.box = [Math.min(d.start[0], d.end[0]) * sx, Math.min(d.start[1], d.end[1]) * sy,
               Math.max(d.start[0], d.end[0]) * sx, Math.max(d.start[1], d.end[1]) * sy];
  runQuery();
});

// verified matches: both images side by side, a line per inlier, the result's outline
function loadImage(src) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => reject(new Error(`cannot load ${src}`));
    im.src = src;
  });
}

async function openMatches(hit) {
  const q = state.response.query, v = hit.verification;
  $("matches").hidden = false;
  $("matches-text").textContent = `result #${hit.rank} · id ${hit.id}: ${v.inliers} inliers` +
    (v.outline ? "" : " (no transform)");
  const canvas = $("matches-canvas"), ctx = canvas.getContext("2d");
  const [a, b] = await Promise.all([loadImage(q.image), loadImage(`/images/${hit.id}?size=full`)]);
  const height = 520, sa = height / q.height, sb = height / b.naturalHeight;
  const wa = q.width * sa, wb = b.naturalWidth * sb;
  canvas.width = Math.ceil(wa + wb);
  canvas.height = height;
  ctx.drawImage(a, 0, 0, wa, height);
  ctx.drawImage(b, wa, 0, wb, height);
  // result pixels: the stored image's original size (the full image may be scaled for the page)
  const [rw, rh] = v.result_pixels;
  const rs = [wb / rw, height / rh];
  ctx.strokeStyle = "rgba(0, 200, 0, 0.8)";
  ctx.lineWidth = 1;
  for (const [xq, yq, xr, yr] of v.matches) {
    ctx.beginPath();
    ctx.moveTo(xq * sa, yq * sa);
    ctx.lineTo(wa + xr * rs[0], yr * rs[1]);
    ctx.stroke();
  }
  if (v.outline) {  // drawn on the query only (it may reach beyond a crop's edges)
    ctx.save();
    ctx.beginPath();
    ctx.rect(0, 0, wa, height);
    ctx.clip();
    ctx.strokeStyle = "rgb(255, 160, 0)";
    ctx.lineWidth = 3;
    ctx.beginPath();
    v.outline.forEach(([x, y], i) => (i ? ctx.lineTo(x * sa, y * sa) : ctx.moveTo(x * sa, y * sa)));
    ctx.closePath();
    ctx.stroke();
    ctx.restore();
  }
  canvas.dataset.lines = String(v.matches.length);
}
$("matches-close").addEventListener("click", () => { $("matches").hidden = true; });
for (const id of ["rerank", "regions"]) $(id).addEventListener("change", runQuery);

// explanation maps
function openMaps(hit) {
  state.mapResult = hit;
  const q = state.response.query;
  $("map-query-img").src = q.image;
  $("map-result-img").src = `/images/${hit.id}?size=full`;
  for (const side of ["query", "result"]) {
    $(`map-${side}-layer`).removeAttribute("src");
    $(`map-${side}-text`).textContent = "";
  }
  $("map-result-caption").textContent = `result #${hit.rank} · id ${hit.id} · ${hit.score.toFixed(4)}`;
  $("maps").hidden = false;
}

async function showMap(button) {
  const hit = state.mapResult, q = state.response.query;
  const side = button.dataset.on;
  const params = new URLSearchParams({map: button.dataset.map, on: side, result: hit.id,
                                      index: state.response.search.key});
  if (q.token) params.set("query", q.token); else params.set("query_id", q.id);
  const text = $(`map-${side}-text`);
  text.textContent = `computing the ${button.dataset.map} map…`;
  button.classList.add("busy");
  try {
    const r = await fetch(`/explain?${params}`);
    if (!r.ok) {
      const err = await r.json();
      text.textContent = err.error || `error ${r.status}`;
      return;
    }
    const info = JSON.parse(r.headers.get("X-Imgdb-Map") || "{}");
    const blob = await r.blob();
    const layer = $(`map-${side}-layer`);
    layer.dataset.map = button.dataset.map;
    layer.src = URL.createObjectURL(blob);
    text.textContent = info.text || "";
  } finally {
    button.classList.remove("busy");
  }
}
for (const b of document.querySelectorAll("#maps button[data-map]")) b.addEventListener("click", () => showMap(b));
$("maps-close").addEventListener("click", () => { $("maps").hidden = true; });
$("opacity").addEventListener("input", (e) => {
  for (const l of document.querySelectorAll(".layer")) l.style.opacity = e.target.value / 100;
});

loadInfo().catch((e) => status(`cannot read /info (${e})`, true));
