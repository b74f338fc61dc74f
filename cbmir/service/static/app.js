// The cbmir web page: search similar radiographs and pre-label images with IRMA codes, over the /v1 API.
// Plain JavaScript, no build step. Every /v1 call carries the bearer token, so thumbnails are fetched
// with it and shown through blob URLs rather than plain <img src>.
"use strict";

const TOKEN_KEY = "cbmir-token";
const $ = (selector) => document.querySelector(selector);

let authRequired = true;
let currentQuery = null; // {file} for an uploaded radiograph, or {id, name} for an indexed one
let gridBlobs = [];      // blob URLs of the shown thumbnails, revoked when the grid is replaced
let queryBlob = null;
let searchSerial = 0;    // only the latest search may render: an earlier answer arriving late is dropped
const annotated = new Map(); // image id -> row state of the annotation table

// -- talking to the API ---------------------------------------------------------------------------------

class ApiError extends Error {}

function askToken(reason) {
  $("#token-reason").textContent = reason || "This server needs the access token you were given.";
  $("#token-input").value = "";
  if (!$("#token-dialog").open) $("#token-dialog").showModal();
  $("#token-input").focus();
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", `Bearer ${token}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    throw new ApiError(`the server cannot be reached (${error.message})`);
  }
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    askToken("The token was not accepted. Enter the access token again.");
    throw new ApiError("a valid access token is needed");
  }
  if (!response.ok) {
    let text = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error) text = body.error;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(text);
  }
  return response;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

function showMessage(text) {
  const box = $("#message");
  box.textContent = text;
  box.classList.toggle("hidden", !text);
}

function percent(value) {
  return value == null ? "–" : `${(100 * value).toFixed(1)}%`;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

async function thumbnailInto(img, url) {
  try {
    const blob = await (await api(url)).blob();
    const objectUrl = URL.createObjectURL(blob);
    gridBlobs.push(objectUrl);
    img.src = objectUrl;
  } catch (error) {
    img.alt = `no thumbnail: ${error.message}`;
    img.classList.add("missing");
  }
}

// -- filter menus ---------------------------------------------------------------------------------------

async function loadCodes() {
  const codes = await apiJson("/v1/codes");
  fillMenu($("#anatomy-filter"), codes.axes.anatomical || []);
  fillMenu($("#biology-filter"), codes.axes.biological || []);
}

function fillMenu(select, entries) {
  select.replaceChildren(new Option("any", ""));
  for (const entry of entries) {
    const indent = "\u00a0\u00a0\u00a0".repeat(entry.level - 1);
    const words = entry.text ? ` — ${entry.text}` : "";
    select.append(new Option(`${indent}${entry.code}${words} (${entry.count})`, entry.code));
  }
}

// -- search ---------------------------------------------------------------------------------------------

function filterParams() {
  const params = { k: $("#k-select").value };
  if ($("#anatomy-filter").value) params.anatomy = $("#anatomy-filter").value;
  if ($("#biology-filter").value) params.biology = $("#biology-filter").value;
  return params;
}

async function runSearch() {
  if (!currentQuery) return;
  const serial = ++searchSerial;
  showMessage("");
  $("#busy").classList.remove("hidden");
  try {
    let result;
    if (currentQuery.file) {
      const form = new FormData();
      form.append("file", currentQuery.file);
      for (const [key, value] of Object.entries(filterParams())) form.append(key, value);
      result = await apiJson("/v1/search", { method: "POST", body: form });
      if (serial !== searchSerial) return;
      renderPrediction(result.prediction);
      $("#results-title").textContent = `Similar prior cases to ${result.query.name}`;
    } else {
      const query = new URLSearchParams(filterParams());
      result = await apiJson(`/v1/images/${currentQuery.id}/similar?${query}`);
      if (serial !== searchSerial) return;
      $("#results-title").textContent = `Similar to ${result.query.name} (indexed image ${result.query.id})`;
    }
    renderNeighbours(result.neighbours);
  } catch (error) {
    if (serial === searchSerial) showMessage(error.message);
  } finally {
    if (serial === searchSerial) $("#busy").classList.add("hidden");
  }
}

function renderPrediction(prediction) {
  const box = $("#prediction");
  box.replaceChildren();
  if (!prediction) return;
  box.append(element("h2", null, "Predicted"));
  const code = element("p", "code", prediction.label);
  code.append(element("span", "confidence", ` ${percent(prediction.confidence)}`));
  box.append(code);
  if (prediction.words) box.append(element("p", "words", prediction.words));
  const rows = prediction.kind === "irma"
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

function renderNeighbours(neighbours) {
  for (const url of gridBlobs) URL.revokeObjectURL(url);
  gridBlobs = [];
  const grid = $("#neighbours");
  grid.replaceChildren();
  if (!neighbours.length) {
    grid.append(element("p", "empty", "No indexed image matches these filters."));
    return;
  }
  for (const hit of neighbours) {
    const card = element("button", "neighbour");
    card.type = "button";
    card.dataset.id = hit.id;
    card.dataset.code = hit.code || "";
    card.title = `Search for radiographs similar to ${hit.name}`;
    const img = element("img");
    img.alt = hit.name;
    card.append(img, element("span", "score", hit.score.toFixed(3)), element("span", "hit-code", hit.code || "–"));
    if (hit.words) card.append(element("span", "hit-words", hit.words));
    card.append(element("span", "hit-name", `${hit.name}${hit.true_code ? "" : " (predicted)"}`));
    card.addEventListener("click", () => {
      currentQuery = { id: hit.id, name: hit.name };
      renderPrediction(null);
      showQuery(img.src, hit.name);
      runSearch();
    });
    grid.append(card);
    thumbnailInto(img, hit.thumbnail_url);
  }
}

function showQuery(src, name) {
  $("#query-preview").classList.remove("hidden");
  const img = $("#query-image");
  img.classList.toggle("hidden", !src);
  if (src) img.src = src;
  $("#query-name").textContent = name;
}

function pickQueryFile(file) {
  if (!file) return;
  if (queryBlob) URL.revokeObjectURL(queryBlob);
  const viewable = /\.(png|jpe?g|bmp)$/i.test(file.name);
  queryBlob = viewable ? URL.createObjectURL(file) : null;
  showQuery(queryBlob, `${file.name} (${(file.size / 1024).toFixed(0)} KiB)${viewable ? "" : " — no preview for this format"}`);
  currentQuery = { file };
  runSearch();
}

// -- annotation -----------------------------------------------------------------------------------------

async function annotateFiles(files) {
  const progress = $("#annotate-progress");
  progress.max = files.length;
  progress.value = 0;
  let failed = 0;
  for (const [done, file] of files.entries()) {
    $("#annotate-count").textContent = `${done} / ${files.length}`;
    const form = new FormData();
    form.append("files", file);
    try {
      const batch = await apiJson("/v1/annotate", { method: "POST", body: form });
      batch.items.forEach(addProposal);
      for (const problem of batch.failed) { failed += 1; addFailure(problem.name, problem.error); }
    } catch (error) {
      failed += 1;
      addFailure(file.name, error.message);
    }
    progress.value = done + 1;
  }
  $("#annotate-count").textContent = `${files.length} / ${files.length} done${failed ? `, ${failed} failed` : ""}`;
}

function addFailure(name, reason) {
  $("#annotate-failed").append(element("li", null, `${name}: ${reason}`));
}

function statusOf(state) {
  if (!state.trueCode) return "pending";
  return state.trueCode === state.proposed ? "accepted" : "corrected";
}

function addProposal(item) {
  if (annotated.has(item.id)) return;
  const row = element("tr");
  row.dataset.id = item.id;
  const state = { id: item.id, proposed: item.proposed, trueCode: item.true_code, row };
  annotated.set(item.id, state);
  row.insertCell().textContent = item.name + (item.duplicate ? " (already indexed)" : "");
  const img = element("img", "small-thumb");
  img.alt = item.name;
  row.insertCell().append(img);
  thumbnailInto(img, `/v1/images/${item.id}/thumbnail`);
  row.insertCell().append(element("code", null, item.proposed || "–"));
  row.insertCell().textContent = percent(item.confidence);
  row.insertCell().textContent = item.words || "";
  const input = element("input", "code-input");
  input.value = item.true_code || (item.proposed || "").replaceAll("*", "0");
  input.setAttribute("aria-label", `code for ${item.name}`);
  row.insertCell().append(input);
  const status = element("td", "status-cell", statusOf(state));
  row.append(status);
  const accept = element("button", "accept", "Accept");
  accept.type = "button";
  accept.addEventListener("click", () => acceptRow(state));
  row.insertCell().append(accept);
  $("#annotate-table tbody").append(row);
}

async function acceptRow(state) {
  const status = state.row.querySelector(".status-cell");
  const code = state.row.querySelector(".code-input").value.trim();
  try {
    const image = await apiJson(`/v1/images/${state.id}/code`, {
      method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ code }),
    });
    state.trueCode = image.true_code;
    status.textContent = statusOf(state);
    status.classList.remove("error");
  } catch (error) {
    status.textContent = error.message;
    status.classList.add("error");
  }
}

async function exportAnnotations(format) {
  if (!annotated.size) { showMessage("Nothing to export yet: annotate some files first."); return; }
  try {
    const ids = [...annotated.keys()].join(",");
    const blob = await (await api(`/v1/annotations?ids=${ids}&format=${format}`)).blob();
    const link = element("a");
    link.href = URL.createObjectURL(blob);
    link.download = `annotations.${format}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
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
    zone.classList.remove("over");
    onFiles([...event.dataTransfer.files]);
  });
}

async function start() {
  try {
    const stats = await apiJson("/v1/stats");
    $("#status").textContent = `${stats.images} images · ${stats.model} · ${stats.index_type}`;
    await loadCodes();
  } catch (error) {
    if (!(error instanceof ApiError && $("#token-dialog").open)) showMessage(error.message);
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("#tab-search").addEventListener("click", () => showView("search"));
  $("#tab-annotate").addEventListener("click", () => showView("annotate"));
  $("#file-input").addEventListener("change", (event) => pickQueryFile(event.target.files[0]));
  dropTarget($("#drop-zone"), (files) => pickQueryFile(files[0]));
  for (const id of ["#anatomy-filter", "#biology-filter", "#k-select"]) $(id).addEventListener("change", runSearch);
  $("#annotate-input").addEventListener("change", (event) => annotateFiles([...event.target.files]));
  dropTarget($("#annotate-drop"), annotateFiles);
  $("#accept-all").addEventListener("click", async () => {
    for (const state of annotated.values()) if (!state.trueCode) await acceptRow(state);
  });
  $("#export-csv").addEventListener("click", () => exportAnnotations("csv"));
  $("#export-json").addEventListener("click", () => exportAnnotations("json"));
  $("#token-form").addEventListener("submit", () => {
    sessionStorage.setItem(TOKEN_KEY, $("#token-input").value.trim());
    start();
  });

  try {
    authRequired = (await (await fetch("/health")).json()).auth_required;
  } catch (error) {
    showMessage(`the server cannot be reached (${error.message})`);
    return;
  }
  if (authRequired && !sessionStorage.getItem(TOKEN_KEY)) askToken();
  else start();
});
