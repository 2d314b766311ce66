// ia3fuse studio page: every change posts the fusion to /api/outputs and redraws the outputs.
// No framework and nothing fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, weights: [], layer: null, method: "task_arithmetic", params: {}, seq: 0, shown: 0 };
let timer = null;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, body) {
  const init = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new Error("the studio server does not answer (" + err.message + "); is ia3fuse studio still running?");
  }
  const data = await response.json().catch(() => ({ error: "the server answered " + response.status + " without JSON" }));
  if (!response.ok || data.error) throw new Error(data.error || "request failed (" + response.status + ")");
  return data;
}

function fusion() {
  const params = {};
  for (const [name, value] of Object.entries(state.params)) params[name] = value;
  return { method: state.method, params, weights: state.weights.slice(), layer_weights: state.layer ? state.layer.map((r) => r.slice()) : null };
}

function cellColor(v) {
  const t = Math.max(-1, Math.min(1, v / 1.5));
  const c = (x) => Math.round(255 - Math.abs(t) * x);
  return t >= 0 ? `rgb(255, ${c(150)}, ${c(170)})` : `rgb(${c(170)}, ${c(140)}, 255)`;
}

// ---------------------------------------------------------------- drawing the controls
function drawMethods() {
  const select = $("method");
  select.innerHTML = "";
  for (const m of state.info.methods) {
    const opt = document.createElement("option");
    opt.value = m.name;
    opt.textContent = m.name + (m.searchable ? "" : " (no search)");
    select.appendChild(opt);
  }
  select.value = state.method;
  drawParams();
}

function drawParams() {
  const m = state.info.methods.find((x) => x.name === state.method);
  $("method-summary").textContent = m.summary;
  const box = $("params");
  box.innerHTML = "";
  state.params = {};
  for (const p of m.params) {
    const label = document.createElement("label");
    label.title = p.description;
    label.append(p.name + " ");
    let input;
    const choices = p.type.split("|").filter((c) => c !== "None");
    if (p.type === "bool") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = !!p.default;
      state.params[p.name] = !!p.default;
      input.addEventListener("change", () => { state.params[p.name] = input.checked; schedule(); });
    } else if (choices.length > 1 && !choices.includes("float") && !choices.includes("int")) {
      input = document.createElement("select");
      for (const c of choices) { const o = document.createElement("option"); o.value = c; o.textContent = c; input.appendChild(o); }
      input.value = p.default;
      state.params[p.name] = p.default;
      input.addEventListener("change", () => { state.params[p.name] = input.value; schedule(); });
    } else {
      input = document.createElement("input");
      input.type = "number";
      input.step = p.type.includes("int") ? "1" : "0.05";
      input.value = p.default === null ? "" : p.default;
      state.params[p.name] = p.default;
      input.addEventListener("input", () => {
        state.params[p.name] = input.value === "" ? null : Number(input.value);
        schedule();
      });
    }
    input.id = "param-" + p.name;
    label.appendChild(input);
    box.appendChild(label);
  }
}

function drawSliders() {
  const box = $("sliders");
  box.innerHTML = "";
  state.info.adapters.forEach((name, k) => {
    const row = document.createElement("div");
    row.className = "slider";
    const label = document.createElement("label");
    label.textContent = name;
    label.htmlFor = "slider-" + k;
    const range = document.createElement("input");
    Object.assign(range, { type: "range", min: -1, max: 2, step: 0.01, id: "slider-" + k });
    const number = document.createElement("input");
    Object.assign(number, { type: "number", step: 0.01, id: "weight-" + k });
    range.value = number.value = state.weights[k];
    const set = (v) => {
      if (!Number.isFinite(v)) return;
      state.weights[k] = v;
      range.value = number.value = v;
      if (state.layer) { state.layer[k] = state.layer[k].map(() => v); drawHeatmap(); }
      schedule();
    };
    range.addEventListener("input", () => set(Number(range.value)));
    number.addEventListener("change", () => set(Number(number.value)));
    row.append(label, range, number);
    box.appendChild(row);
  });
  const grad = $("grad-adapter");
  grad.innerHTML = "";
  state.info.adapters.forEach((name, k) => { const o = document.createElement("option"); o.value = k; o.textContent = name; grad.appendChild(o); });
}

function drawHeatmap() {
  const table = $("heatmap");
  table.innerHTML = "";
  if (!state.layer) return;
  const head = table.insertRow();
  head.appendChild(document.createElement("th"));
  state.info.groups.forEach((g) => { const th = document.createElement("th"); th.textContent = "layer " + g.split(".").pop(); th.title = g; head.appendChild(th); });
  state.info.adapters.forEach((name, k) => {
    const row = table.insertRow();
    const th = document.createElement("th");
    th.textContent = name;
    row.appendChild(th);
    state.layer[k].forEach((v, g) => {
      const td = row.insertCell();
      td.style.background = cellColor(v);
      const input = document.createElement("input");
      Object.assign(input, { type: "number", step: 0.05, value: Number(v.toFixed(4)), id: `cell-${k}-${g}` });
      input.addEventListener("change", () => {
        const x = Number(input.value);
        if (!Number.isFinite(x)) return;
        state.layer[k][g] = x;
        td.style.background = cellColor(x);
        schedule();
      });
      td.appendChild(input);
    });
  });
}

function setFusion(f) {
  state.method = f.method;
  $("method").value = f.method;
  drawParams();
  for (const [name, value] of Object.entries(f.params || {})) {
    if (!(name in state.params)) continue;
    state.params[name] = value;
    const input = $("param-" + name);
    if (input.type === "checkbox") input.checked = !!value; else input.value = value === null ? "" : value;
  }
  state.weights = f.weights.slice();
  state.layer = f.layer_weights ? f.layer_weights.map((r) => r.slice()) : null;
  $("per-layer").checked = !!state.layer;
  $("layer-map").hidden = !state.layer;
  state.weights.forEach((v, k) => { $("slider-" + k).value = v; $("weight-" + k).value = Number(v.toFixed(4)); });
  drawHeatmap();
  schedule(0);
}

// ---------------------------------------------------------------- outputs
function schedule(delay = 120) {
  clearTimeout(timer);
  document.body.dataset.pending = "1";
  timer = setTimeout(refresh, delay);
}

async function refresh() {
  const seq = ++state.seq;
  const prompts = $("prompts").value.split("\n").filter((p) => p.trim());
  $("status").textContent = "computing…";
  try {
    const out = await api("/api/outputs", { fusion: fusion(), prompts, max_new_tokens: Number($("max-tokens").value) });
    if (seq !== state.seq) return; // a newer change is on its way
    drawOutputs(out);
    showError("");
    $("status").textContent = "ready";
  } catch (err) {
    if (seq !== state.seq) return;
    showError(err.message);
    $("status").textContent = "error";
  }
  document.body.dataset.pending = "0";
  document.body.dataset.version = String(++state.shown);
}

function drawOutputs(out) {
  const table = $("results");
  table.innerHTML = "";
  const head = table.insertRow();
  ["prompt", ...out.columns].forEach((c) => { const th = document.createElement("th"); th.textContent = c; if (c === "fusion") th.className = "fusion"; head.appendChild(th); });
  out.rows.forEach((cells, i) => {
    const row = table.insertRow();
    const p = row.insertCell();
    p.textContent = out.prompts[i];
    cells.forEach((text, j) => {
      const td = row.insertCell();
      td.textContent = text;
      td.id = `out-${i}-${out.columns[j]}`;
      if (out.columns[j] === "fusion") td.className = "fusion";
    });
  });
  $("timing").textContent = `fusion: ${out.ms.toFixed(1)} ms (fuse + forwards)`;
  const scores = $("scores");
  scores.innerHTML = "";
  const names = Object.keys(out.scores);
  $("scores-title").hidden = names.length === 0;
  if (names.length) {
    const h = scores.insertRow();
    ["", ...names].forEach((c) => { const th = document.createElement("th"); th.textContent = c; h.appendChild(th); });
    for (const key of ["loss", "accuracy"]) {
      const row = scores.insertRow();
      row.insertCell().textContent = key === "accuracy" ? state.info.metric : key;
      names.forEach((n) => {
        const td = row.insertCell();
        const v = out.scores[n][key];
        td.textContent = key === "loss" ? v.toFixed(4) : (100 * v).toFixed(1) + "%";
        td.id = `score-${n}-${key}`;
        td.dataset.value = v;
        if (n === "fusion") td.className = "fusion";
      });
    }
  }
}

// ---------------------------------------------------------------- search
function drawCurve(history) {
  const svg = $("curve");
  const w = svg.width.baseVal.value, h = svg.height.baseVal.value, pad = 24;
  svg.innerHTML = "";
  if (!history.length) return;
  const xs = history.map((p) => p.forwards), ys = history.map((p) => p.objective);
  const x0 = 0, x1 = Math.max(...xs) || 1, y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => pad + (w - 2 * pad) * (x - x0) / (x1 - x0 || 1);
  const sy = (y) => h - pad - (h - 2 * pad) * (y - y0) / (y1 - y0 || 1);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", history.map((p) => `${sx(p.forwards)},${sy(p.objective)}`).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2a62c9");
  line.setAttribute("stroke-width", "1.5");
  svg.appendChild(line);
  const label = (text, x, y, anchor) => {
    const t = document.createElementNS("http://www.w3.org/2000/svg", "text");
    Object.entries({ x, y, "font-size": 10, "text-anchor": anchor, fill: "#5b6475" }).forEach(([k, v]) => t.setAttribute(k, v));
    t.textContent = text;
    svg.appendChild(t);
  };
  label(y1.toPrecision(4), 2, pad - 6, "start");
  label(y0.toPrecision(4), 2, h - 6, "start");
  label(`${x1} forward passes`, w - 2, h - 6, "end");
}

async function runSearch() {
  const button = $("search-run");
  button.disabled = true;
  $("search-status").textContent = "starting…";
  try {
    await api("/api/search", {
      fusion: fusion(),
      optimizer: $("optimizer").value,
      granularity: $("granularity").value,
      budget: Number($("budget").value),
      objective: $("objective").value,
    });
    showError("");
    for (;;) {
      await new Promise((r) => setTimeout(r, 250));
      const job = await api("/api/search");
      drawCurve(job.history);
      const last = job.history[job.history.length - 1];
      if (last) $("search-status").textContent = `running: ${last.forwards} forward passes, objective ${last.objective.toFixed(4)}, best ${last.best.toFixed(4)}`;
      if (job.state === "error") throw new Error(job.error);
      if (job.state === "done") {
        const r = job.result;
        $("search-status").textContent = `done: ${r.objective} ${r.initial.toFixed(4)} → ${r.final.toFixed(4)}; the found weights are in the sliders`;
        setFusion(r.fusion);
        break;
      }
    }
  } catch (err) {
    showError(err.message);
    $("search-status").textContent = "search failed";
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- export
async function runExport() {
  const button = $("export-run");
  button.disabled = true;
  $("export-status").textContent = "writing…";
  try {
    const out = await api("/api/export", {
      fusion: fusion(),
      folder: $("export-folder").value,
      name: $("export-name").value,
      adapter: $("export-adapter").checked,
      recipe: $("export-recipe").checked,
      fold: $("export-fold").checked,
      overwrite: $("export-overwrite").checked,
    });
    showError("");
    $("export-status").textContent = `wrote ${out.written.join(", ")} in ${out.folder}`;
  } catch (err) {
    showError(err.message);
    $("export-status").textContent = "export failed";
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- start
async function start() {
  try {
    state.info = await api("/api/info");
  } catch (err) {
    showError(err.message);
    return;
  }
  const info = state.info;
  $("title").textContent = `${info.title} (${info.family}), ${info.adapters.length} adapters, ${info.examples} examples`;
  state.weights = info.adapters.map(() => Number((1 / info.adapters.length).toFixed(4)));
  drawMethods();
  drawSliders();
  $("prompts").value = info.prompts.join("\n");
  $("export-fold").disabled = !info.can_fold;
  if (!info.examples) { $("search-run").disabled = true; $("search-status").textContent = "start the studio with --data FILE.jsonl to search"; }
  $("method").addEventListener("change", () => { state.method = $("method").value; drawParams(); schedule(); });
  $("per-layer").addEventListener("change", () => {
    state.layer = $("per-layer").checked ? info.adapters.map((_, k) => info.groups.map(() => state.weights[k])) : null;
    $("layer-map").hidden = !state.layer;
    drawHeatmap();
    schedule();
  });
  $("grad-apply").addEventListener("click", () => {
    if (!state.layer) return;
    const k = Number($("grad-adapter").value), a = Number($("grad-from").value), b = Number($("grad-to").value);
    const n = info.groups.length;
    state.layer[k] = info.groups.map((_, g) => (n === 1 ? b : a + (b - a) * g / (n - 1)));
    drawHeatmap();
    schedule();
  });
  $("prompts").addEventListener("input", () => schedule(400));
  $("max-tokens").addEventListener("change", () => schedule());
  $("search-run").addEventListener("click", runSearch);
  $("export-run").addEventListener("click", runExport);
  schedule(0);
}

start();
