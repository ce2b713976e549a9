// charlm playground. Plain JavaScript, no library, no build step.
// Every piece of model or user text enters the page through textContent / createTextNode, never as HTML.
"use strict";

const MAX_MODELS = 4;
const SVG = "http://www.w3.org/2000/svg";
const TOKEN = new URLSearchParams(location.search).get("token");

const state = {
  models: [],        // from /api/models
  chosen: [],        // ids, in the order they were ticked
  extra: [],         // revisions added by hand: the server's rows for them
  curves: null,      // last /api/curves answer, drawn again when the width changes
  job: null,         // current generation: {id, source}
  read: null,        // last /api/score answer
  readChars: [],     // spans of the Read view, in order
  inside: { values: null, layers: 1, units: 0, kinds: ["output"] },  // last /api/activations answer
  write: null,       // the last writing: {models, outs: [{pre, chars: [span], scores: [score]}]}
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// ---------- API ----------

function apiUrl(path) {
  if (!TOKEN) return path;
  return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

async function api(path, body) {
  // JSON on a GET too: the server runs git, DVC or a model only for a request that a page on another site cannot
  // make, and this header is one it cannot send.
  const init = { headers: { "Content-Type": "application/json" } };
  if (body !== undefined) Object.assign(init, { method: "POST", body: JSON.stringify(body) });
  let res;
  try {
    res = await fetch(apiUrl(path), init);
  } catch (e) {
    throw new Error("The server did not answer (" + e.message + ")");
  }
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    const msg = data && typeof data.error === "string" ? data.error : `${res.status} ${res.statusText}`;
    throw new Error(msg);
  }
  return data;
}

// Bidirectional controls (U+202E and the like) reorder the text around them: a label holding one could pass for
// another model's name. They are shown by their code, as <U+202E>.
const BIDI = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

function visible(text) {
  return String(text).replace(BIDI, (c) => "<U+" + c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0") + ">");
}

function withVisibleLabel(m) {
  return typeof m.label === "string" ? { ...m, label: visible(m.label) } : m;
}

function showError(message) {
  $("message").textContent = visible(message);
  $("message-bar").hidden = false;
}

function clearError() {
  $("message").textContent = "";
  $("message-bar").hidden = true;
}

async function guard(fn) {
  try {
    await fn();
  } catch (e) {
    showError(e.message || String(e));
  }
}

// ---------- Models ----------

function allModels() {
  return state.models.concat(state.extra);
}

function modelById(id) {
  return allModels().find((m) => m.id === id) || { id, label: id, kind: "" };
}

function label(id) {
  return visible(modelById(id).label || id);
}

function fmt(x, digits = 4) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–";
}

function breakable(text) {
  // A path wraps after its slashes on a narrow screen, rather than in the middle of a name.
  return text.split("/").flatMap((part, i) => (i ? [el("wbr", {}), "/" + part] : [part]));
}

function differingParams(models) {
  // Params come as the ones that differ from the workspace's; show the keys on which the models that have any
  // disagree (all of them when only one model has params).
  const withParams = models.filter((m) => m.params && Object.keys(m.params).length);
  const keys = new Set();
  for (const m of withParams) for (const k of Object.keys(m.params)) keys.add(k);
  return [...keys].sort().filter((k) => withParams.length < 2
    || new Set(withParams.map((m) => JSON.stringify(m.params[k]))).size > 1);
}

async function loadModels(refresh) {
  const data = await api("/api/models" + (refresh ? "?refresh=1" : ""));
  state.models = (data.models || []).map(withVisibleLabel);
  const hint = $("models-hint");
  hint.textContent = data.hint || "";
  hint.hidden = !data.hint;
  const known = new Set(allModels().map((m) => m.id));
  state.chosen = state.chosen.filter((id) => known.has(id));
  if (!state.chosen.length && state.models.length) {
    const first = state.models.find((m) => m.kind === "workspace") || state.models[0];
    state.chosen = [first.id];
  }
  renderModels();
  chosenChanged();
}

function renderModels() {
  const body = $("models-table").querySelector("tbody");
  body.replaceChildren();
  const models = allModels();
  const keys = differingParams(state.models);
  for (const m of models) {
    const index = state.chosen.indexOf(m.id);
    const box = el("input", { type: "checkbox", "aria-label": "use " + label(m.id) });
    box.checked = index >= 0;
    box.addEventListener("change", () => toggleModel(m.id, box));
    const name = el("td", { class: "name" });
    if (index >= 0) name.append(el("span", { class: "swatch-dot m" + index, "aria-hidden": "true" }));
    name.append(...breakable(label(m.id)));
    if (state.extra.includes(m)) {
      const remove = el("button", { type: "button", class: "remove", "aria-label": "remove " + label(m.id),
        title: "remove this row", text: "×" });
      remove.addEventListener("click", () => removeRevision(m.id));
      name.append(remove);
    }
    const params = keys.filter((k) => m.params && k in m.params)
      .map((k) => k + "=" + JSON.stringify(m.params[k])).join("  ");
    const row = el("tr", { class: index >= 0 ? "chosen" : "" },
      el("td", {}, box), name, el("td", { text: m.kind || "" }),
      el("td", { class: "num", text: fmt(m.val_bpc) }), el("td", { class: "num", text: fmt(m.test_bpc) }),
      el("td", { text: m.precision || "–" }), el("td", { class: "params", text: params }));
    body.append(row);
  }
  $("models-empty").hidden = models.length > 0;
}

function toggleModel(id, box) {
  if (box.checked) {
    if (state.chosen.length >= MAX_MODELS) {
      box.checked = false;
      showError(`At most ${MAX_MODELS} models at once: untick one first.`);
      return;
    }
    state.chosen.push(id);
  } else {
    state.chosen = state.chosen.filter((x) => x !== id);
  }
  clearError();
  renderModels();
  chosenChanged();
}

async function addRevision(event) {
  // The server loads the model first: a revision it cannot read is an error beside the field, and nothing is added.
  event.preventDefault();
  const field = $("rev-name"), error = $("rev-error");
  const name = field.value.trim();
  if (!name) return;
  const id = "rev:" + name;
  if (!allModels().some((m) => m.id === id)) {
    $("rev-add").disabled = true;
    try {
      state.extra.push(withVisibleLabel(await api("/api/model?id=" + encodeURIComponent(id))));
    } catch (e) {
      error.textContent = visible(e.message);
      error.hidden = false;
      field.setAttribute("aria-invalid", "true");
      return;
    } finally {
      $("rev-add").disabled = false;
    }
  }
  error.hidden = true;
  field.removeAttribute("aria-invalid");
  field.value = "";
  if (state.chosen.includes(id)) renderModels();
  else toggleModel(id, { checked: true });
}

function removeRevision(id) {
  state.extra = state.extra.filter((m) => m.id !== id);
  state.chosen = state.chosen.filter((x) => x !== id);
  renderModels();
  chosenChanged();
}

function chosenChanged() {
  renderColourChoices();
  renderModelChoice($("in-model"));
  renderModelChoice($("hard-model"));
  guard(loadCurves);
}

// ---------- Write ----------

function numberField(id, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  const value = parse(raw);
  if (!isFinite(value)) throw new Error(`${$(id).labels[0].textContent}: ${raw} is not a number`);
  return value;
}

function endJob(status) {
  if (state.job) {
    state.job.source.close();
    state.job = null;
  }
  $("write-go").disabled = false;
  $("write-stop").disabled = true;
  if (status !== undefined) $("write-status").textContent = status;
}

async function write(event) {
  event.preventDefault();
  clearError();
  if (state.job) return;
  if (!state.chosen.length) return showError("Choose a model first (Models).");
  const models = state.chosen.slice();
  const prompt = $("prompt").value;
  const body = {
    models, prompt,
    temperature: numberField("temperature", parseFloat) ?? 0.8,
    top_k: numberField("top-k", (s) => parseInt(s, 10)) ?? 0,
    top_p: numberField("top-p", parseFloat) ?? 1,
    length: numberField("length", (s) => parseInt(s, 10)) ?? 300,
    seed: numberField("seed", (s) => parseInt(s, 10)),
    stop_at_eos: $("stop-eos").checked,
  };
  const columns = $("columns");
  columns.replaceChildren();
  $("write-tip").replaceChildren();
  $("write-command").hidden = true;
  // Each written character is a span coloured by the bits the model gave it (Read's scale), with its score kept
  // for the tip: the model's five guesses there and the character's rank.
  const outs = models.map((id, i) => {
    const ended = el("span", { class: "ended" });
    const pre = el("pre", { class: "text-out", role: "group",
      "aria-label": `written by ${label(id)}: use the arrow keys to move between characters` },
      el("span", { class: "prompt", text: prompt }));
    pre.dataset.model = id;
    pre.dataset.column = i;
    columns.append(el("div", { class: "column" },
      el("h3", {}, el("span", { class: "swatch-dot m" + i, "aria-hidden": "true" }), label(id), ended), pre));
    return { pre, ended, scores: [], chars: [] };
  });
  state.write = { models, outs };
  writeLegend();
  $("write-go").disabled = true;
  $("write-status").textContent = "starting…";
  let job;
  try {
    job = (await api("/api/generate", body)).job;
  } catch (e) {
    endJob("");
    return showError(e.message);
  }
  const source = new EventSource(apiUrl(`/api/jobs/${encodeURIComponent(job)}/events`));
  state.job = { id: job, source };
  $("write-stop").disabled = false;
  source.addEventListener("start", (e) => {
    const data = JSON.parse(e.data);
    $("write-status").textContent = `writing… seed ${data.seed}`;
    $("write-status").dataset.seed = data.seed;
    showCommand(body, data.seed);
  });
  source.addEventListener("piece", (e) => {
    const data = JSON.parse(e.data);
    data.pieces.forEach((piece, i) => {
      const out = outs[i];
      if (!out) return;
      if (piece === null) { out.ended.textContent = "ended"; return; }
      const score = data.scores[i];
      const span = el("span", { class: "ch " + (score ? surprisalClass(score.bits) : ""), tabindex: "-1", text: piece });
      span.dataset.index = out.chars.length;
      if (!out.chars.length) span.tabIndex = 0;
      out.chars.push(span);
      out.scores.push(score);
      out.pre.append(span);
    });
  });
  source.addEventListener("done", (e) => {
    const reason = JSON.parse(e.data).reason;
    const seed = $("write-status").dataset.seed;
    endJob(`${reason === "stopped" ? "stopped" : "finished"} · seed ${seed}`);
    $("write-status").dataset.done = reason;
  });
  source.addEventListener("error", (e) => {
    // An `event: error` from the server carries data; a bare error is the connection failing.
    let message = "The connection to the server was lost.";
    if (e.data) {
      try { message = JSON.parse(e.data).error; } catch (_) { message = String(e.data); }
    }
    if (!state.job || state.job.source !== source) return;
    endJob("failed");
    $("write-status").dataset.done = "error";
    showError(message);
  });
}

const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;

function shellWord(word) {
  // POSIX single quotes keep every character as it is; a quote inside is closed, escaped and reopened. A word
  // holding control characters is written as $'...' with them escaped: pasted raw, ESC [201~ would end the
  // terminal's bracketed paste and run what follows. A bare word may not start with = or ~, which zsh expands.
  if (/^[A-Za-z0-9_.,:\/+-][A-Za-z0-9_.,:\/=+-]*$/.test(word)) return word;
  if (!CONTROL.test(word)) return "'" + word.replace(/'/g, "'\\''") + "'";
  return "$'" + [...word].map((c) => {
    const code = c.codePointAt(0);
    if (c === "\\" || c === "'") return "\\" + c;
    if (code < 0x20 || code === 0x7f) return "\\x" + code.toString(16).padStart(2, "0");
    if (code >= 0x80 && code <= 0x9f) return "\\u" + code.toString(16).padStart(4, "0");
    return c;
  }).join("") + "'";
}

function showCommand(body, seed) {
  // The `charlm generate` line that writes the same text: one per model, since the command takes one model.
  // Every option is one --flag=value word, so a prompt that starts with "-" stays a value.
  const lines = body.models.map((id) => {
    const args = ["charlm", "generate", "--prompt=" + body.prompt, "--temperature=" + body.temperature,
      "--top-k=" + body.top_k, "--top-p=" + body.top_p, "--length=" + body.length, "--seed=" + seed];
    if (!body.stop_at_eos) args.push("--no-stop-at-eos");
    args.push(...(modelById(id).cli || []));
    return args.map(shellWord);
  });
  // Each word its own box, so a narrow screen wraps the line between words, never after the "--" of an option.
  $("write-command-text").replaceChildren(...lines.flatMap((words, i) => [
    ...(i ? ["\n"] : []),
    ...words.flatMap((word, j) => [...(j ? [" "] : []), el("span", { class: "word", text: word })]),
  ]));
  $("write-copied").textContent = "";
  $("write-command").hidden = false;
}

async function copyCommand() {
  const text = $("write-command-text").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("write-copied").textContent = "copied";
  } catch (e) {
    // No clipboard (a page not served from localhost, or permission refused): select it for Ctrl+C instead.
    const range = document.createRange();
    range.selectNodeContents($("write-command-text"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("write-copied").textContent = "selected: press Ctrl+C to copy";
  }
}

function writeLegend() {
  const on = $("write-colour").checked;
  $("columns").classList.toggle("plain", !on);
  if (on && state.write) renderLegend($("write-legend"), "bits of surprisal (at temperature 1, as Read scores it)", surprisalEntries());
  else $("write-legend").replaceChildren();
}

function writeTip(span) {
  const column = +span.closest("pre").dataset.column;
  const out = state.write && state.write.outs[column];
  if (!out) return;
  const score = out.scores[+span.dataset.index];
  const tip = $("write-tip");
  tip.replaceChildren(el("div", {}, "character ", el("code", { text: shownChar(span.textContent) }),
    ` (written character ${+span.dataset.index + 1})`));
  if (score) tip.append(...scoreTip(label(state.write.models[column]), column, score, span.textContent));
}

function writeKeys(e) {
  const span = e.target.closest(".ch");
  if (!span) return;
  const out = state.write.outs[+span.closest("pre").dataset.column];
  const i = +span.dataset.index;
  let next = null;
  if (e.key === "ArrowRight") next = i + 1;
  else if (e.key === "ArrowLeft") next = i - 1;
  else if (e.key === "Home") next = 0;
  else if (e.key === "End") next = out.chars.length - 1;
  else return;
  e.preventDefault();
  moveFocus(out.chars, next);
}

async function stop() {
  if (!state.job) return;
  $("write-stop").disabled = true;
  $("write-status").textContent = "stopping…";
  await guard(() => api(`/api/jobs/${encodeURIComponent(state.job.id)}/stop`, {}));
}

// ---------- Read ----------

const SURPRISAL_BINS = 8;  // one bit each; the last is 7 bits and more (viridis, style.css)
const DIFF_EDGES = [-2, -1, -0.25, 0.25, 1, 2];  // A - B bits -> 7 diverging bins (blue-orange, style.css)

function surprisalClass(bits) {
  return "s" + Math.max(0, Math.min(SURPRISAL_BINS - 1, Math.floor(bits)));
}

function diffClass(d) {
  let i = 0;
  while (i < DIFF_EDGES.length && d > DIFF_EDGES[i]) i++;
  return "d" + i;
}

function shownChar(ch) {
  if (ch === " ") return "␣";
  if (ch === "\n") return "⏎";
  if (ch === "\t") return "⇥";
  return ch;
}

function renderColourChoices() {
  const select = $("read-colour");
  const previous = select.value;
  select.replaceChildren();
  const ids = state.read ? state.read.models.map((m) => m.id) : state.chosen;
  ids.forEach((id, i) => select.append(el("option", { value: String(i), text: "bits of " + label(id) })));
  if (ids.length === 2) {
    select.append(el("option", { value: "diff", text: `difference (A − B bits): ${label(ids[0])} − ${label(ids[1])}` }));
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  select.disabled = ids.length < 2;
}

function renderLegend(box, caption, entries) {
  box.replaceChildren(el("span", { class: "cap", text: caption }));
  for (const [cls, text] of entries) box.append(el("span", { class: "sw " + cls, text }));
}

function readLegend() {
  const box = $("read-legend");
  if (!state.read) return box.replaceChildren();
  if ($("read-colour").value === "diff") {
    const names = ["≤ −2", "−2…−1", "−1…−¼", "±¼", "¼…1", "1…2", "> 2"];
    renderLegend(box, "A − B bits (blue: A better, orange: B better)", names.map((t, i) => ["d" + i, t]));
  } else {
    renderLegend(box, "bits of surprisal", surprisalEntries());
  }
}

function surprisalEntries() {
  const entries = [];
  for (let i = 0; i < SURPRISAL_BINS; i++) entries.push(["s" + i, i === SURPRISAL_BINS - 1 ? `${i}+` : `${i}–${i + 1}`]);
  return entries;
}

function colourRead() {
  if (!state.read) return;
  const mode = $("read-colour").value;
  const models = state.read.models;
  for (const span of state.readChars) {
    const item = +span.dataset.item, pos = +span.dataset.pos;
    let cls;
    if (mode === "diff") {
      cls = diffClass(models[0].scores[item][pos].bits - models[1].scores[item][pos].bits);
    } else {
      cls = surprisalClass(models[+mode || 0].scores[item][pos].bits);
    }
    span.className = "ch " + cls;
  }
  readLegend();
}

function renderRead(data) {
  state.read = data;
  const out = $("read-out");
  out.replaceChildren();
  state.readChars = [];
  data.items.forEach((text, item) => {
    const line = el("div", { class: "item" });
    [...text].forEach((ch, pos) => {
      const span = el("span", { class: "ch", tabindex: "-1", text: ch });
      span.dataset.item = item;
      span.dataset.pos = pos;
      span.dataset.index = state.readChars.length;
      state.readChars.push(span);
      line.append(span);
    });
    // Each item's bits per character, per model, after its text (not part of it: never selected or copied).
    const figures = data.models.map((m) => fmt(m.item_bpc[item], 2)).join(" · ");
    line.append(el("span", { class: "item-bpc", title: "bits per character of this item, per model",
      "aria-label": `item ${item + 1}: ${figures} bits per character`, text: figures }));
    out.append(line);
  });
  if (state.readChars.length) state.readChars[0].tabIndex = 0;
  const list = $("read-bpc");
  list.replaceChildren();
  data.models.forEach((m, i) => list.append(el("li", {},
    el("div", {}, el("span", { class: "swatch-dot m" + i, "aria-hidden": "true" }), label(m.id) + ": ",
      el("strong", { class: "bpc-value", text: fmt(m.bpc) }), ` bits per character over ${m.chars} characters`),
    bucketBar(m.buckets))));
  renderColourChoices();
  colourRead();
  $("read-tip").replaceChildren();
}

function showTip(span) {
  const data = state.read;
  if (!data) return;
  const item = +span.dataset.item, pos = +span.dataset.pos;
  const actual = data.items[item][pos];
  const tip = $("read-tip");
  tip.replaceChildren(el("div", {}, "character ", el("code", { text: shownChar(actual) }),
    ` (item ${item + 1}, position ${pos + 1})`));
  data.models.forEach((m, i) => tip.append(...scoreTip(label(m.id), i, m.scores[item][pos], actual)));
}

function scoreTip(name, index, score, actual) {
  // A model's bits and rank for the character, and its five most likely characters there (the actual one bold).
  const heading = el("h4", {}, el("span", { class: "swatch-dot m" + index, "aria-hidden": "true" }),
    `${name}: ${score.bits.toFixed(2)} bits, rank ${score.rank}`);
  const table = el("table", {});
  for (const [ch, p] of score.top) {
    table.append(el("tr", { class: ch === actual ? "actual" : "" },
      el("td", {}, el("code", { text: shownChar(ch) })), el("td", { class: "num", text: (100 * p).toFixed(1) + "%" })));
  }
  return [heading, table];
}

// GLTR's summary: how often the character was the model's first guess, in its top 3, its top 10, or further down.
function bucketBar(buckets) {
  const bar = el("div", { class: "buckets" });
  const parts = el("div", { class: "bucket-bar", "aria-hidden": "true" });
  buckets.forEach(([name, share], i) => {
    const part = el("span", { class: "b" + i, title: `${name}: ${(100 * share).toFixed(1)}%` });
    part.style.width = (100 * share).toFixed(2) + "%";
    parts.append(part);
  });
  const words = el("div", { class: "bucket-words" });
  buckets.forEach(([name, share], i) => words.append(el("span", {},
    el("span", { class: "key b" + i, "aria-hidden": "true" }), `${name} ${(100 * share).toFixed(1)}%`)));
  bar.append(parts, words);
  return bar;
}

function focusChar(index) {
  moveFocus(state.readChars, index);
}

function moveFocus(chars, index) {
  // One character of a text is in the tab order at a time (a roving tabindex): the one last moved to.
  if (!chars.length) return;
  index = Math.max(0, Math.min(chars.length - 1, index));
  for (const s of chars) if (s.tabIndex === 0) s.tabIndex = -1;
  chars[index].tabIndex = 0;
  chars[index].focus();
}

function readKeys(e) {
  // Left/Right: previous/next character; Up/Down: the same position in the previous/next item; Home/End.
  const span = e.target.closest(".ch");
  if (!span) return;
  const i = +span.dataset.index, item = +span.dataset.item, pos = +span.dataset.pos;
  const items = state.read ? state.read.items : [];
  const lineStart = (k) => i - pos - (k < item ? items.slice(k, item).reduce((n, t) => n + t.length, 0) : 0)
    + (k > item ? items.slice(item, k).reduce((n, t) => n + t.length, 0) : 0);
  const inItem = (k) => lineStart(k) + Math.min(pos, items[k].length - 1);
  if (e.key === "ArrowRight") focusChar(i + 1);
  else if (e.key === "ArrowLeft") focusChar(i - 1);
  else if (e.key === "ArrowDown") { if (item + 1 < items.length) focusChar(inItem(item + 1)); }
  else if (e.key === "ArrowUp") { if (item > 0) focusChar(inItem(item - 1)); }
  else if (e.key === "Home") focusChar(0);
  else if (e.key === "End") focusChar(state.readChars.length - 1);
  else return;
  e.preventDefault();
}

async function score() {
  clearError();
  if (!state.chosen.length) return showError("Choose a model first (Models).");
  const text = $("read-text").value;
  if (!text.trim()) return showError("Paste a text to score, or press Test item.");
  $("read-go").disabled = true;
  try {
    renderRead(await api("/api/score", { models: state.chosen.slice(), text }));
  } finally {
    $("read-go").disabled = false;
  }
}

async function testItem() {
  clearError();
  const data = await api("/api/test-item");
  $("read-text").value = data.text;
}

async function hardest() {
  clearError();
  const id = $("hard-model").value;
  if (!id) return showError("Choose a model first (Models).");
  $("hard-go").disabled = true;
  $("hard-status").textContent = "scoring the test split…";
  const list = $("hard-items");
  list.replaceChildren();
  let data;
  try {
    data = await api("/api/hardest?model=" + encodeURIComponent(id));
  } catch (e) {
    $("hard-status").textContent = "";
    throw e;
  } finally {
    $("hard-go").disabled = false;
  }
  const of = data.searched < data.total ? `the first ${data.searched.toLocaleString("en")} of ${data.total.toLocaleString("en")}`
    : `all ${data.total.toLocaleString("en")}`;
  $("hard-status").textContent = `${label(id)}: the ${data.items.length} hardest of ${of} test items`;
  for (const h of data.items) {
    // One click scores the item in Read, where its colours show what the model found surprising in it.
    const button = el("button", { type: "button", class: "hard-item" },
      el("strong", { text: `${h.bpc.toFixed(2)} bpc` }), ` · ${h.chars} chars · `, el("span", { class: "excerpt", text: visible(h.text) }));
    button.addEventListener("click", () => guard(async () => {
      $("read-text").value = h.text;
      await score();
      $("read").scrollIntoView({ block: "start" });
    }));
    list.append(el("li", {}, button));
  }
}

// ---------- Inside ----------

function renderModelChoice(select) {
  // A select of the chosen models that keeps its choice while that model stays chosen.
  const previous = select.value;
  select.replaceChildren();
  for (const id of state.chosen) select.append(el("option", { value: id, text: label(id) }));
  if (state.chosen.includes(previous)) select.value = previous;
}

function setOptions(select, values) {
  const previous = select.value;
  select.replaceChildren();
  for (const v of values) select.append(el("option", { value: String(v), text: String(v) }));
  if (values.map(String).includes(previous)) select.value = previous;
}

function insideRequest() {
  return {
    model: $("in-model").value,
    layer: parseInt($("in-layer").value, 10) || 0,
    kind: $("in-kind").value,
  };
}

async function showUnit() {
  clearError();
  if (!$("in-model").value) return showError("Choose a model first (Models).");
  const text = $("read-text").value;
  if (!text.trim()) return showError("Inside shows the Read text: paste one there, or press Test item.");
  const unit = Math.max(0, parseInt($("in-unit").value, 10) || 0);
  const req = insideRequest();
  const data = await api("/api/activations", { ...req, text, unit });
  state.inside = { ...data, text };  // the text shown, which a span search must send, whatever Read holds now
  setOptions($("in-layer"), [...Array(data.layers).keys()]);
  setOptions($("in-kind"), data.kinds);
  $("in-unit").max = String(data.units - 1);
  $("in-unit").value = String(unit);
  $("in-shown").textContent = `${label(req.model)} · layer ${req.layer} · ${req.kind} · unit ${unit} of ${data.units}`;
  $("in-shown").dataset.unit = unit;
  let scale = 0;
  for (const row of data.values) for (const v of row) scale = Math.max(scale, Math.abs(v));
  if (req.kind === "output" || scale === 0) scale = Math.max(scale, 1);  // an output lies in [-1, 1]
  const bin = (v) => "d" + Math.max(0, Math.min(6, Math.floor(((v / scale) + 1) / 2 * 7)));
  const out = $("in-out");
  out.replaceChildren();
  data.items.forEach((text, item) => {
    const line = el("div", { class: "item" });
    [...text].forEach((ch, pos) => {
      const v = data.values[item][pos];
      const span = el("span", { class: "ch " + bin(v), title: v.toFixed(3), text: ch });
      span.dataset.item = item;
      span.dataset.pos = pos;
      line.append(span);
    });
    out.append(line);
  });
  state.inside.selection = [];
  const s = scale.toPrecision(2);
  renderLegend($("in-legend"), "activation", [["d0", "−" + s], ["d1", "\u00a0"], ["d2", "\u00a0"], ["d3", "0"], ["d4", "\u00a0"], ["d5", "\u00a0"], ["d6", "+" + s]]);
  for (const b of document.querySelectorAll("#in-units button, #span-units button")) {
    b.classList.toggle("current", b.dataset.unit === String(unit));
  }
}

function unitButton(unit, text) {
  // Shows the unit in the coloured text above, as the unit field would.
  const button = el("button", { type: "button", class: "unit", text });
  button.dataset.unit = String(unit);
  button.addEventListener("click", () => { $("in-unit").value = String(unit); guard(showUnit); });
  return button;
}

// ---------- Inside: the units of a span (LSTMVis's selection) and their heatmap ----------

function rememberSelection() {
  // The span chosen with the mouse in the coloured text, as [item, start, end] ranges; read when it changes,
  // since a click on a button may clear the selection before its handler runs.
  const sel = getSelection();
  if (!sel.rangeCount || sel.isCollapsed || !$("in-out").contains(sel.anchorNode)) return;
  const range = sel.getRangeAt(0);
  const spans = [];
  for (const c of $("in-out").querySelectorAll(".ch")) {
    if (!range.intersectsNode(c)) continue;
    const item = +c.dataset.item, pos = +c.dataset.pos;
    const last = spans[spans.length - 1];
    if (last && last[0] === item && last[2] === pos) last[2] = pos + 1;
    else spans.push([item, pos, pos + 1]);
  }
  state.inside.selection = spans;
  const n = spans.reduce((sum, [, a, b]) => sum + b - a, 0);
  $("span-text").value = "";
  $("span-status").textContent = `${n} selected character${n === 1 ? "" : "s"}`;
}

function occurrences(items, piece) {
  // Positions in characters (code points), as the server and the spans count them, not in UTF-16 units.
  const want = [...piece];
  const spans = [];
  if (!want.length) return spans;
  items.forEach((text, item) => {
    const chars = [...text];
    for (let at = 0; at + want.length <= chars.length; at++) {
      if (want.every((c, k) => chars[at + k] === c)) {
        spans.push([item, at, at + want.length]);
        at += want.length - 1;
      }
    }
  });
  return spans;
}

async function spanUnits() {
  clearError();
  if (!state.inside.items) await showUnit();
  if (!state.inside.items) return;
  const piece = $("span-text").value;
  const spans = piece ? occurrences(state.inside.items, piece) : state.inside.selection || [];
  if (!spans.length) {
    return showError(piece ? `"${visible(piece)}" does not occur in the text.` : "Select a span of the coloured text, or type a piece of it.");
  }
  const body = { ...insideRequest(), text: state.inside.text, spans };
  $("span-go").disabled = true;
  let data;
  try {
    data = await api("/api/span-units", body);
  } finally {
    $("span-go").disabled = false;
  }
  const list = $("span-units");
  list.replaceChildren();
  for (const u of data.units) {
    const where = u.score > 0 ? "on in the span" : "off in the span";
    list.append(el("li", {}, unitButton(u.unit,
      `unit ${u.unit}: ${where} (${u.score > 0 ? "+" : "−"}${Math.abs(u.score).toFixed(2)} sd; mean ${fmt(u.inside, 2)} there, ${fmt(u.outside, 2)} elsewhere)`)));
  }
  const n = spans.reduce((sum, [, a, b]) => sum + b - a, 0);
  $("span-status").textContent = `${n} character${n === 1 ? "" : "s"} in ${spans.length} span${spans.length === 1 ? "" : "s"}`;
  renderHeat(data, spans);
}

function renderHeat(data, spans) {
  // The text once, each character over a column of cells: one row per unit found, in the list's order, each row
  // scaled to its unit's largest |state| over the text, so every unit uses the whole palette.
  const box = $("heat");
  box.replaceChildren();
  const legend = $("heat-legend");
  const units = data.units.map((u) => u.unit);
  if (!units.length) {
    legend.hidden = true;
    return;
  }
  const scale = units.map((_, k) => Math.max(1e-12, ...data.values.flatMap((item) => item.map((row) => Math.abs(row[k])))));
  const picked = new Set(spans.flatMap(([item, a, b]) => Array.from({ length: b - a }, (_, j) => `${item}:${a + j}`)));
  data.items.forEach((text, item) => {
    const line = el("div", { class: "item" });
    [...text].forEach((ch, pos) => {
      const column = el("span", { class: "hc" + (picked.has(`${item}:${pos}`) ? " picked" : "") }, el("span", { class: "c", text: ch }));
      data.values[item][pos].forEach((v, k) => {
        column.append(el("i", { class: "d" + Math.max(0, Math.min(6, Math.floor((v / scale[k] + 1) / 2 * 7))) }));
      });
      line.append(column);
    });
    box.append(line);
  });
  renderLegend(legend, `rows, top to bottom: units ${units.join(", ")}; each row from its unit's −max (blue) to +max (orange); the span underlined`,
    [["d0", "−max"], ["d3", "0"], ["d6", "+max"]]);
  legend.hidden = false;
}

function stepUnit(delta) {
  const units = state.inside.units || Infinity;
  const unit = Math.min(units - 1, Math.max(0, (parseInt($("in-unit").value, 10) || 0) + delta));
  $("in-unit").value = String(unit);
  return guard(showUnit);
}

async function rankUnits() {
  clearError();
  if (!$("in-model").value) return showError("Choose a model first (Models).");
  const data = await api("/api/units", insideRequest());
  const note = $("in-note");
  note.textContent = data.note || "";
  note.hidden = !data.note;
  const list = $("in-units");
  list.replaceChildren();
  for (const f of data.features) {
    const li = el("li", {}, el("span", { class: "feature", text: f.feature + ":" }));
    for (const u of f.units) li.append(" ", unitButton(u.unit, `unit ${u.unit} (r = ${fmt(u.r, 2)})`));
    list.append(li);
  }
  const said = [];
  if (data.unexplained.length) said.push(`No unit explains ${data.unexplained.join(", ")} (none reaches |r| ≥ ${data.explained}).`);
  if (data.constant.length) said.push(`Not in the validation text, so not ranked: ${data.constant.join(", ")}.`);
  $("in-unexplained").textContent = said.join(" ");
  $("in-unexplained").hidden = !said.length;
}

// ---------- Curves ----------

function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const raw = span / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => span / s <= count) || 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

const COLOURS = ["#0072b2", "#e69f00", "#009e73", "#cc79a7"];  // Okabe-Ito: colour-blind safe

async function loadCurves() {
  const plot = $("curves-plot");
  const empty = $("curves-empty");
  if (!state.chosen.length) {
    plot.replaceChildren();
    empty.textContent = "Choose a model to see its learning curves.";
    empty.hidden = false;
    return;
  }
  const ids = state.chosen.slice();
  const data = await api("/api/curves?models=" + ids.map(encodeURIComponent).join(","));
  if (ids.join(",") !== state.chosen.join(",")) return;  // the choice changed meanwhile
  state.curves = (data.curves || []).map(withVisibleLabel);
  drawCurves(state.curves);
}

function drawCurves(curves) {
  const plot = $("curves-plot");
  const empty = $("curves-empty");
  const withData = curves.filter((c) => (c.train && c.train.length) || (c.val && c.val.length));
  plot.replaceChildren();
  if (!withData.length) {
    empty.textContent = "No training logs for the chosen models (a model file alone has no curves).";
    empty.hidden = false;
    return;
  }
  const missing = curves.filter((c) => !withData.includes(c)).map((c) => visible(c.label || c.id));
  empty.textContent = missing.length ? "No training logs for " + missing.join(", ") + "." : "";
  empty.hidden = !missing.length;
  // Drawn at the width it is shown at, so that its text keeps its size on a narrow screen; the legend is HTML
  // below it, where a long name wraps instead of being cut.
  const W = Math.max(280, Math.min(900, plot.clientWidth)), H = W < 600 ? 240 : 340, L = 52, R = 12, T = 14, B = 40;
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (const c of withData) for (const [s, v] of [...(c.train || []), ...(c.val || [])]) {
    x0 = Math.min(x0, s); x1 = Math.max(x1, s); y0 = Math.min(y0, v); y1 = Math.max(y1, v);
  }
  // Early train bpc is far above the rest; clip the y range to what the validation curves and late training show.
  const vals = withData.flatMap((c) => (c.val || []).map((p) => p[1]));
  if (vals.length) y1 = Math.min(y1, Math.max(...vals) + 0.6 * (Math.max(...vals) - Math.min(...vals) + 0.5));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  let yt = niceTicks(y0, y1, 6);
  const ystep = yt.length > 1 ? yt[1] - yt[0] : (y1 - y0);
  y0 = Math.floor(y0 / ystep + 1e-9) * ystep;  // the axis starts and ends on a tick
  y1 = Math.ceil(y1 / ystep - 1e-9) * ystep;
  yt = niceTicks(y0, y1, 6);
  const sx = (s) => L + (s - x0) / (x1 - x0) * (W - L - R);
  const sy = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);  // above y1: cut off by the clip path
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "bits per character against training step" });
  root.append(svg("title", {}, "Learning curves: train (dashed) and validation (solid) bits per character"));
  const axis = svg("g", { class: "axis" });
  for (const t of yt) {
    if (t < y0 || t > y1) continue;
    axis.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: sy(t), y2: sy(t) }));
    axis.append(svg("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end" }, t.toFixed(2)));
  }
  for (const t of niceTicks(x0, x1, 8)) {
    if (t < x0 || t > x1) continue;
    axis.append(svg("line", { x1: sx(t), x2: sx(t), y1: H - B, y2: H - B + 5 }));
    axis.append(svg("text", { x: sx(t), y: H - B + 18, "text-anchor": "middle" }, t >= 1000 ? `${t / 1000}k` : String(t)));
  }
  axis.append(svg("path", { d: `M${L},${T}V${H - B}H${W - R}`, fill: "none" }));
  axis.append(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "step"));
  axis.append(svg("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(T + H - B) / 2})` }, "bits per character"));
  root.append(axis);
  const clip = svg("clipPath", { id: "plot-area" });
  clip.append(svg("rect", { x: L, y: T - 2, width: W - L - R, height: H - T - B + 2 }));
  root.append(clip);
  const legend = el("ul", { class: "curves-legend" });
  curves.forEach((c) => {
    const i = ids().indexOf(c.id);
    const colour = COLOURS[i >= 0 ? i : 0];
    for (const kind of ["train", "val"]) {
      const points = c[kind] || [];
      if (!points.length) continue;
      const d = points.map(([s, v], j) => `${j ? "L" : "M"}${sx(s).toFixed(1)},${sy(v).toFixed(1)}`).join("");
      root.append(svg("path", { class: "series " + kind, d, stroke: colour, "clip-path": "url(#plot-area)" }));
      if (kind === "val") for (const [s, v] of points) if (v <= y1) root.append(svg("circle", { cx: sx(s), cy: sy(v), r: 2.5, fill: colour }));
      const sample = svg("svg", { width: 26, height: 10, "aria-hidden": "true" });
      sample.append(svg("line", { class: "series " + kind, x1: 1, x2: 25, y1: 5, y2: 5, stroke: colour }));
      const last = points[points.length - 1][1];
      legend.append(el("li", {}, sample, `${visible(c.label || c.id)} · ${kind} ${last.toFixed(3)}`));
    }
  });
  plot.append(root, curvesReadout(root, withData, { W, L, R, x0, x1, sx, top: T, bottom: H - B }), legend);
}

// Under the pointer, each line's bpc at its logged step nearest to it: a guide line in the plot, and below it a line
// of HTML per chosen model (where a long name wraps).
const READOUT_HINT = "Point at the plot to read each line's bits per character at that step.";

function curvesReadout(root, curves, { W, L, R, x0, x1, sx, top, bottom }) {
  const readout = el("p", { id: "curves-readout", class: "note", "aria-live": "polite", text: READOUT_HINT });
  const guide = svg("line", { class: "guide", y1: top, y2: bottom, visibility: "hidden" });
  root.append(guide);
  root.addEventListener("pointermove", (e) => {
    const box = root.getBoundingClientRect();
    const x = (e.clientX - box.left) * W / box.width;  // the viewBox's units
    const step = x0 + (Math.min(W - R, Math.max(L, x)) - L) / (W - L - R) * (x1 - x0);
    let shown = null;
    const parts = curves.map((c) => {
      const values = ["train", "val"].filter((kind) => (c[kind] || []).length).map((kind) => {
        const [s, v] = c[kind].reduce((best, p) => (Math.abs(p[0] - step) < Math.abs(best[0] - step) ? p : best));
        if (shown === null || Math.abs(s - step) < Math.abs(shown - step)) shown = s;
        return `${kind} ${v.toFixed(3)} at step ${s.toLocaleString("en")}`;
      });
      return `${visible(c.label || c.id)}: ${values.join(", ")}`;
    });
    guide.setAttribute("x1", sx(shown));
    guide.setAttribute("x2", sx(shown));
    guide.setAttribute("visibility", "visible");
    readout.replaceChildren(...parts.map((text) => el("span", { class: "line", text })));
  });
  root.addEventListener("pointerleave", () => {
    guide.setAttribute("visibility", "hidden");
    readout.textContent = READOUT_HINT;
  });
  return readout;
}

function ids() {
  return state.chosen;
}

// ---------- wiring ----------

function init() {
  $("message-close").addEventListener("click", clearError);
  $("refresh").addEventListener("click", () => guard(() => loadModels(true)));
  $("rev-form").addEventListener("submit", addRevision);
  $("write-form").addEventListener("submit", (e) => guard(() => write(e)));
  $("write-stop").addEventListener("click", () => guard(stop));
  $("read-go").addEventListener("click", () => guard(score));
  $("test-item").addEventListener("click", () => guard(testItem));
  $("read-colour").addEventListener("change", colourRead);
  const out = $("read-out");
  out.addEventListener("keydown", readKeys);
  out.addEventListener("focusin", (e) => { if (e.target.classList.contains("ch")) showTip(e.target); });
  out.addEventListener("mouseover", (e) => { if (e.target.classList && e.target.classList.contains("ch")) showTip(e.target); });
  out.addEventListener("click", (e) => { if (e.target.classList && e.target.classList.contains("ch")) focusChar(+e.target.dataset.index); });
  $("in-go").addEventListener("click", () => guard(showUnit));
  $("in-prev").addEventListener("click", () => stepUnit(-1));
  $("in-next").addEventListener("click", () => stepUnit(1));
  $("in-rank").addEventListener("click", () => guard(rankUnits));
  $("span-go").addEventListener("click", () => guard(spanUnits));
  $("span-text").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); guard(spanUnits); } });
  document.addEventListener("selectionchange", rememberSelection);
  $("hard-go").addEventListener("click", () => guard(hardest));
  $("write-colour").addEventListener("change", writeLegend);
  $("write-copy").addEventListener("click", () => guard(copyCommand));
  const columns = $("columns");
  columns.addEventListener("keydown", writeKeys);
  columns.addEventListener("focusin", (e) => { if (e.target.classList.contains("ch")) writeTip(e.target); });
  columns.addEventListener("mouseover", (e) => { if (e.target.classList && e.target.classList.contains("ch")) writeTip(e.target); });
  columns.addEventListener("click", (e) => {
    if (!e.target.classList || !e.target.classList.contains("ch")) return;
    const out = state.write.outs[+e.target.closest("pre").dataset.column];
    moveFocus(out.chars, +e.target.dataset.index);
  });
  $("in-unit").addEventListener("change", () => guard(showUnit));
  for (const id of ["in-model", "in-layer", "in-kind"]) $(id).addEventListener("change", () => guard(showUnit));
  $("inside").addEventListener("keydown", (e) => {
    if (e.key !== "[" && e.key !== "]") return;
    if (e.target.tagName === "TEXTAREA" || (e.target.tagName === "INPUT" && e.target.type === "text")) return;
    e.preventDefault();
    stepUnit(e.key === "]" ? 1 : -1);
  });
  window.addEventListener("pagehide", () => endJob(""));
  let width = $("curves-plot").clientWidth;
  window.addEventListener("resize", () => {
    if (!state.curves || $("curves-plot").clientWidth === width) return;
    width = $("curves-plot").clientWidth;
    drawCurves(state.curves);
  });
  guard(() => loadModels(false));
}

init();
