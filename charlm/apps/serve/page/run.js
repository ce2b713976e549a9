// charlm playground, the Run part: queue experiments from a form built by the server from the params
// declarations, start the queue, watch them learn (state pushed by the server as Server-Sent Events), compare.
// Uses app.js's helpers ($, el, api, apiUrl, visible, fmt, showError, clearError, guard). Text enters as text.
"use strict";

const run = {
  fields: [],        // from /api/runs/form: {key, section, type, help, value, ...}
  base: null,        // the experiment the form starts from; null: the workspace
  rows: [],          // experiments, from the pushed state
  live: {},          // name -> {train, val, sample, step}
  states: {},        // name -> last state seen, to notice one that finishes
  source: null,      // the EventSource
  ticked: [],        // names ticked for comparison, in the order they were ticked
  compared: null,    // the comparison's curves, drawn again when the width changes
};

const RUN_COLOURS = ["#0072b2", "#e69f00", "#009e73", "#cc79a7"];

async function runForm() {
  const q = run.base ? "?base=" + encodeURIComponent(run.base) : "";
  const data = await api("/api/runs/form" + q);
  if (data.read_only || !data.fields.length) {  // no --run, beyond loopback, or no repository: no Run part
    $("run").hidden = true;
    $("run-link").hidden = true;
    return false;
  }
  $("run").hidden = false;
  $("run-link").hidden = false;
  run.fields = data.fields;
  $("run-jobs").max = String(data.cores);
  $("run-cap").textContent = `At most ${data.max_queued} experiments wait in the queue at once; `
    + `up to ${data.cores} jobs (each gets its share of the ${data.cores} cores).`;
  renderFields();
  return true;
}

function renderFields() {
  const box = $("run-fields");
  box.replaceChildren();
  const sections = [...new Set(run.fields.map((f) => f.section))];
  for (const section of sections) {
    const group = el("details", { class: "run-section" });
    if (section === "model" || section === "train") group.open = true;
    group.append(el("summary", { text: section }));
    const grid = el("div", { class: "run-grid" });
    for (const f of run.fields.filter((x) => x.section === section)) {
      const id = "run-f-" + f.key.replace(/\./g, "-");
      const input = el("input", { id, type: "text", spellcheck: "false", autocomplete: "off",
        "data-key": f.key, "aria-describedby": id + "-help" });
      input.value = f.value === null ? "" : f.value;
      input.dataset.initial = input.value;
      input.addEventListener("input", () => input.classList.toggle("changed", input.value !== input.dataset.initial));
      const rules = [f.type + (f.nullable ? " or null" : "")];
      if (f.choices) rules.push("one of " + f.choices.join(", "));
      for (const [k, s] of [["ge", "≥"], ["gt", ">"], ["le", "≤"], ["lt", "<"]]) if (f[k] !== null) rules.push(s + " " + f[k]);
      grid.append(el("div", { class: "run-field" },
        el("label", { for: id, text: f.key }), input,
        el("span", { id: id + "-help", class: "run-help", text: visible((f.help ? f.help + " " : "") + "(" + rules.join(", ") + ")") })));
    }
    group.append(grid);
    box.append(group);
  }
}

async function queueRun(event) {
  event.preventDefault();
  const error = $("run-error");
  error.hidden = true;
  const values = {};
  for (const input of $("run-fields").querySelectorAll("input[data-key]")) {
    input.removeAttribute("aria-invalid");
    if (input.value !== input.dataset.initial) values[input.dataset.key] = input.value;
  }
  $("run-queue").disabled = true;
  $("run-status").textContent = "queueing…";
  try {
    const data = await api("/api/runs/queue", { name: $("run-name").value.trim(), values, base: run.base });
    $("run-status").textContent = "queued " + data.queued.map(visible).join(", ");
    $("run-name").value = "";
  } catch (e) {
    $("run-status").textContent = "";
    error.textContent = visible(e.message);
    error.hidden = false;
    for (const input of $("run-fields").querySelectorAll("input[data-key]")) {
      if (e.message.includes(" " + input.dataset.key + " ")) input.setAttribute("aria-invalid", "true");
    }
  } finally {
    $("run-queue").disabled = false;
  }
}

async function act(path, body, done) {
  clearError();
  const data = await api(path, body);
  if (done) done(data);
}

// ---------- the pushed state ----------

async function watchRuns() {
  const { stream } = await api("/api/runs/watch", {});
  const source = new EventSource(apiUrl(`/api/runs/streams/${stream}/events`));
  run.source = source;
  source.addEventListener("state", (e) => showState(JSON.parse(e.data)));
  source.onerror = () => {
    if (source.readyState !== EventSource.CLOSED) return;  // the browser reconnects by itself
    setTimeout(() => guard(watchRuns), 5000);
  };
}

function showState(state) {
  if (state.error) {
    $("run-state-note").textContent = visible(state.error);
    return;
  }
  $("run-state-note").textContent = "";
  let finished = false;
  for (const r of state.experiments) {
    const before = run.states[r.name];
    if (before && before !== "Success" && r.state === "Success") finished = true;
    run.states[r.name] = r.state;
  }
  run.rows = state.experiments;
  run.live = state.live || {};
  renderQueue();
  renderLive();
  renderBases();
  if (finished) $("refresh").click();  // a finished experiment is a model now: Models lists it
}

function renderQueue() {
  const body = $("run-table").querySelector("tbody");
  body.replaceChildren();
  const finished = new Set(run.rows.filter((r) => r.state === "Success").map((r) => r.name));
  run.ticked = run.ticked.filter((n) => finished.has(n));
  for (const r of run.rows) {
    const name = visible(r.name);
    const pick = el("input", { type: "checkbox", value: r.name, "aria-label": "compare " + name });
    pick.checked = run.ticked.includes(r.name);
    pick.disabled = !finished.has(r.name);
    pick.addEventListener("change", () => {
      run.ticked = run.ticked.filter((n) => n !== r.name).concat(pick.checked ? [r.name] : []);
    });
    const actions = el("td", { class: "run-actions" });
    const button = (text, fn) => {
      const b = el("button", { type: "button", text, "aria-label": text + " " + name });
      b.addEventListener("click", () => guard(fn));
      actions.append(b);
    };
    if (r.state === "Running") button("Kill", () => act("/api/runs/kill", { name: r.name }));
    if (r.state === "Failed") button("Log", () => act("/api/runs/logs", { name: r.name }, (d) => showLog(r.name, d.log)));
    if (r.state !== "Running") button("Remove", () => act("/api/runs/remove", { name: r.name }));
    const params = Object.entries(r.params || {}).map(([k, v]) => k + "=" + JSON.stringify(v)).join("  ");
    body.append(el("tr", { class: "state-" + r.state.toLowerCase() },
      el("td", {}, pick), el("td", { class: "name", text: name }), el("td", { text: r.state }),
      el("td", { class: "num", text: fmt(r.val_bpc) }), el("td", { class: "num", text: fmt(r.test_bpc) }),
      el("td", { class: "params", text: params }), actions));
  }
  $("run-empty").hidden = run.rows.length > 0;
}

function renderBases() {
  const select = $("run-base");
  const names = run.rows.filter((r) => r.state === "Success").map((r) => r.name);
  const current = select.value;
  select.replaceChildren(el("option", { value: "", text: "the workspace" }),
    ...names.map((n) => el("option", { value: n, text: visible(n) })));
  select.value = names.includes(current) ? current : "";
}

function showLog(name, text) {
  const log = $("run-log");
  log.hidden = false;
  log.replaceChildren(el("strong", { text: "Last lines of " + visible(name) + "'s log" }), "\n" + visible(text));
}

function renderLive() {
  const box = $("run-live");
  box.replaceChildren();
  for (const [name, live] of Object.entries(run.live)) {
    const card = el("div", { class: "run-card", "data-name": name }, el("h3", { text: visible(name) + " — running" }));
    if (!live || (!live.train.length && !live.val.length)) {
      card.append(el("p", { class: "note", text: "No curve yet. A stage that DVC restores from its run-cache does not "
        + "train, so such an experiment never has live curves." }));
    } else {
      card.append(plot([{ label: "train", colour: RUN_COLOURS[0], points: live.train, dashed: true },
        { label: "val", colour: RUN_COLOURS[0], points: live.val }], box.clientWidth));
      // Validation can come before the first train log (a fine-tune scores val at step 0): either may be empty.
      const train = live.train[live.train.length - 1], val = live.val[live.val.length - 1];
      const step = Math.max(train ? train[0] : -Infinity, val ? val[0] : -Infinity);
      card.append(el("p", { class: "note", text: `step ${step}: `
        + [train ? `train ${fmt(train[1])} bpc` : "", val ? `val ${fmt(val[1])} bpc` : ""].filter(Boolean).join(", ") }));
    }
    if (live && live.sample) card.append(el("pre", { class: "run-sample", text: `sample at step ${live.step}:\n` + visible(live.sample) }));
    box.append(card);
  }
}

// A line plot as inline SVG: [{label, colour, points: [[step, bpc]], dashed}], drawn at the width it is shown at.
function plot(series, width) {
  const W = Math.max(260, Math.min(900, width || 600)), H = 200, L = 46, R = 10, T = 10, B = 30;
  const all = series.flatMap((s) => s.points);
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("width", String(W));
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "bits per character against step: " + series.map((s) => s.label).join(", "));
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  add("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" });
  add("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" });
  for (const y of [y0, (y0 + y1) / 2, y1]) add("text", { x: L - 4, y: sy(y) + 4, "text-anchor": "end" }, y.toFixed(2));
  // The first step's label starts at the axis and the last one ends at the plot's edge, so neither is cut.
  add("text", { x: sx(x0), y: H - B + 16, "text-anchor": "start" }, String(Math.round(x0)));
  add("text", { x: sx(x1), y: H - B + 16, "text-anchor": "end" }, String(Math.round(x1)));
  add("text", { x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle" }, "step");
  for (const s of series) {
    if (!s.points.length) continue;
    add("polyline", { points: s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "),
      fill: "none", stroke: s.colour, "stroke-width": s.dashed ? 1.2 : 2, "stroke-dasharray": s.dashed ? "4 3" : "none",
      class: "run-series" });
  }
  return svg;
}

// ---------- compare ----------

async function compareRuns() {
  const names = run.ticked.slice();
  if (names.length < 2 || names.length > 4) {
    showError("Tick 2 to 4 finished experiments to compare.");
    return;
  }
  const data = await api("/api/runs/compare", { names });
  const out = $("run-compare-out");
  const head = el("tr", {}, el("th", { scope: "col", text: "param or metric" }),
    ...names.map((n, i) => el("th", { scope: "col" }, el("span", { class: "swatch-dot m" + i, "aria-hidden": "true" }), visible(n))));
  const cell = (v) => el("td", { class: "num", text: typeof v === "number" ? String(+v.toPrecision(6))
    : typeof v === "string" ? visible(v) : JSON.stringify(v) });
  const table = (rows, caption) => el("div", { class: "table-box" }, el("table", { class: "run-compare" },
    el("caption", { text: caption }), el("thead", {}, head.cloneNode(true)),
    el("tbody", {}, ...rows.map((r) => el("tr", { class: r.differs ? "differs" : "" },
      el("td", { class: "name", text: (r.differs ? "≠ " : "") + r.key }), ...r.values.map(cell))))));
  const differ = data.rows.filter((r) => r.differs), same = data.rows.filter((r) => !r.differs);
  const curves = await api("/api/curves?models=" + names.map((n) => encodeURIComponent("rev:" + n)).join(","));
  const series = [];
  curves.curves.forEach((c, i) => {
    series.push({ label: c.label + " train", colour: RUN_COLOURS[i], points: c.train || [], dashed: true });
    series.push({ label: c.label + " val", colour: RUN_COLOURS[i], points: c.val || [] });
  });
  out.replaceChildren();
  run.compared = series.some((s) => s.points.length) ? series : null;
  out.append(el("div", { id: "run-compare-plot" }));
  drawCompared();
  out.append(el("p", { class: "note", text: "Dashed: train; solid: validation. ≠ marks what differs." }),
    table(differ, `${differ.length} params and metrics differ`),
    el("details", {}, el("summary", { text: `${same.length} are the same` }), table(same, "the same in each")));
}

function drawCompared() {
  const box = $("run-compare-plot");
  if (box && run.compared) box.replaceChildren(plot(run.compared, box.clientWidth));
}

function initRun() {
  $("run-form").addEventListener("submit", (e) => guard(() => queueRun(e)));
  $("run-base").addEventListener("change", () => { run.base = $("run-base").value || null; guard(runForm); });
  $("run-start").addEventListener("click", () => guard(() => act("/api/runs/start", { jobs: +$("run-jobs").value },
    (d) => { $("run-status").textContent = `queue started with ${d.jobs} job${d.jobs > 1 ? "s" : ""}`; })));
  $("run-compare").addEventListener("click", () => guard(compareRuns));
  window.addEventListener("pagehide", () => { if (run.source) run.source.close(); });
  let width = $("run").clientWidth;
  window.addEventListener("resize", () => {  // plots are drawn at the width shown, so their text keeps its size
    if ($("run").clientWidth === width) return;
    width = $("run").clientWidth;
    renderLive();
    drawCompared();
  });
  guard(async () => { if (await runForm()) await watchRuns(); });
}

initRun();
