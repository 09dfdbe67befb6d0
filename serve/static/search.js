// The search page: drop, choose or paste an image (or give a catalogue id), see the top-k.
//
// Everything shown that came from the catalogue or the user (ids, URIs, metadata, error text) is
// put in the page as text nodes or through setAttribute on inert attributes, never as HTML, so a
// stored uri like `<script>` or `<img onerror=...>` is displayed, not run. The page sends
// requests relative to its <base> (the app's route prefix) and needs nothing from the network
// beyond the app itself.
"use strict";

const CORE_FIELDS = new Set(["id", "uri", "score", "shard", "region"]);
const $ = (selector) => document.querySelector(selector);

let lastQuery = null; // {kind: "image", blob, label} or {kind: "id", id}
let previewName = ""; // what the query image shows (a file's name, "catalogue id ..."): a box's label
let drawing = null; // a box being drawn on the query image: where it started
let drew = false; // a box was just drawn: the click that ends it must not open the file chooser
let filtersSupported = false;
let latest = 0; // the newest search: an older answer that arrives later is dropped

// ---- small DOM helpers (text only) -------------------------------------------------------------
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function show(node, text) {
  node.textContent = text || "";
  node.hidden = !text;
}

function k() {
  const value = parseInt($("#k").value, 10);
  return Number.isFinite(value) ? Math.min(Math.max(value, 1), 1000) : 12;
}

function thumbnailUrl(id) {
  return "images/" + encodeURIComponent(id) + "/thumbnail";
}

// ---- the catalogue's size and model, from /stats ------------------------------------------------
async function loadStats() {
  try {
    const response = await fetch("stats");
    const stats = await response.json();
    if (!response.ok) throw new Error(stats.detail || response.statusText);
    const unreachable = (stats.shards || []).filter((s) => s.error).length;
    const perImage = Number(stats.rows_per_image) || 1; // embed --regions: a row per grid cell
    const count = Number(stats.total_count).toLocaleString();
    const what = perImage > 1 ? `vectors (${perImage} per image: regions)` : "images";
    let text = `${count} ${what} in ${stats.num_shards} `
      + `shard${stats.num_shards === 1 ? "" : "s"} · model ${stats.model} · ${stats.dim}-d`;
    if (unreachable) text += ` · ${unreachable} shard(s) not answering`;
    $("#stats").textContent = text;
  } catch (e) {
    $("#stats").textContent = `catalogue statistics unavailable (${e.message})`;
  }
}

// Filters appear in the page once the API accepts them: the JSON body schema of POST /search
// (in the app's OpenAPI document) has a "filter" property. The controls come from GET /facets
// (filters.js); without it the JSON box alone is the filter.
async function detectFilters() {
  try {
    const spec = await (await fetch("openapi.json")).json();
    const content = spec.paths["/search"].post.requestBody.content["application/json"];
    let schema = content.schema;
    if (schema.$ref) schema = spec.components.schemas[schema.$ref.split("/").pop()];
    filtersSupported = Boolean((schema.properties || {}).filter);
    // text queries: the model has a text tower when one JSON form requires "text"
    $("#text-form").hidden = !(schema.oneOf || []).some((form) =>
      (form.required || []).includes("text"));
  } catch (e) {
    filtersSupported = false;
  }
  $("#filter-row").hidden = !filtersSupported;
  if (!filtersSupported) return;
  let facets = null;
  try {
    const response = await fetch("facets");
    if (response.ok) facets = await response.json();
  } catch (e) {
    facets = null;
  }
  Filters.build(facets);
}

function filterValue() {
  return filtersSupported ? Filters.value() : undefined;
}

// ---- searching ----------------------------------------------------------------------------------
async function search(query) {
  const mine = ++latest;
  lastQuery = query;
  show($("#error"), "");
  show($("#partial"), "");
  $("#status").textContent = "searching…";
  $("#results").setAttribute("aria-busy", "true");
  let response;
  try {
    const filter = filterValue();
    query = { ...query, filter };
    if (query.kind === "image") {
      const form = new FormData();
      form.append("file", query.blob, query.label || "query");
      if (filter !== undefined) form.append("filter", JSON.stringify(filter));
      if (query.text !== undefined) {
        form.append("text", query.text);
        form.append("text_weight", String(query.textWeight));
      }
      response = await fetch(`search?k=${k()}`, { method: "POST", body: form });
    } else {
      const body = query.kind === "text" ? { text: query.text, k: k() } : { id: query.id, k: k() };
      if (filter !== undefined) body.filter = filter;
      response = await fetch("search", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
      });
    }
  } catch (e) {
    if (mine !== latest) return;
    return fail(e.message.startsWith("the filter") ? e.message : `cannot reach the app: ${e.message}`);
  }
  let body;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (mine !== latest) return;
  if (body === null) return fail(`the app answered ${response.status} without JSON`);
  if (!response.ok) {
    return fail(`${body.error || response.status}: ${body.detail || response.statusText}`);
  }
  render(body, query.filter);
}

function fail(message) {
  $("#status").textContent = "";
  $("#filter-matched").textContent = "";
  $("#results").removeAttribute("aria-busy");
  $("#results").replaceChildren();
  show($("#error"), message);
}

function render(body, filter) {
  const results = body.results || [];
  $("#status").textContent = `${results.length} result${results.length === 1 ? "" : "s"} in `
    + `${Number(body.took_ms).toFixed(1)} ms · ${body.shards_answered}/${body.shards_total} shards`;
  // what the filter matched, in words: the answer holds only rows it allows
  const words = filter === undefined ? "" : Filters.describe(filter);
  $("#filter-matched").textContent = words
    ? `${results.length} matching image${results.length === 1 ? "" : "s"} where ${words}.` : "";
  if (body.partial) {
    const missing = (body.missing_shards || [])
      .map((m) => `shard ${m.shard} (${m.reason})`).join(", ");
    show($("#partial"), `Partial answer: ${body.shards_answered} of ${body.shards_total} shards `
      + `answered in time; results from ${missing || "the missing shards"} are not included.`);
  }
  $("#results").replaceChildren(...results.map(card));
  $("#results").removeAttribute("aria-busy");
}

function card(result, index) {
  const link = el("a", "result");
  link.href = "#id=" + encodeURIComponent(result.id);
  link.dataset.id = result.id;
  link.title = "search by this image";
  link.addEventListener("click", (event) => {
    if (location.hash === link.hash) {
      event.preventDefault(); // the same id again: no hashchange, so search here
      searchId(result.id);
    }
  });

  const thumb = el("div", "thumb");
  const img = document.createElement("img");
  img.alt = "";
  img.loading = "lazy";
  img.addEventListener("error", () => thumb.replaceChildren(el("span", "", "no preview")));
  img.src = thumbnailUrl(result.id);
  if (Array.isArray(result.region) && result.region.length === 4) {
    // found by a part of the image (a store embedded with --regions): outline that part
    const frame = el("span", "frame");
    const box = el("span", "box");
    placeBox(box, result.region);
    box.title = "the part of this image that matched";
    frame.append(img, box);
    thumb.append(frame);
  } else {
    thumb.append(img);
  }

  const info = el("div", "info");
  const score = el("div", "score", `#${index + 1} · ${Number(result.score).toFixed(3)} `);
  score.append(el("span", "shard", `shard ${result.shard}`));
  info.append(score, el("div", "id", `id ${result.id}`));
  info.append(el("div", "uri", result.uri));
  // the row's metadata columns (issue #13: a "metadata" object; nulls left out), then any other
  // keys an answer carries
  const nested = result.metadata && typeof result.metadata === "object" ? result.metadata : {};
  const extra = Object.entries(nested).filter(([, value]) => value !== null);
  for (const key of Object.keys(result)) {
    if (!CORE_FIELDS.has(key) && key !== "metadata") extra.push([key, result[key]]);
  }
  if (extra.length) {
    const meta = el("dl", "meta");
    for (const [key, value] of extra) {
      meta.append(el("dt", "", key));
      meta.append(el("dd", "", typeof value === "object" ? JSON.stringify(value) : value));
    }
    info.append(meta);
  }
  link.append(thumb, info);
  return link;
}

// ---- query inputs -------------------------------------------------------------------------------
function searchImage(blob, label) {
  const preview = $("#query-preview");
  if (preview.dataset.url) URL.revokeObjectURL(preview.dataset.url);
  preview.dataset.url = URL.createObjectURL(blob);
  preview.src = preview.dataset.url;
  preview.hidden = false;
  $("#query-box").hidden = true;
  previewName = label || "pasted image";
  $("#query-label").textContent = `query: ${previewName}`;
  $("#id-input").value = "";
  search({ kind: "image", blob, label });
}

function searchId(id) {
  const preview = $("#query-preview");
  preview.src = thumbnailUrl(id);
  preview.hidden = false;
  $("#query-box").hidden = true;
  previewName = `catalogue id ${id}`;
  $("#id-input").value = id;
  $("#query-label").textContent = `query: catalogue id ${id}`;
  search({ kind: "id", id });
}

// words: alone, or mixed into the image above at the chosen weight (POST /search text_weight)
function searchText(text) {
  const image = lastQuery && lastQuery.kind === "image" ? lastQuery : null;
  if ($("#text-mix").checked && image) {
    const textWeight = Math.min(1, Math.max(0, Number($("#text-weight").value) || 0));
    $("#query-label").textContent = `query: ${image.label || "image"} + "${text}" (${textWeight})`;
    return search({ kind: "image", blob: image.blob, label: image.label, text, textWeight });
  }
  $("#query-preview").hidden = true;
  $("#query-label").textContent = `query: "${text}"`;
  search({ kind: "text", text });
}

// ---- a box drawn on the query image: search by that part of it -------------------------------
// The part is cut out of the picture on a canvas and searched as an uploaded image; in a store
// embedded with --regions it finds the photos holding that part (index.rows.regions).
function placeBox(box, [x0, y0, x1, y1]) {
  box.style.left = `${100 * x0}%`;
  box.style.top = `${100 * y0}%`;
  box.style.width = `${100 * (x1 - x0)}%`;
  box.style.height = `${100 * (y1 - y0)}%`;
}

function fractionAt(event, rect) {
  const x = Math.min(Math.max(event.clientX - rect.left, 0), rect.width) / rect.width;
  const y = Math.min(Math.max(event.clientY - rect.top, 0), rect.height) / rect.height;
  return [x, y];
}

function boxOf(start, end) {
  return [
    Math.min(start[0], end[0]), Math.min(start[1], end[1]),
    Math.max(start[0], end[0]), Math.max(start[1], end[1]),
  ];
}

async function searchPart(part) {
  const preview = $("#query-preview");
  const [w, h] = [preview.naturalWidth, preview.naturalHeight];
  const sx = Math.round(part[0] * w);
  const sy = Math.round(part[1] * h);
  const sw = Math.max(1, Math.round((part[2] - part[0]) * w));
  const sh = Math.max(1, Math.round((part[3] - part[1]) * h));
  const canvas = document.createElement("canvas");
  canvas.width = sw;
  canvas.height = sh;
  canvas.getContext("2d").drawImage(preview, sx, sy, sw, sh, 0, 0, sw, sh);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
  if (!blob) return fail("could not cut the box out of the picture");
  const pct = part.map((v) => Math.round(100 * v)).join(",");
  const label = `${previewName}, box ${pct} %`;
  $("#query-label").textContent = `query: ${label}`;
  search({ kind: "image", blob, label });
}

function setUpBox() {
  const preview = $("#query-preview");
  const box = $("#query-box");
  preview.addEventListener("dragstart", (event) => event.preventDefault());
  preview.addEventListener("pointerdown", (event) => {
    if (event.button !== 0 || !preview.naturalWidth) return;
    event.preventDefault();
    preview.setPointerCapture(event.pointerId);
    const rect = preview.getBoundingClientRect();
    drawing = { rect, start: fractionAt(event, rect) };
    placeBox(box, [...drawing.start, ...drawing.start]);
    box.hidden = false;
  });
  preview.addEventListener("pointermove", (event) => {
    if (drawing) placeBox(box, boxOf(drawing.start, fractionAt(event, drawing.rect)));
  });
  preview.addEventListener("pointerup", (event) => {
    if (!drawing) return;
    const { rect, start } = drawing;
    drawing = null;
    const part = boxOf(start, fractionAt(event, rect));
    if ((part[2] - part[0]) * rect.width < 8 || (part[3] - part[1]) * rect.height < 8) {
      box.hidden = true; // a click, not a box: the picture opens the file chooser as before
      return;
    }
    drew = true;
    placeBox(box, part);
    searchPart(part);
  });
  $("#drop").addEventListener("click", (event) => {
    if (drew) event.preventDefault(); // the click ending a box: no file chooser
    drew = false;
  });
}

// "#id=<id>" is the page's state: clicking a result sets it, so Back returns to the last query
function fromHash() {
  const match = /^#id=(.+)$/.exec(location.hash);
  if (match) searchId(decodeURIComponent(match[1]));
}

function setUp() {
  const drop = $("#drop");
  $("#file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) searchImage(file, file.name);
    event.target.value = ""; // choosing the same file again searches again
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("#file").click();
    }
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) return searchImage(file, file.name);
    // a result's thumbnail dragged from this page: search by its id
    const url = event.dataTransfer.getData("text/uri-list") || event.dataTransfer.getData("text");
    const match = /\/images\/([^/]+)\/thumbnail/.exec(url || "");
    if (match) location.hash = "id=" + match[1];
    else show($("#error"), "drop an image file (or a result of this page)");
  });
  document.addEventListener("paste", (event) => {
    if (event.target.closest && event.target.closest("input, textarea")) return;
    const item = Array.from((event.clipboardData || {}).items || [])
      .find((entry) => entry.kind === "file" && entry.type.startsWith("image/"));
    if (item) {
      event.preventDefault();
      searchImage(item.getAsFile(), "pasted image");
    }
  });
  $("#id-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("#id-input").value.trim();
    if (!id) return show($("#error"), "give a catalogue id");
    if (location.hash === "#id=" + encodeURIComponent(id)) searchId(id);
    else location.hash = "id=" + encodeURIComponent(id);
  });
  $("#text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("#text-input").value;
    if (!text.trim()) return show($("#error"), "type some words to search by");
    searchText(text);
  });
  $("#k").addEventListener("change", () => {
    if (lastQuery) search(lastQuery);
  });
  window.addEventListener("hashchange", fromHash);
  setUpBox();
  loadStats();
  detectFilters().then(fromHash);
}

document.addEventListener("DOMContentLoaded", setUp);
