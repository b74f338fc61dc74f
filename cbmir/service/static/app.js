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
let currentQuery = null; // {file} for an uploaded radiograph, or {id} for an indexed one
let searchSerial = 0;    // only the latest search may render: an earlier answer arriving late is dropped
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
  $("#neighbours").classList.add("stale");
  try {
    let result;
    if (currentQuery.file) {
      const form = new FormData();
      form.append("file", currentQuery.file);
      for (const [key, value] of Object.entries(filterParams())) form.append(key, value);
      result = await apiJson("/v1/search", { method: "POST", body: form });
    } else {
      result = await apiJson(`/v1/images/${currentQuery.id}/similar?${new URLSearchParams(filterParams())}`);
    }
    if (serial !== searchSerial) return;
    renderPrediction(result.prediction);
    $("#results-title").textContent = result.prediction
      ? `Similar prior cases to ${result.query.name}`
      : `Similar to ${result.query.name} (indexed image ${result.query.id})`;
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

// The grid of similar cases; null empties it.
function renderNeighbours(neighbours) {
  const grid = $("#neighbours");
  grid.querySelectorAll("img").forEach(revokeImage);
  grid.replaceChildren();
  if (!neighbours) return;
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
    const code = element("span", "hit-code", hit.code || "–");
    if (hit.code && !hit.true_code) code.append(element("span", "tag", "predicted"));
    card.append(img, element("span", "score", hit.score.toFixed(3)), code);
    if (hit.words) card.append(element("span", "hit-words", hit.words));
    card.append(element("span", "hit-name", hit.name));
    card.addEventListener("click", () => searchById(hit));
    grid.append(card);
    thumbnailInto(img, hit.thumbnail_url);
  }
}

function searchById(hit) {
  currentQuery = { id: hit.id };
  showQuery(`${hit.name} · indexed image ${hit.id} · ${hit.code || "no code"}`);
  thumbnailInto($("#query-image"), hit.thumbnail_url);
  window.scrollTo({ top: 0 });
  runSearch();
}

function pickQueryFile(file) {
  if (!file) return;
  currentQuery = { file };
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

// Shows the query's caption, with its image emptied (a new picture or none follows).
function showQuery(caption) {
  const img = $("#query-image");
  img.dataset.thumbnail = ""; // a thumbnail still on its way is for an earlier query
  revokeImage(img);
  img.classList.remove("hidden", "missing");
  $("#query-name").textContent = caption;
  $("#query-preview").classList.remove("hidden");
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
  dropTarget($("#drop-zone"), (files) => pickQueryFile(files[0]));
  for (const id of ["#anatomy-filter", "#biology-filter", "#k-select"]) $(id).addEventListener("change", runSearch);
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
