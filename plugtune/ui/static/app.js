// plugtune ui: plain JavaScript, no libraries, no network beyond this server.
"use strict";
const TOKEN = document.querySelector('meta[name="plugtune-token"]').content;
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const state = { info: null, models: [], history: [], run: null, runTimer: null, listTimer: null, exportTimer: null };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

// ---------------------------------------------------------------- errors: every one is shown in the page
function showError(message) {
  $("#error-text").textContent = message;
  $("#error-bar").hidden = false;
}
$("#error-close").addEventListener("click", () => { $("#error-bar").hidden = true; });
window.addEventListener("unhandledrejection", (ev) => showError(String(ev.reason && ev.reason.message || ev.reason)));

function headers(json = true) {
  const h = { "X-Plugtune-Token": TOKEN };
  if (json) h["Content-Type"] = "application/json";
  const key = $("#api-key").value || sessionStorage.getItem("plugtune-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

class APIError extends Error {
  constructor(message, body) { super(message); this.body = body; }
}

async function api(path, body, method) {
  const opts = { method: method || (body === undefined ? "GET" : "POST"), headers: headers(body !== undefined) };
  if (body !== undefined) opts.body = JSON.stringify(body);
  let resp;
  try { resp = await fetch(path, opts); } catch (e) { throw new APIError(`cannot reach the server (${e.message})`); }
  const text = await resp.text();
  let data = text;
  try { data = JSON.parse(text); } catch (e) { /* plain text answer */ }
  if (!resp.ok) {
    const msg = (data && data.error && data.error.message) || `${resp.status} ${resp.statusText}: ${text.slice(0, 200)}`;
    throw new APIError(msg, data);
  }
  return data;
}

async function guarded(fn) {
  try { return await fn(); } catch (e) { showError(e.message); return undefined; }
}

// ---------------------------------------------------------------- tabs (the hash keeps the place on reload)
function showTab(name) {
  for (const b of $$("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of $$(".tab")) s.hidden = s.id !== "tab-" + name;
  if (name === "runs") loadRuns();
  if (name === "train") loadTrainRuns();
  if (name === "compare") loadCompareList();
  if (name === "export") loadExports();
  if (name === "playground") refreshModels();
}
for (const b of $$("#tabs button")) b.addEventListener("click", () => { location.hash = b.dataset.tab; });
window.addEventListener("hashchange", route);
function route() {
  const [tab, ...rest] = (location.hash.slice(1) || "playground").split("/");
  showTab(tab);
  if (tab === "runs" && rest.length) openRun(decodeURIComponent(rest.join("/")));
  else stopRunPolling();
}

// ---------------------------------------------------------------- charts on <canvas>
const COLORS = ["#2f6fde", "#d35400", "#1e8449", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d"];
function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1000 || a < 0.01 ? v.toExponential(1) : v.toPrecision(3);
}
function drawChart(canvas, series, xLabel = "step") {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
  const L = 56, R = 10, T = 10, B = 34;
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
  const pts = series.flatMap((s) => s.points);
  canvas.dataset.points = String(pts.length);
  ctx.font = "11px system-ui, sans-serif";
  if (!pts.length) {
    ctx.fillStyle = "#5c6475"; ctx.fillText("no data yet", W / 2 - 30, H / 2); return;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const X = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  ctx.strokeStyle = "#d8dce5"; ctx.fillStyle = "#5c6475"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    ctx.beginPath(); ctx.moveTo(L, Y(y)); ctx.lineTo(W - R, Y(y)); ctx.stroke();
    ctx.fillText(fmt(y), 4, Y(y) + 4);
    ctx.fillText(fmt(Math.round(x * 100) / 100), X(x) - 8, H - B + 14);
  }
  ctx.fillText(xLabel, W / 2 - 12, H - 4);
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 2;
    ctx.beginPath();
    s.points.forEach((p, j) => (j ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    for (const p of s.points) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 2.5, 0, 7); ctx.fill(); }
    if (series.length > 1 || s.name) ctx.fillText(s.name || "", W - R - 150, T + 12 + 13 * i);
  });
}
function metricSeries(records, kind, key) {
  return records.filter((r) => r.kind === kind && typeof r[key] === "number").map((r) => [r.step, r[key]]);
}

// ---------------------------------------------------------------- playground: models, chat, side by side
async function refreshModels() {
  const data = await guarded(() => api("/v1/models"));
  if (!data) return;
  state.models = data.data.map((m) => m.id);
  const sel = $("#model-select"), keep = sel.value;  // read after the await: a later call may have chosen one
  sel.replaceChildren(...state.models.map((m) => el("option", { value: m, text: m === state.info?.base ? `${m} (base)` : m })));
  if (state.models.includes(keep)) sel.value = keep;
  const ticked = new Set($$("#sbs-models input:checked").map((i) => i.value));
  $("#sbs-models").replaceChildren(...state.models.map((m) =>
    el("label", {}, el("input", { type: "checkbox", name: "sbs", value: m, checked: ticked.has(m) }), m)));
  await refreshAdapters();
}

async function refreshAdapters() {
  const data = await guarded(() => api("/ui/api/adapters"));
  if (!data) return;
  $("#loaded-list").replaceChildren(...Object.entries(data.loaded).map(([name, path]) =>
    el("li", { dataset: { name } }, el("span", { class: "label", title: path, text: name }),
      el("button", { class: "unload-btn", text: "Unload", onclick: () => unloadAdapter(name) }))));
  if (!Object.keys(data.loaded).length) $("#loaded-list").append(el("li", { class: "note", text: "none" }));
  const loadedPaths = new Set(Object.values(data.loaded));
  $("#adapter-list").replaceChildren(...data.adapters.filter((a) => !loadedPaths.has(a.path)).map((a) => {
    const name = el("input", { value: a.suggested_name, title: "name to load it as" });
    return el("li", { dataset: { path: a.path } }, el("span", { class: "label", text: a.label }), name,
      el("button", { class: "load-btn", text: "Load", onclick: () => loadAdapter(name.value, a.path) }));
  }));
  const exp = $("#export-adapter"), keep = exp.value;
  exp.replaceChildren(...data.adapters.map((a) => el("option", { value: a.path, text: a.label })));
  if (keep) exp.value = keep;
}

async function loadAdapter(name, path, select = false) {
  const ok = await guarded(() => api("/v1/load_lora_adapter", { lora_name: name, lora_path: path }));
  if (ok === undefined) return false;
  await refreshModels();
  if (select) $("#model-select").value = name;
  return true;
}
async function unloadAdapter(name) {
  if ((await guarded(() => api("/v1/unload_lora_adapter", { lora_name: name }))) !== undefined) await refreshModels();
}

function sampling() {
  const num = (id) => { const v = $(id).value; return v === "" ? undefined : Number(v); };
  const s = { temperature: num("#temperature"), top_p: num("#top-p"), top_k: num("#top-k"), max_tokens: num("#max-tokens") };
  const seed = num("#seed");
  if (seed !== undefined) s.seed = seed;
  return s;
}

// POST /v1/chat/completions with stream=true; calls onText for every delta; resolves to the answering adapter.
async function streamChat(model, messages, onText) {
  const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
    body: JSON.stringify({ model, messages, stream: true, ...sampling() }) });
  if (!resp.ok) {
    let msg = `${resp.status} ${resp.statusText}`;
    try { msg = (await resp.json()).error.message; } catch (e) { /* keep the status */ }
    throw new APIError(msg);
  }
  const reader = resp.body.getReader(), dec = new TextDecoder();
  let buf = "", answered = { model, adapter: undefined };
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return answered;
        const chunk = JSON.parse(payload);
        if (chunk.error) throw new APIError(chunk.error.message);
        answered.model = chunk.model;
        for (const c of chunk.choices || []) {
          if (c.delta && c.delta.content) onText(c.delta.content);
          if ("adapter" in c) answered.adapter = c.adapter;
        }
      }
    }
  }
  return answered;
}

function addMessage(role, text, who) {
  const body = el("span", { class: "text", text });
  const m = el("div", { class: "msg " + role }, el("span", { class: "who", text: who || role }), body);
  $("#chat-log").append(m);
  $("#chat-log").scrollTop = 1e9;
  return { m, body };
}

async function sendChat() {
  const text = $("#chat-input").value.trim(), model = $("#model-select").value;
  if (!text) return;
  $("#chat-input").value = "";
  state.history.push({ role: "user", content: text });
  addMessage("user", text, "you");
  const { m, body } = addMessage("assistant", "", model);
  m.dataset.model = model; m.dataset.done = "0";
  $("#chat-send").disabled = true;
  try {
    if (model === "auto") showRoute(state.history);
    let chunks = 0;
    const answered = await streamChat(model, state.history, (t) => {
      body.textContent += t; m.dataset.chunks = String(++chunks); $("#chat-log").scrollTop = 1e9;
    });
    m.dataset.adapter = answered.adapter === null ? "base" : (answered.adapter || model);
    $(".who", m).textContent = model === "auto" ? `auto → ${m.dataset.adapter}` : answered.model;
    state.history.push({ role: "assistant", content: body.textContent });
  } catch (e) {
    m.classList.add("failed"); body.textContent = "error: " + e.message; showError(e.message);
    state.history.pop();
  } finally {
    m.dataset.done = "1";
    $("#chat-send").disabled = false;
  }
}

async function showRoute(messages) {
  const r = await guarded(() => api("/ui/api/route", { messages }));
  if (!r) return;
  const box = $("#route-info");
  box.hidden = false;
  const scores = Object.entries(r.scores).map(([n, s]) => `${n} ${s.toFixed(3)}`).join(", ");
  box.textContent = `router picked: ${r.adapter || "base (no adapter above the threshold)"}; scores: ${scores}; ` +
    `threshold ${r.threshold.toFixed(3)}`;
  box.dataset.adapter = r.adapter || "base";
}

async function sendSideBySide() {
  const models = $$("#sbs-models input:checked").map((i) => i.value), text = $("#sbs-input").value.trim();
  if (models.length < 2) { showError("tick two or more models for a side-by-side answer"); return; }
  if (!text) { showError("write a prompt first"); return; }
  const cols = models.map((m) => {
    const out = el("div", { class: "sbs-text" });
    const col = el("div", { class: "sbs-col", dataset: { model: m, done: "0" } }, el("h4", { text: m }), out);
    return { m, col, out };
  });
  $("#sbs-columns").replaceChildren(...cols.map((c) => c.col));
  $("#sbs-send").disabled = true;
  await Promise.all(cols.map(async (c) => {
    try {
      const a = await streamChat(c.m, [{ role: "user", content: text }], (t) => { c.out.textContent += t; });
      if (c.m === "auto") $("h4", c.col).textContent = `auto → ${a.adapter || "base"}`;
    } catch (e) { c.out.textContent = "error: " + e.message; c.col.classList.add("failed"); showError(e.message); }
    finally { c.col.dataset.done = "1"; }
  }));
  $("#sbs-send").disabled = false;
}

$("#chat-send").addEventListener("click", sendChat);
$("#chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendChat(); } });
$("#chat-reset").addEventListener("click", () => { state.history = []; $("#chat-log").replaceChildren(); $("#route-info").hidden = true; });
$("#sbs-send").addEventListener("click", sendSideBySide);
$("#model-select").addEventListener("change", () => { $("#route-info").hidden = true; });

// ---------------------------------------------------------------- train form
async function buildForm() {
  const data = await guarded(() => api("/ui/api/form"));
  if (!data) return;
  const form = $("#train-form");
  form.replaceChildren();
  const list = el("datalist", { id: "data-files" }, ...data.data_files.map((f) => el("option", { value: f })));
  form.append(list);
  for (const f of data.fields) {
    let input;
    if (f.kind === "select") input = el("select", { name: f.key }, ...f.options.map((o) => el("option", { value: o, text: o })));
    else if (f.kind === "textarea") input = el("textarea", { name: f.key, rows: 3 });
    else input = el("input", { name: f.key, type: "text", inputmode: f.kind === "number" ? "decimal" : undefined,
      list: f.key.startsWith("data.") && f.key !== "data.max_length" ? "data-files" : undefined });
    input.value = f.default || "";
    input.id = "f-" + f.key.replace(/\./g, "-");
    form.append(el("div", { class: "field", dataset: { key: f.key } }, el("label", { for: input.id, text: f.label }), input,
      f.help ? el("span", { class: "help", text: f.help }) : null, el("span", { class: "field-error" })));
  }
}

async function submitTrain(ev) {
  ev && ev.preventDefault();
  const values = {};
  for (const i of $$("#train-form [name]")) values[i.name] = i.value;
  for (const f of $$("#train-form .field")) { f.classList.remove("invalid"); $(".field-error", f).textContent = ""; }
  $("#train-status").textContent = "checking…";
  $("#train-submit").disabled = true;
  try {
    const r = await api("/ui/api/train", values);
    $("#train-status").textContent = `started run ${r.run}`;
    await loadTrainRuns();
    location.hash = "runs/" + encodeURIComponent(r.run);
  } catch (e) {
    const fields = e.body && e.body.fields;
    if (fields) {
      for (const [key, msg] of Object.entries(fields)) {
        const f = $(`#train-form .field[data-key="${CSS.escape(key)}"]`) || $('#train-form .field[data-key="overrides"]');
        f.classList.add("invalid"); $(".field-error", f).textContent = msg;
      }
      $("#train-status").textContent = "fix the fields marked in red";
    } else { $("#train-status").textContent = ""; showError(e.message); }
  } finally { $("#train-submit").disabled = false; }
}
$("#train-submit").addEventListener("click", submitTrain);
$("#train-form").addEventListener("submit", submitTrain);

async function loadTrainRuns() {
  const data = await guarded(() => api("/ui/api/runs"));
  if (!data) return;
  $("#train-runs").replaceChildren(...data.runs.filter((r) => r.from_ui).map((r) =>
    el("li", { dataset: { run: r.name } }, el("a", { class: "label", href: "#runs/" + encodeURIComponent(r.name), text: r.name }),
      el("span", { class: "badge " + r.state, text: r.state }), el("span", { class: "note", text: `step ${r.steps}` }))));
}

// ---------------------------------------------------------------- runs: list, detail with live curves, overlay
async function loadRuns() {
  const data = await guarded(() => api("/ui/api/runs"));
  if (!data) return;
  const ticked = new Set($$(".overlay-check:checked").map((i) => i.value));
  $("#runs-table tbody").replaceChildren(...data.runs.map((r) => el("tr", { dataset: { run: r.name }, class: state.run === r.name ? "selected" : "" },
    el("td", {}, el("input", { type: "checkbox", class: "overlay-check", value: r.name, checked: ticked.has(r.name) })),
    el("td", {}, el("a", { class: "open-run", href: "#runs/" + encodeURIComponent(r.name), text: r.name })),
    el("td", {}, el("span", { class: "badge " + r.state, text: r.state })),
    el("td", { text: String(r.steps) }), el("td", { text: r.loss == null ? "" : fmt(r.loss) }),
    el("td", { text: r.eval_loss == null ? "" : fmt(r.eval_loss) }),
    el("td", { text: new Date(r.modified * 1000).toLocaleString() }))));
}
$("#runs-refresh").addEventListener("click", loadRuns);

function stopRunPolling() { clearTimeout(state.runTimer); state.runTimer = null; state.run = null; $("#run-detail").hidden = true; }

async function openRun(name) {
  if (state.run !== name) { clearTimeout(state.runTimer); state.run = name; $("#run-detail").hidden = true; }
  let d;
  try { d = await api("/ui/api/run?name=" + encodeURIComponent(name)); }
  catch (e) { showError(e.message); return; }
  if (state.run !== name) return;
  renderRun(d);
  const live = d.job && ["starting", "running"].includes(d.job.state);
  clearTimeout(state.runTimer);
  state.runTimer = setTimeout(() => openRun(name), live ? 1000 : 4000);
}

function renderRun(d) {
  $("#run-detail").hidden = false;
  $("#run-title").textContent = d.name;
  const st = $("#run-state"); st.textContent = d.state; st.className = "badge " + d.state;
  const running = d.job && ["starting", "running"].includes(d.job.state);
  $("#run-stop").disabled = !running;
  $("#run-resume").disabled = running || !d.config_text;
  $("#run-continue").disabled = running || !d.checkpoints.length;
  let progress = `step ${d.steps}` + (d.max_steps ? ` of ${d.max_steps}` : "");
  if (d.job && d.job.error) progress += ` — ${d.job.error}`;
  $("#run-progress").textContent = progress;
  if (d.job && d.job.error && d.job.error !== state.lastJobError) { state.lastJobError = d.job.error; showError(`run ${d.name}: ${d.job.error}`); }
  const m = d.metrics;
  drawChart($("#chart-loss"), [{ name: "train", points: metricSeries(m, "train", "loss") }, { name: "eval", points: metricSeries(m, "eval", "eval_loss"), color: "#d35400" }]);
  drawChart($("#chart-lr"), [{ points: metricSeries(m, "train", "lr") }]);
  drawChart($("#chart-tps"), [{ points: metricSeries(m, "train", "tokens_per_s") }]);
  drawChart($("#chart-eval"), [{ points: metricSeries(m, "eval", "eval_loss") }]);
  $("#checkpoint-list").replaceChildren(...d.checkpoints.map((c) => el("li", { dataset: { checkpoint: c.name } },
    el("span", { class: "label", text: `${c.name} (step ${c.step}, ${(c.bytes / 2 ** 20).toFixed(2)} MiB)` }),
    el("button", { class: "ckpt-load", text: "Load in playground", onclick: () => loadCheckpoint(d.name, c) }))));
  if (!d.checkpoints.length) $("#checkpoint-list").append(el("li", { class: "note", text: "none yet" }));
  $("#run-adapters").replaceChildren(...d.adapters.map((a) => el("li", { dataset: { path: a.path } },
    el("span", { class: "label", text: a.name, title: a.path }),
    el("button", { class: "adapter-load", text: "Load in playground", onclick: () => loadRunAdapter(d.name, a) }))));
  if (!d.adapters.length) $("#run-adapters").append(el("li", { class: "note", text: "none yet (written when the run finishes)" }));
  const evals = m.filter((r) => r.kind === "eval");
  $("#run-eval").textContent = JSON.stringify({ last_eval: evals[evals.length - 1] || null, ...d.eval_metrics }, null, 1);
  $("#run-artefacts").replaceChildren(...d.artefacts.map((a) => el("li", {}, a.endsWith(".png") || a.endsWith(".json") || a.endsWith(".md") || a.endsWith(".yaml")
    ? el("a", { href: "/ui/api/file?path=" + encodeURIComponent(d.name + "/" + a), target: "_blank", text: a }) : el("span", { text: a }))));
  $("#run-config").textContent = d.config_text || "(no config.yaml)";
  const log = $("#run-log"), atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = d.log || "(no log: not started from this page)";
  if (atEnd) log.scrollTop = 1e9;
}

function adapterName(run, suffix) {
  return (run.replace(/[^A-Za-z0-9_-]+/g, "-") + (suffix ? "-" + suffix : "")).replace(/^[-_]+/, "").slice(0, 64) || "adapter";
}
async function loadRunAdapter(run, a) {
  const name = adapterName(run, a.name === "adapter" ? "" : a.name);
  if (state.models.includes(name) || await loadAdapter(name, a.path)) {
    location.hash = "playground";
    await refreshModels();
    $("#model-select").value = name;
  }
}
async function loadCheckpoint(run, c) {
  let path = c.adapter;
  if (!path) {
    const r = await guarded(() => api("/ui/api/run/checkpoint_adapter", { name: run, checkpoint: c.name }));
    if (!r) return;
    $("#run-progress").textContent = `saving ${c.name} as an adapter…`;
    for (;;) {
      await new Promise((res) => setTimeout(res, 700));
      const j = await guarded(() => api("/ui/api/job?dir=" + encodeURIComponent(r.job)));
      if (!j) return;
      if (j.state === "finished") { path = r.out; break; }
      if (["failed", "died", "stopped"].includes(j.state)) { showError(`saving ${c.name} as an adapter: ${j.error || j.state}`); return; }
    }
  }
  await loadRunAdapter(run, { name: c.name, path });
}

async function runAction(path, extra = {}) {
  const r = await guarded(() => api(path, { name: state.run, ...extra }));
  if (r) openRun(state.run);
}
$("#run-stop").addEventListener("click", () => runAction("/ui/api/run/stop"));
$("#run-resume").addEventListener("click", () => runAction("/ui/api/run/resume"));
$("#run-continue").addEventListener("click", () => runAction("/ui/api/run/resume", { more_steps: $("#continue-steps").value }));

$("#overlay-btn").addEventListener("click", async () => {
  const names = $$(".overlay-check:checked").map((i) => i.value), key = $("#overlay-metric").value;
  if (names.length < 2) { showError("tick two or more runs to overlay their curves"); return; }
  const series = [];
  for (const n of names) {
    const d = await guarded(() => api("/ui/api/run?name=" + encodeURIComponent(n)));
    if (!d) return;
    series.push({ name: n, points: metricSeries(d.metrics, key === "eval_loss" ? "eval" : "train", key) });
  }
  const c = $("#overlay-chart"); c.hidden = false; drawChart(c, series); c.dataset.runs = String(names.length);
});

// ---------------------------------------------------------------- compare reports
async function loadCompareList() {
  const data = await guarded(() => api("/ui/api/compare"));
  if (!data) return;
  const sel = $("#compare-select"), keep = sel.value;
  sel.replaceChildren(...data.reports.map((r) => el("option", { value: r, text: r })));
  if (keep) sel.value = keep;
  if (!data.reports.length) $("#compare-report").replaceChildren(el("p", { class: "note", text: "no compare report under the runs directory yet" }));
}
function renderMarkdown(md, root) {  // the subset report.md uses: headings, tables, lists, paragraphs, code
  const out = [], lines = md.split("\n");
  const inline = (t) => { const s = el("span"); t.split(/(`[^`]*`|\*\*[^*]*\*\*)/).forEach((p) => s.append(
    p.startsWith("`") ? el("code", { text: p.slice(1, -1) }) : p.startsWith("**") ? el("b", { text: p.slice(2, -2) }) : p)); return s; };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (/^#{1,6} /.test(line)) { const n = line.indexOf(" "); out.push(el("h" + Math.min(n + 1, 6), {}, inline(line.slice(n + 1)))); }
    else if (line.startsWith("|")) {
      const rows = [];
      while (i < lines.length && lines[i].startsWith("|")) rows.push(lines[i++]);
      i--;
      const cells = (r) => r.replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
      const body = rows.filter((r, j) => j !== 1 || !/^\|[\s:|-]+\|$/.test(r));
      out.push(el("table", {}, ...body.map((r, j) => el("tr", {}, ...cells(r).map((c) => el(j ? "td" : "th", {}, inline(c)))))));
    } else if (/^[-*] /.test(line)) out.push(el("li", {}, inline(line.slice(2))));
    else if (line.startsWith("```")) { const code = []; while (++i < lines.length && !lines[i].startsWith("```")) code.push(lines[i]); out.push(el("pre", { text: code.join("\n") })); }
    else if (line.trim()) out.push(el("p", {}, inline(line)));
  }
  root.replaceChildren(...out);
}
$("#compare-open").addEventListener("click", async () => {
  const dir = $("#compare-select").value;
  if (!dir) { showError("no report selected"); return; }
  const r = await guarded(() => api("/ui/api/compare/report?dir=" + encodeURIComponent(dir)));
  if (!r) return;
  const box = $("#compare-report");
  renderMarkdown(r.markdown, box);
  for (const img of r.images) box.append(el("figure", {}, el("img", { src: "/ui/api/file?path=" + encodeURIComponent(dir + "/" + img), alt: img }), el("figcaption", { text: img })));
});

// ---------------------------------------------------------------- export (background jobs with progress)
async function loadExports() {
  await refreshAdapters();
  const data = await guarded(() => api("/ui/api/exports"));
  if (!data) return;
  $("#export-list").replaceChildren(...data.exports.map((x) => el("li", { dataset: { export: x.name, state: x.state } },
    el("span", { class: "label", text: `${x.name} → ${x.out}` }),
    el("progress", { max: "1", value: String(x.progress || 0) }),
    el("span", { class: "badge " + x.state, text: x.state }),
    el("span", { class: "note", text: x.error || x.stage || "" }))));
  clearTimeout(state.exportTimer);
  if (data.exports.some((x) => ["starting", "running"].includes(x.state)) && !$("#tab-export").hidden) state.exportTimer = setTimeout(loadExports, 1000);
}
$("#export-submit").addEventListener("click", async () => {
  const r = await guarded(() => api("/ui/api/export", { adapter: $("#export-adapter").value, name: $("#export-name").value.trim(), kind: $("#export-kind").value, quant: $("#export-quant").value }));
  if (r) loadExports();
});

// ---------------------------------------------------------------- start
async function start() {
  $("#api-key").addEventListener("change", () => { sessionStorage.setItem("plugtune-key", $("#api-key").value); refreshModels(); });
  $("#api-key").value = sessionStorage.getItem("plugtune-key") || "";
  let info;
  try { info = await api("/ui/api/info"); } catch (e) {
    $("#api-key-box").hidden = false; showError(e.message); return;
  }
  state.info = info;
  $("#api-key-box").hidden = !info.api_key_required;
  $("#base-info").textContent = `base: ${info.base} · runs: ${info.runs_dir}`;
  if (info.gguf) $("#export-kind").append(el("option", { value: "gguf", text: "GGUF (llama.cpp)" }));
  else $("#gguf-note").textContent = "GGUF export appears here once plugtune.export is installed.";
  await buildForm();
  route();
}
start();
