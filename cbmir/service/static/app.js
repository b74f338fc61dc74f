// The cbmir web page: search similar radiographs and pre-label images with IRMA codes, over the /v1 API.
// Plain JavaScript, no build step. Every /v1 call carries the bearer token, so thumbnails are fetched
// with it and shown through blob URLs rather than plain <img src>.
"use strict";

const TOKEN_KEY = "cbmir-token";
const ASK_TOKEN = "This server needs the access token you were given.";
const TOKEN_REFUSED = "The token was not accepted. Enter the access token again.";
const PREVIEWABLE = /\.(png|jpe?g|bmp)$/i; // formats the browser can show itself (not DICOM nor TIFF)
const $ = (selector) => document.querySelector(selector);

let authRequired = false;
let tokenWaiters = [];   // requests waiting for a token to be entered: {resolve, reject}
const MIN_REGION = 16;    // the smallest region side the server searches, in image pixels
const MAX_ZOOM = 16, ZOOM_STEP = 1.25;

// {file} for an uploaded radiograph, {id} for an indexed one, or {pacs: {study, series, instance}} for an
// image on the PACS; its width and height once known
let currentQuery = null;
let querySerial = 0;     // numbers queries, so that maps fetched for an earlier one are never shown
let searchSerial = 0;    // only the latest search may render: an earlier answer arriving late is dropped
let region = null;       // the region searched, {x, y, width, height} in the query's own pixels, or null
const marks = new Map(); // image id -> "positive" | "negative", for refining the query by example
let shownNeighbours = []; // the hits in the grid
const whyCache = new Map(); // "query|region|neighbour" -> the promise of its maps
let comparing = null;    // the neighbour in the compare view
let view = { zoom: 1, x: 0, y: 0 }; // the compare view's zoom and pan, shared by both panes
const annotated = new Map(); // image id -> state of its row in the annotation table
const batch = { queue: [], total: 0, done: 0, failed: 0, running: false };

// -- the token ------------------------------------------------------------------------------------------

class ApiError extends Error {}

// Opens the token dialog saying why; when it is open already, the first reason given stays.
function askToken(reason) {
  const dialog = $("#token-dialog");
  if (!dialog.open) {
    $("#token-reason").textContent = reason;
    $("#token-input").value = "";
    dialog.showModal();
  }
  $("#token-input").focus();
}

// Resolves once a token is entered; rejects when the dialog is closed without one.
function newToken(reason) {
  askToken(reason);
  return new Promise((resolve, reject) => tokenWaiters.push({ resolve, reject }));
}

function settleTokenWaiters(error) {
  const waiters = tokenWaiters;
  tokenWaiters = [];
  for (const waiter of waiters) error ? waiter.reject(error) : waiter.resolve();
}

// -- talking to the API ---------------------------------------------------------------------------------

// A fetch with the token; any answer but 2xx is thrown as an ApiError with the server's message. A refused
// token is dropped and asked for again, and the request is sent again with the new one.
async function api(path, options = {}) {
  for (;;) {
    let token = sessionStorage.getItem(TOKEN_KEY);
    if (authRequired && !token) {
      await newToken(ASK_TOKEN);
      token = sessionStorage.getItem(TOKEN_KEY);
    }
    const headers = new Headers(options.headers || {});
    if (token) headers.set("Authorization", `Bearer ${token}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (error) {
      throw new ApiError(`the server cannot be reached (${error.message})`);
    }
    if (response.ok) return response;
    if (response.status !== 401) throw new ApiError(await errorText(response));
    if (!authRequired) { // /health said no token is needed, yet this server asks for one
      authRequired = true;
      $("#token-button").classList.remove("hidden");
    }
    // Requests sent with the same refused token all come back here: only the first drops it, and one sent
    // before a new token was entered just goes again with the new one.
    if (sessionStorage.getItem(TOKEN_KEY) === token) {
      sessionStorage.removeItem(TOKEN_KEY);
      await newToken(TOKEN_REFUSED);
    }
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON: say the status instead */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

// -- small helpers --------------------------------------------------------------------------------------

function showMessage(text) {
  const box = $("#message");
  box.textContent = text;
  box.classList.toggle("hidden", !text);
}

function percent(value) {
  return value == null ? "–" : `${(100 * value).toFixed(1)}%`;
}

function fileSize(bytes) {
  return bytes < 1024 * 1024 ? `${Math.max(1, Math.round(bytes / 1024))} KiB` : `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function revokeImage(img) {
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
}

// Shows the thumbnail at `url` in `img`. One that arrives after its img left the page or was given another
// picture is dropped.
async function thumbnailInto(img, url) {
  img.dataset.thumbnail = url;
  img.classList.remove("missing");
  try {
    const blob = await (await api(url)).blob();
    if (!img.isConnected || img.dataset.thumbnail !== url) return;
    revokeImage(img);
    img.src = URL.createObjectURL(blob);
  } catch (error) {
    if (img.dataset.thumbnail !== url) return;
    img.alt = `no thumbnail: ${error.message}`;
    img.classList.add("missing");
  }
}

// -- what the index holds: the status line and the filter menus -----------------------------------------

async function refreshIndexInfo() {
  try {
    const [stats, codes] = await Promise.all([apiJson("/v1/stats"), apiJson("/v1/codes")]);
    fillMenu($("#anatomy-filter"), codes.axes.anatomical || []);
    fillMenu($("#biology-filter"), codes.axes.biological || []);
    $("#status").textContent = `${stats.images} images · model ${stats.model} · ${stats.index_type} index`;
  } catch (error) {
    showMessage(error.message);
  }
}

// One option per code prefix present in the index, indented by its level: "  41 — hand (8)".
function fillMenu(select, entries) {
  const chosen = select.value;
  select.replaceChildren(new Option("any", ""), ...entries.map((entry) => {
    const indent = "\u00a0\u00a0\u00a0".repeat(entry.level - 1);
    const words = entry.text ? ` — ${entry.text}` : "";
    return new Option(`${indent}${entry.code}${words} (${entry.count})`, entry.code);
  }));
  select.value = chosen;
  if (select.selectedIndex < 0) select.selectedIndex = 0; // its code left the index (images were removed)
}

// -- search ---------------------------------------------------------------------------------------------

// The search's parameters: filters, and the refinements (the region, the marked cases).
function searchParams() {
  const params = { k: $("#k-select").value };
  if ($("#anatomy-filter").value) params.anatomy = $("#anatomy-filter").value;
  if ($("#biology-filter").value) params.biology = $("#biology-filter").value;
  if (region) params.region = regionText(region);
  const positive = markedIds("positive"), negative = markedIds("negative");
  if (positive.length) params.positive = positive.join(",");
  if (negative.length) params.negative = negative.join(",");
  return params;
}

async function runSearch() {
  if (!currentQuery) return;
  const serial = ++searchSerial;
  showMessage("");
  $("#busy").classList.remove("hidden");
  $("#neighbours").classList.add("stale");
  try {
    let result;
    if (currentQuery.file) {
      const form = new FormData();
      form.append("file", currentQuery.file);
      for (const [key, value] of Object.entries(searchParams())) form.append(key, value);
      result = await apiJson("/v1/search", { method: "POST", body: form });
    } else if (currentQuery.pacs) {
      result = await apiJson("/v1/search/pacs", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(pacsSearchBody(currentQuery.pacs, searchParams())),
      });
    } else {
      result = await apiJson(`/v1/images/${currentQuery.id}/similar?${new URLSearchParams(searchParams())}`);
    }
    if (serial !== searchSerial) return;
    currentQuery.width = result.query.width;
    currentQuery.height = result.query.height;
    drawRegion();
    renderPrediction(result.prediction);
    showQueryViewer(result.query.pacs);
    const where = region ? " (region)" : "";
    const name = currentQuery.pacs ? `PACS instance ${result.query.name}` : result.query.name;
    $("#results-title").textContent = result.prediction
      ? `Similar prior cases to ${name}${where}`
      : `Similar to ${name} (indexed image ${result.query.id})${where}`;
    renderNeighbours(result.neighbours);
  } catch (error) {
    if (serial !== searchSerial) return;
    // Results of an earlier query must not stand next to this one.
    renderPrediction(null);
    renderNeighbours(null);
    $("#results-title").textContent = "Similar prior cases";
    showMessage(error.message);
  } finally {
    if (serial === searchSerial) {
      $("#busy").classList.add("hidden");
      $("#neighbours").classList.remove("stale");
    }
  }
}

// The JSON body of a search by PACS image: the UIDs, k, and the filters and refinements the form fields of an
// upload search would carry.
function pacsSearchBody(uids, params) {
  const pick = (names) =>
    Object.fromEntries(names.filter((name) => name in params).map((name) => [name, params[name]]));
  return {
    ...uids,
    k: Number(params.k),
    filters: pick(["anatomy", "biology"]),
    refine: pick(["region", "positive", "negative"]),
  };
}

// A link to the image in the PACS viewer, opened in a new tab that cannot reach back to this page.
function viewerLink(url, label) {
  const link = element("a", "viewer-link", "Open in viewer");
  link.href = url;
  link.target = "_blank";
  link.rel = "noopener noreferrer";
  link.setAttribute("aria-label", `Open ${label} in the viewer`);
  return link;
}

// The query's viewer link, when the server knows where the query is on the PACS and has a viewer.
function showQueryViewer(pacs) {
  const link = $("#query-viewer");
  link.classList.toggle("hidden", !pacs || !pacs.viewer_url);
  if (pacs && pacs.viewer_url) link.href = pacs.viewer_url;
  else link.removeAttribute("href");
}

function renderPrediction(prediction) {
  const box = $("#prediction");
  box.replaceChildren();
  if (!prediction) return;
  const irma = prediction.kind === "irma";
  box.append(element("h2", null, irma ? "Predicted IRMA code" : "Predicted class"));
  const code = element("p", "code");
  code.append(element("span", "label", prediction.label), element("span", "confidence", percent(prediction.confidence)));
  box.append(code);
  if (prediction.words) box.append(element("p", "words", prediction.words));
  if (prediction.neighbours) {
    const plural = prediction.neighbours === 1 ? "image" : "images";
    box.append(element("p", "blended", `with the known codes of ${prediction.neighbours} similar indexed ${plural}`));
  }
  const rows = irma
    ? prediction.axes.map((axis) => [axis.axis, axis.code, axis.text, axis.confidence])
    : Object.entries(prediction.top).flatMap(([head, scores]) =>
        scores.map((score) => [head, score.label, null, score.probability]));
  const table = element("table", "axes");
  for (const [name, value, text, confidence] of rows) {
    const row = table.insertRow();
    row.insertCell().textContent = name;
    const cell = row.insertCell();
    cell.append(element("strong", null, value));
    if (text) cell.append(element("span", "axis-text", ` ${text}`));
    const bar = element("div", "bar");
    const fill = element("div", "fill");
    fill.style.width = `${Math.round(100 * confidence)}%`;
    bar.append(fill);
    row.insertCell().append(bar);
    row.insertCell().textContent = percent(confidence);
  }
  box.append(table);
}

// The grid of similar cases; null empties it. Each card opens a search by its image, and has its marks
// (similar, not similar) and a compare button.
function renderNeighbours(neighbours) {
  const grid = $("#neighbours");
  grid.querySelectorAll("img").forEach(revokeImage);
  grid.replaceChildren();
  shownNeighbours = neighbours || [];
  if (!neighbours) return;
  if (!neighbours.length) {
    grid.append(element("p", "empty", "No indexed image matches these filters."));
    return;
  }
  for (const hit of neighbours) {
    const card = element("div", "neighbour");
    card.dataset.id = hit.id;
    card.dataset.code = hit.code || "";
    const open = element("button", "open");
    open.type = "button";
    open.title = `Search for radiographs similar to ${hit.name}`;
    const thumb = element("div", "thumb");
    const img = element("img", "picture");
    img.alt = hit.name;
    thumb.append(img);
    const code = element("span", "hit-code", hit.code || "–");
    if (hit.code && !hit.true_code) code.append(element("span", "tag", "predicted"));
    open.append(thumb, element("span", "score", hit.score.toFixed(3)), code);
    if (hit.words) open.append(element("span", "hit-words", hit.words));
    open.append(element("span", "hit-name", hit.name));
    open.addEventListener("click", () => searchById(hit));
    const actions = element("div", "card-actions");
    for (const [kind, label, title] of [
      ["positive", "✓", "Mark as similar"],
      ["negative", "✗", "Mark as not similar"],
    ]) {
      const mark = element("button", `mark mark-${kind}`, label);
      mark.type = "button";
      mark.title = title;
      mark.setAttribute("aria-label", `${title}: ${hit.name}`);
      mark.addEventListener("click", () => toggleMark(hit.id, kind));
      actions.append(mark);
    }
    const compare = element("button", "compare", "Compare");
    compare.type = "button";
    compare.setAttribute("aria-label", `Compare with ${hit.name}`);
    compare.addEventListener("click", () => openCompare(hit));
    actions.append(compare);
    card.append(open, actions);
    if (hit.pacs && hit.pacs.viewer_url) card.append(viewerLink(hit.pacs.viewer_url, hit.name));
    for (const type of ["mouseenter", "focusin"]) card.addEventListener(type, () => showQueryWhy(hit));
    grid.append(card);
    showMarks(card);
    thumbnailInto(img, hit.thumbnail_url);
    if ($("#why-toggle").checked) whyOnCard(card, hit);
  }
}

function searchById(hit) {
  newQuery({ id: hit.id, width: hit.width, height: hit.height });
  showQuery(`${hit.name} · indexed image ${hit.id} · ${hit.code || "no code"}`);
  thumbnailInto($("#query-image"), hit.thumbnail_url);
  window.scrollTo({ top: 0 });
  runSearch();
}

function searchByPacs(event) {
  event.preventDefault();
  const pacs = {
    study: $("#pacs-study").value.trim(),
    series: $("#pacs-series").value.trim(),
    instance: $("#pacs-instance").value.trim(),
  };
  newQuery({ pacs });
  showQuery(`PACS instance ${pacs.instance}`);
  $("#query-image").classList.add("hidden"); // the page has no picture of it: the viewer has
  runSearch();
}

function pickQueryFile(file) {
  if (!file) return;
  newQuery({ file });
  const img = $("#query-image");
  if (PREVIEWABLE.test(file.name)) {
    showQuery(`${file.name} (${fileSize(file.size)})`);
    img.src = URL.createObjectURL(file);
  } else {
    showQuery(`${file.name} (${fileSize(file.size)}) — the browser cannot show this format`);
    img.classList.add("hidden");
  }
  runSearch();
}

// A new query starts without a region and without marks. Why-they-match maps need the query's pixels,
// which the server has for an upload or an indexed image but not for a PACS image.
function newQuery(query) {
  currentQuery = { ...query, serial: ++querySerial };
  region = null;
  marks.clear();
  drawRegion();
  showMarkCount();
  showQueryViewer(null);
  const why = $("#why-toggle");
  if (query.pacs && why.checked) {
    why.checked = false;
    toggleWhy();
  }
  why.disabled = Boolean(query.pacs);
  why.parentElement.title = query.pacs ? "Not available for a PACS image" : "";
}

// Shows the query's caption, with its image emptied (a new picture or none follows).
function showQuery(caption) {
  const img = $("#query-image");
  img.dataset.thumbnail = ""; // a thumbnail still on its way is for an earlier query
  revokeImage(img);
  img.classList.remove("hidden", "missing");
  $("#query-why").classList.add("hidden");
  $("#query-name").textContent = caption;
  $("#query-preview").classList.remove("hidden");
}

// -- refine by region: a box dragged on the query image, kept in the image's own pixels ----------------

function regionText(box) {
  return [box.x, box.y, box.width, box.height].join(",");
}

// Where the query's pixels are shown in the canvas: the offset of pixel (0, 0) and CSS pixels per image
// pixel (the image is contained, centred, in its element); null while it is not shown.
function imageFrame() {
  const img = $("#query-image");
  if (!currentQuery || !currentQuery.width || !img.naturalWidth || img.classList.contains("hidden")) return null;
  const fit = Math.min(img.clientWidth / img.naturalWidth, img.clientHeight / img.naturalHeight);
  const shownWidth = img.naturalWidth * fit, shownHeight = img.naturalHeight * fit;
  return {
    left: img.offsetLeft + (img.clientWidth - shownWidth) / 2,
    top: img.offsetTop + (img.clientHeight - shownHeight) / 2,
    scale: shownWidth / currentQuery.width,
  };
}

// The image pixel under a pointer event, kept inside the image.
function imagePoint(frame, event) {
  const canvas = $("#query-canvas").getBoundingClientRect();
  const clamp = (value, most) => Math.min(most, Math.max(0, Math.round(value)));
  return {
    x: clamp((event.clientX - canvas.left - frame.left) / frame.scale, currentQuery.width),
    y: clamp((event.clientY - canvas.top - frame.top) / frame.scale, currentQuery.height),
  };
}

function boxBetween(a, b) {
  return { x: Math.min(a.x, b.x), y: Math.min(a.y, b.y), width: Math.abs(a.x - b.x), height: Math.abs(a.y - b.y) };
}

// Places `shown` (absolutely positioned in the canvas) over `box` of the query image; hides it when either
// is missing.
function placeBox(shown, box) {
  const frame = imageFrame();
  shown.classList.toggle("hidden", !box || !frame);
  if (!box || !frame) return;
  shown.style.left = `${frame.left + box.x * frame.scale}px`;
  shown.style.top = `${frame.top + box.y * frame.scale}px`;
  shown.style.width = `${box.width * frame.scale}px`;
  shown.style.height = `${box.height * frame.scale}px`;
}

function drawBox(box) {
  placeBox($("#region-box"), box);
}

function drawRegion() {
  drawBox(region);
  $("#region-clear").classList.toggle("hidden", !region);
  $("#region-text").textContent = region
    ? `Searching the region at ${region.x}, ${region.y} (${region.width} × ${region.height} px).`
    : "Drag a box on the image to search only that region.";
}

function wireRegion() {
  const canvas = $("#query-canvas");
  let start = null, frame = null;
  canvas.addEventListener("pointerdown", (event) => {
    frame = imageFrame();
    if (!frame || event.button !== 0) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    start = imagePoint(frame, event);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (start) drawBox(boxBetween(start, imagePoint(frame, event)));
  });
  canvas.addEventListener("pointerup", (event) => {
    if (!start) return;
    const box = boxBetween(start, imagePoint(frame, event));
    start = null;
    if (box.width < MIN_REGION || box.height < MIN_REGION) { // a click, or too small to search
      drawRegion();
      return;
    }
    region = box;
    drawRegion();
    runSearch();
  });
  $("#region-clear").addEventListener("click", () => {
    region = null;
    drawRegion();
    runSearch();
  });
  window.addEventListener("resize", () => drawBox(region));
}

// -- refine by example: cases marked similar or not, sent with the next search --------------------------

function markedIds(kind) {
  return [...marks].filter(([, value]) => value === kind).map(([id]) => id);
}

function toggleMark(id, kind) {
  if (marks.get(id) === kind) marks.delete(id);
  else marks.set(id, kind);
  const card = $(`#neighbours .neighbour[data-id="${id}"]`);
  if (card) showMarks(card);
  showMarkCount();
}

function showMarks(card) {
  const mark = marks.get(Number(card.dataset.id));
  card.classList.toggle("marked-positive", mark === "positive");
  card.classList.toggle("marked-negative", mark === "negative");
  for (const kind of ["positive", "negative"]) {
    card.querySelector(`.mark-${kind}`).setAttribute("aria-pressed", String(mark === kind));
  }
}

function showMarkCount() {
  const positive = markedIds("positive").length, negative = markedIds("negative").length;
  $("#refine").disabled = !marks.size;
  $("#marks-clear").classList.toggle("hidden", !marks.size);
  $("#marks-text").textContent = marks.size
    ? `${positive} marked similar, ${negative} not similar: marked cases are left out of the next results.`
    : "Mark cases as similar (✓) or not (✗), then search again.";
}

// -- why they match: agreement maps over the thumbnails (computed by the server on demand) ---------------

// The maps of the query and one neighbour (an ExplainOut), fetched once per query, region and neighbour.
function explain(hit) {
  const key = `${currentQuery.serial}|${region ? regionText(region) : ""}|${hit.id}`;
  if (!whyCache.has(key)) {
    let answer;
    if (currentQuery.file) {
      const form = new FormData();
      form.append("file", currentQuery.file);
      form.append("neighbour", hit.id);
      if (region) form.append("region", regionText(region));
      answer = apiJson("/v1/explain", { method: "POST", body: form });
    } else {
      answer = apiJson(`/v1/images/${currentQuery.id}/explain?neighbour=${hit.id}`);
    }
    answer.catch(() => whyCache.delete(key)); // a failure is not kept: the next toggle asks again
    whyCache.set(key, answer);
  }
  return whyCache.get(key);
}

async function whyOnCard(card, hit) {
  const thumb = card.querySelector(".thumb");
  try {
    const maps = await explain(hit);
    if (!card.isConnected || !$("#why-toggle").checked || thumb.querySelector(".why")) return;
    const overlay = element("img", "why");
    overlay.alt = "";
    overlay.src = maps.neighbour;
    thumb.append(overlay);
  } catch (error) {
    showMessage(`no map for ${hit.name}: ${error.message}`);
  }
}

async function showQueryWhy(hit) {
  const overlay = $("#query-why");
  if (!$("#why-toggle").checked || !currentQuery) return;
  const serial = currentQuery.serial;
  try {
    const maps = await explain(hit);
    if (!$("#why-toggle").checked || currentQuery.serial !== serial) return;
    overlay.src = maps.query;
    placeBox(overlay, { x: 0, y: 0, width: currentQuery.width, height: currentQuery.height }); // the whole image's
    overlay.classList.remove("hidden");
  } catch (_) { /* the card says why */ }
}

function toggleWhy() {
  const on = $("#why-toggle").checked;
  for (const card of document.querySelectorAll("#neighbours .neighbour")) {
    const hit = shownNeighbours.find((candidate) => String(candidate.id) === card.dataset.id);
    if (on && hit) whyOnCard(card, hit);
    else card.querySelectorAll(".why").forEach((overlay) => overlay.remove());
  }
  if (!on) $("#query-why").classList.add("hidden");
}

// -- compare: the query and one neighbour side by side, zoomed and panned together -----------------------

function openCompare(hit) {
  comparing = hit;
  const [query, neighbour] = [$("#pane-query"), $("#pane-neighbour")];
  const queryPicture = query.querySelector("img:not(.why)");
  revokeImage(queryPicture);
  const shown = $("#query-image");
  if (currentQuery.file && PREVIEWABLE.test(currentQuery.file.name)) {
    queryPicture.src = URL.createObjectURL(currentQuery.file);
  } else if (shown.src) {
    queryPicture.src = shown.src; // the query's thumbnail, still held by the page
  }
  thumbnailInto(neighbour.querySelector("img:not(.why)"), hit.thumbnail_url);
  $("#caption-query").textContent = $("#query-name").textContent;
  const caption = $("#caption-neighbour");
  caption.replaceChildren(element("strong", null, hit.code || "no code"));
  if (hit.words) caption.append(` — ${hit.words}`);
  caption.append(element("span", "muted", ` · ${hit.name} · similarity ${hit.score.toFixed(3)}`));
  if (hit.pacs && hit.pacs.viewer_url) caption.append(" · ", viewerLink(hit.pacs.viewer_url, hit.name));
  $("#compare-title").textContent = `Compare with ${hit.name}`;
  setView({ zoom: 1, x: 0, y: 0 });
  $("#compare-why").checked = $("#why-toggle").checked;
  $("#compare-why").disabled = $("#why-toggle").disabled;
  compareWhy();
  $("#compare-dialog").showModal();
}

// One zoom and pan for both panes.
function setView(next) {
  view = { ...view, ...next };
  view.zoom = Math.min(MAX_ZOOM, Math.max(1, view.zoom));
  for (const img of document.querySelectorAll("#compare-dialog .viewport img")) {
    img.style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.zoom})`;
  }
  $("#zoom-text").textContent = `${Math.round(view.zoom * 100)}%`;
}

// Window and level (0-255 of the shown grey values): the SVG filter maps [level - window/2, level +
// window/2] onto black to white, linearly, as a reading station does.
function setWindowLevel() {
  const width = Number($("#window-width").value) / 255, level = Number($("#window-level").value) / 255;
  const slope = 1 / width;
  const intercept = -(level - width / 2) * slope;
  for (const channel of document.querySelectorAll("#window-level-filter feComponentTransfer > *")) {
    channel.setAttribute("slope", slope.toFixed(4));
    channel.setAttribute("intercept", intercept.toFixed(4));
  }
}

async function compareWhy() {
  const on = $("#compare-why").checked;
  const overlays = document.querySelectorAll("#compare-dialog img.why");
  overlays.forEach((overlay) => overlay.classList.add("hidden"));
  if (!on || !comparing) return;
  const hit = comparing;
  try {
    const maps = await explain(hit);
    if (comparing !== hit || !$("#compare-why").checked) return;
    $("#pane-query img.why").src = maps.query;
    $("#pane-neighbour img.why").src = maps.neighbour;
    overlays.forEach((overlay) => overlay.classList.remove("hidden"));
  } catch (error) {
    $("#caption-neighbour").append(element("span", "error", ` · no map: ${error.message}`));
  }
}

function wireCompare() {
  const dialog = $("#compare-dialog");
  $("#zoom-in").addEventListener("click", () => setView({ zoom: view.zoom * ZOOM_STEP }));
  $("#zoom-out").addEventListener("click", () => setView({ zoom: view.zoom / ZOOM_STEP }));
  $("#zoom-reset").addEventListener("click", () => setView({ zoom: 1, x: 0, y: 0 }));
  $("#compare-close").addEventListener("click", () => dialog.close());
  $("#compare-why").addEventListener("change", compareWhy);
  for (const id of ["#window-width", "#window-level"]) $(id).addEventListener("input", setWindowLevel);
  let dragging = null;
  for (const pane of dialog.querySelectorAll(".viewport")) {
    pane.addEventListener("wheel", (event) => {
      event.preventDefault();
      setView({ zoom: view.zoom * (event.deltaY < 0 ? ZOOM_STEP : 1 / ZOOM_STEP) });
    }, { passive: false });
    pane.addEventListener("pointerdown", (event) => {
      pane.setPointerCapture(event.pointerId);
      dragging = { x: event.clientX - view.x, y: event.clientY - view.y };
    });
    pane.addEventListener("pointermove", (event) => {
      if (dragging) setView({ x: event.clientX - dragging.x, y: event.clientY - dragging.y });
    });
    pane.addEventListener("pointerup", () => { dragging = null; });
  }
  dialog.addEventListener("keydown", (event) => {
    if (event.target.tagName === "INPUT") return; // the sliders take their own arrow keys
    const step = 40;
    const moves = { ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
    if (moves[event.key]) {
      event.preventDefault();
      setView({ x: view.x + moves[event.key][0], y: view.y + moves[event.key][1] });
    } else if (event.key === "+" || event.key === "=") {
      setView({ zoom: view.zoom * ZOOM_STEP });
    } else if (event.key === "-") {
      setView({ zoom: view.zoom / ZOOM_STEP });
    }
  });
  dialog.addEventListener("close", () => {
    comparing = null;
    revokeImage(dialog.querySelector("#pane-query img:not(.why)"));
  });
}

// -- annotation -----------------------------------------------------------------------------------------

// Files are sent one per request, so that progress shows and one bad or large file fails alone. Files
// picked while a batch runs join it.
async function annotateFiles(files) {
  if (!files.length) return;
  if (!batch.running) Object.assign(batch, { total: 0, done: 0, failed: 0 });
  batch.queue.push(...files);
  batch.total += files.length;
  showProgress();
  if (batch.running) return;
  batch.running = true;
  while (batch.queue.length) {
    const file = batch.queue.shift();
    const form = new FormData();
    form.append("files", file);
    try {
      const answer = await apiJson("/v1/annotate", { method: "POST", body: form });
      answer.items.forEach(addProposal);
      for (const problem of answer.failed) addFailure(problem.name, problem.error);
    } catch (error) {
      addFailure(file.name, error.message);
    }
    batch.done += 1;
    showProgress();
  }
  batch.running = false;
  showProgress();
  refreshIndexInfo(); // new images: new counts and perhaps new codes in the filter menus
}

function showProgress() {
  const progress = $("#annotate-progress");
  progress.max = batch.total;
  progress.value = batch.done;
  const failed = batch.failed ? `, ${batch.failed} failed` : "";
  $("#annotate-count").textContent = `${batch.done} / ${batch.total}${batch.running ? "" : " done"}${failed}`;
}

function addFailure(name, reason) {
  batch.failed += 1;
  $("#annotate-failed").append(element("li", null, `${name}: ${reason}`));
  $("#annotate-failed-box").classList.remove("hidden");
}

function statusOf(state) {
  if (!state.trueCode) return "pending";
  return state.trueCode === state.proposed ? "accepted" : "corrected";
}

function showStatus(state) {
  const cell = state.row.querySelector(".status-cell");
  cell.textContent = cell.dataset.status = statusOf(state);
}

function addProposal(item) {
  if (annotated.has(item.id)) return; // the same image picked again: its row is there already
  $("#annotate-empty").classList.add("hidden");
  const row = element("tr");
  row.dataset.id = item.id;
  const state = { id: item.id, proposed: item.proposed, trueCode: item.true_code, row };
  annotated.set(item.id, state);

  const nameCell = row.insertCell();
  nameCell.append(element("div", null, item.name));
  if (item.duplicate) nameCell.append(element("span", "tag", "already indexed"));
  const img = element("img", "small-thumb");
  img.alt = item.name;
  row.insertCell().append(img);
  row.insertCell().append(element("code", "proposed", item.proposed || "–"));
  row.insertCell().textContent = percent(item.confidence);
  row.insertCell().textContent = item.words || "";

  // A proposal keeps its '*' (where the model stopped): the annotator completes it, the server refuses it as is.
  const input = element("input", "code-input");
  input.value = item.true_code || item.proposed || "";
  input.setAttribute("aria-label", `code for ${item.name}`);
  input.spellcheck = false;
  const markIncomplete = () => input.classList.toggle("incomplete", input.value.includes("*"));
  markIncomplete();
  input.addEventListener("input", markIncomplete);
  input.addEventListener("keydown", (event) => { if (event.key === "Enter") acceptRow(state); });
  const codeCell = row.insertCell();
  codeCell.append(input, element("div", "row-note"));

  row.append(element("td", "status-cell"));
  const accept = element("button", "accept", "Accept");
  accept.type = "button";
  accept.addEventListener("click", () => acceptRow(state));
  row.insertCell().append(accept);

  $("#annotate-table tbody").append(row);
  showStatus(state);
  thumbnailInto(img, `/v1/images/${item.id}/thumbnail`);
}

async function acceptRow(state) {
  const button = state.row.querySelector("button.accept");
  const note = state.row.querySelector(".row-note");
  const input = state.row.querySelector(".code-input");
  if (button.disabled) return;
  button.disabled = true;
  try {
    const image = await apiJson(`/v1/images/${state.id}/code`, {
      method: "PUT", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ code: input.value.trim() }),
    });
    state.trueCode = image.true_code;
    input.value = image.true_code;
    input.classList.remove("incomplete");
    note.textContent = image.words || "";
    note.classList.remove("error");
    showStatus(state);
  } catch (error) {
    note.textContent = error.message;
    note.classList.add("error");
  } finally {
    button.disabled = false;
  }
}

async function acceptAll() {
  for (const state of annotated.values()) if (!state.trueCode) await acceptRow(state);
}

async function exportAnnotations(format) {
  if (!annotated.size) {
    showMessage("Nothing to export yet: annotate some files first.");
    return;
  }
  showMessage("");
  try {
    const ids = [...annotated.keys()].join(",");
    const blob = await (await api(`/v1/annotations?ids=${ids}&format=${format}`)).blob();
    const link = element("a");
    link.href = URL.createObjectURL(blob);
    link.download = `annotations.${format}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000); // the download has started by then
  } catch (error) {
    showMessage(error.message);
  }
}

// -- wiring ---------------------------------------------------------------------------------------------

function showView(name) {
  for (const view of ["search", "annotate"]) {
    $(`#view-${view}`).classList.toggle("hidden", view !== name);
    $(`#tab-${view}`).classList.toggle("active", view === name);
  }
}

function dropTarget(zone, onFiles) {
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    event.stopPropagation();
    zone.classList.remove("over");
    onFiles([...event.dataTransfer.files]);
  });
}

function wireToken() {
  $("#token-form").addEventListener("submit", (event) => {
    const token = $("#token-input").value.trim();
    if (!token) {
      event.preventDefault();
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    if (tokenWaiters.length) {
      settleTokenWaiters();
    } else { // entered from the Token button: nothing waits, so load again what failed without a token
      showMessage("");
      refreshIndexInfo();
    }
  });
  // Closed without a token (Escape): what waited for one fails, visibly; the Token button asks again.
  $("#token-dialog").addEventListener("close", () => {
    if (!sessionStorage.getItem(TOKEN_KEY)) {
      settleTokenWaiters(new ApiError("no access token was given: click “Token…” to enter it"));
    }
  });
  $("#token-button").addEventListener("click", () => askToken("Enter the access token to use from now on."));
}

document.addEventListener("DOMContentLoaded", async () => {
  $("#tab-search").addEventListener("click", () => showView("search"));
  $("#tab-annotate").addEventListener("click", () => showView("annotate"));
  $("#file-input").addEventListener("change", (event) => pickQueryFile(event.target.files[0]));
  $("#pacs-form").addEventListener("submit", searchByPacs);
  dropTarget($("#drop-zone"), (files) => pickQueryFile(files[0]));
  for (const id of ["#anatomy-filter", "#biology-filter", "#k-select"]) $(id).addEventListener("change", runSearch);
  $("#refine").addEventListener("click", runSearch);
  $("#marks-clear").addEventListener("click", () => {
    marks.clear();
    document.querySelectorAll("#neighbours .neighbour").forEach(showMarks);
    showMarkCount();
    runSearch();
  });
  $("#why-toggle").addEventListener("change", toggleWhy);
  wireRegion();
  wireCompare();
  $("#annotate-input").addEventListener("change", (event) => {
    annotateFiles([...event.target.files]);
    event.target.value = ""; // picking the same files again must fire "change" again
  });
  dropTarget($("#annotate-drop"), annotateFiles);
  $("#accept-all").addEventListener("click", acceptAll);
  $("#export-csv").addEventListener("click", () => exportAnnotations("csv"));
  $("#export-json").addEventListener("click", () => exportAnnotations("json"));
  // A file dropped beside a drop zone would make the browser leave the page to show it.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
  wireToken();

  try {
    authRequired = (await (await fetch("/health")).json()).auth_required;
  } catch (error) {
    showMessage(`the server cannot be reached (${error.message})`);
    return;
  }
  $("#token-button").classList.toggle("hidden", !authRequired);
  refreshIndexInfo();
});
