// stage=serve's page: search by an image (POST /search) or by a gallery item (GET /search/by_key), and the
// eval stage's failures (GET /failures). Text from the server is set as text, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 20; // failures per request

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
  if (!response.ok) throw new Error(body.error || `${response.status}`);
  return body;
}

function imageUrl(key, split) {
  return `/image/${encodeURIComponent(key)}` + (split ? `?split=${encodeURIComponent(split)}` : "");
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(node, state, text) {
  node.dataset.state = state; // loading | done | error: what the browser test waits for
  node.textContent = text;
  node.classList.toggle("error", state === "error");
}

// --- search ---------------------------------------------------------------------------------------

function k() {
  return Math.max(1, parseInt($("k").value, 10) || 10);
}

function showQuery(src, caption, label) {
  $("query").hidden = false;
  $("query-image").src = src;
  $("query-caption").textContent = caption;
  $("query").dataset.label = label === undefined ? "" : String(label);
}

function thumbnail(hit, rank, queryLabel) {
  const card = element("figure", "result");
  Object.assign(card.dataset, {key: hit.key, label: String(hit.label), rank: String(rank)});
  if (queryLabel !== undefined) card.classList.add(hit.label === queryLabel ? "same" : "other");
  const img = element("img");
  img.src = imageUrl(hit.key);
  img.alt = hit.key;
  const caption = element("figcaption");
  caption.append(element("b", "", `${rank}. ${hit.class}`), element("span", "score", hit.score.toFixed(4)),
                 element("span", "key", hit.key));
  card.append(img, caption);
  card.title = "search from this image";
  card.addEventListener("click", () => searchByKey(hit.key));
  return card;
}

function showResults(answer, queryLabel) {
  const grid = $("results");
  grid.replaceChildren(...answer.results.map((hit, i) => thumbnail(hit, i + 1, queryLabel)));
  setStatus($("search-status"), "done", `top ${answer.results.length} of the index`);
}

async function searchFile(file) {
  if (!file) return;
  showView("search");
  showQuery(URL.createObjectURL(file), `uploaded: ${file.name}`);
  setStatus($("search-status"), "loading", "searching...");
  try {
    const answer = await api(`/search?k=${k()}`, {method: "POST", body: file,
      headers: {"Content-Type": file.type || "application/octet-stream"}});
    showResults(answer);
  } catch (error) {
    $("results").replaceChildren();
    setStatus($("search-status"), "error", error.message);
  }
}

async function searchByKey(key) {
  showView("search");
  setStatus($("search-status"), "loading", "searching...");
  try {
    const answer = await api(`/search/by_key?key=${encodeURIComponent(key)}&k=${k()}`);
    const q = answer.query;
    showQuery(imageUrl(q.key), `gallery item ${q.key} (${q.class})`, q.label);
    $("query").dataset.key = q.key;
    showResults(answer, q.label);
  } catch (error) {
    setStatus($("search-status"), "error", error.message);
  }
}

// --- where it fails -------------------------------------------------------------------------------

let failuresShown = 0;

function cell(item, kind, note) {
  const td = element("td", kind);
  if (!item) {
    td.append(element("span", "muted", note));
    return td;
  }
  const figure = element("figure", `hit ${kind}`);
  Object.assign(figure.dataset, {key: item.key, label: String(item.label)});
  const img = element("img");
  img.src = imageUrl(item.key, item.split);
  img.alt = item.key;
  const caption = element("figcaption");
  caption.append(element("b", "", item.class));
  if (item.similarity !== undefined) caption.append(element("span", "score", item.similarity.toFixed(4)));
  if (note) caption.append(element("span", "", note));
  caption.append(element("span", "key", item.key));
  figure.append(img, caption);
  if (item.searchable) {
    figure.classList.add("clickable");
    figure.title = "search from this image";
    figure.addEventListener("click", () => searchByKey(item.key));
  }
  td.append(figure);
  return td;
}

async function loadFailures() {
  setStatus($("failures-status"), "loading", "loading...");
  try {
    const answer = await api(`/failures?offset=${failuresShown}&limit=${PAGE}`);
    const against = answer.gallery_split === answer.query_split ? `${answer.query_split}, leave-one-out`
                                                               : `${answer.query_split} against ${answer.gallery_split}`;
    $("failures-summary").textContent =
      `${answer.wrong} of ${answer.queries} queries (${against}) have a wrong top-1 with the ${answer.model} model. ` +
      `Worst first: the later the first correct result (none in the first ${answer.depth}: last), ` +
      `then the larger the similarity gap between the wrong top-1 and it.`;
    const body = $("failures").tBodies[0];
    for (const f of answer.failures) {
      failuresShown += 1;
      const row = element("tr", "failure");
      row.append(element("td", "n", String(failuresShown)), cell(f.query, "query"), cell(f.top1, "wrong"),
                 cell(f.first_correct, "right", f.first_correct ? `rank ${f.first_correct.rank}` :
                                                                  `none in the first ${answer.depth}`));
      body.append(row);
    }
    $("more").hidden = failuresShown >= answer.listed;
    setStatus($("failures-status"), "done", answer.listed < answer.wrong ?
      `the ${answer.listed} worst are listed` : "");
  } catch (error) {
    setStatus($("failures-status"), "error", error.message);
  }
}

// --- views ----------------------------------------------------------------------------------------

function showView(name) {
  $("search-view").hidden = name !== "search";
  $("failures-view").hidden = name !== "failures";
  $("tab-search").classList.toggle("active", name === "search");
  $("tab-failures").classList.toggle("active", name === "failures");
  if (name === "failures" && failuresShown === 0 && $("failures-status").dataset.state !== "loading") loadFailures();
  history.replaceState(null, "", name === "failures" ? "#failures" : "#");
}

function setUp() {
  $("tab-search").addEventListener("click", () => showView("search"));
  $("tab-failures").addEventListener("click", () => showView("failures"));
  $("more").addEventListener("click", loadFailures);
  $("file").addEventListener("change", (event) => searchFile(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    searchFile(event.dataTransfer.files[0]);
  });
  api("/health").then((h) => {
    $("health").textContent = `${h.items} items, ${h.kind} index, model ${h.fingerprint}`;
    if (h.k) $("k").value = h.k;
  }).catch((error) => { $("health").textContent = error.message; });
  showView(location.hash === "#failures" ? "failures" : "search");
}

setUp();
