// The page at /: one image through POST /predict (labels, mask, member votes, timings), and a live chart of
// each mode's latency from GET /stats. Plain DOM and <canvas>, no dependencies: it must work offline.
"use strict";

const COLOURS = { fused: "#1f77b4", sequential: "#d62728", parallel: "#2ca02c", "fused-int8": "#9467bd" };
const POLL_MS = 2000;
const HISTORY_MS = 5 * 60 * 1000;
const BURST = 20;

const $ = (id) => document.getElementById(id);
const samples = []; // {at: ms since epoch, modes: {mode: {requests, p50, p95}}}, oldest first
let servedModes = []; // from GET /readyz, in the service's order
let lastFile = null;
let busy = false;

// ---- API ------------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new ApiError(`cannot reach the service (${error.message})`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && body.error;
    const message = detail && typeof detail === "object" ? `${detail.code}: ${detail.message}` : detail;
    throw new ApiError(`${response.status} ${message || response.statusText}`, response.status);
  }
  return body;
}

function predict(file, mode) {
  const form = new FormData();
  form.append("file", file, file.name || "image.png");
  const query = new URLSearchParams({ mode, members: "true", mask: "true" });
  const key = $("api-key").value.trim(); // only asked for once the service answers 401 (API_KEY is set)
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  return api(`predict?${query}`, { method: "POST", body: form, headers });
}

// ---- helpers --------------------------------------------------------------------------------------------------

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

const formatMs = (ms) => (ms == null ? "–" : ms < 10 ? ms.toFixed(2) : ms < 100 ? ms.toFixed(1) : ms.toFixed(0));

function showError(error) {
  const box = $("error");
  box.textContent = error ? error.message : "";
  box.hidden = !error;
  if (error && error.status === 401) {
    $("key-field").hidden = false;
    $("api-key").focus();
  }
}

// ---- one prediction -------------------------------------------------------------------------------------------

function renderLabels(prediction) {
  $("threshold").textContent = `(present when ≥ ${prediction.threshold})`;
  const rows = prediction.labels.map((label) => {
    const fill = element("div", { className: "fill" });
    fill.style.width = `${(label.probability * 100).toFixed(1)}%`;
    return element(
      "tr",
      { "data-label": label.name, className: label.present ? "present" : "absent" },
      element("th", { scope: "row" }, label.name),
      element("td", { className: "bar-cell" }, element("div", { className: "bar" }, fill)),
      element("td", { className: "number" }, label.probability.toFixed(3)),
      element("td", {}, label.present ? "present" : "absent"),
    );
  });
  $("labels").tBodies[0].replaceChildren(...rows);
}

function renderMembers(prediction) {
  const table = $("members");
  const names = prediction.labels.map((label) => label.name);
  const cells = (probabilities) =>
    names.map((name) => {
      const p = probabilities[name];
      return element("td", { className: p >= prediction.threshold ? "number vote" : "number" }, p.toFixed(3));
    });
  table.tHead.replaceChildren(
    element("tr", {}, element("th", { scope: "col" }, "member"), ...names.map((n) => element("th", { scope: "col" }, n))),
  );
  const rows = (prediction.members || []).map((member) =>
    element("tr", { "data-member": member.name }, element("th", { scope: "row" }, member.name), ...cells(member.probabilities)),
  );
  table.tBodies[0].replaceChildren(...rows);
  const mean = Object.fromEntries(prediction.labels.map((label) => [label.name, label.probability]));
  table.tFoot.replaceChildren(element("tr", {}, element("th", { scope: "row" }, "ensemble (mean)"), ...cells(mean)));
}

function renderTimings(prediction) {
  const entries = [
    ["mode", prediction.mode],
    ...Object.entries(prediction.timings_ms).map(([name, ms]) => [name, `${formatMs(ms)} ms`]),
    ["request id", prediction.request_id],
  ];
  $("timings").replaceChildren(...entries.flatMap(([name, value]) => [element("dt", {}, name), element("dd", {}, value)]));
}

function paletteOf(png) {
  // The PLTE chunk of a palette PNG: [[r, g, b], ...], index i being mask class i.
  const view = new DataView(png.buffer);
  for (let at = 8; at + 8 <= png.length; ) {
    const length = view.getUint32(at);
    const kind = String.fromCharCode(...png.subarray(at + 4, at + 8));
    if (kind === "PLTE") {
      const bytes = png.subarray(at + 8, at + 8 + length);
      return Array.from({ length: length / 3 }, (_, i) => [bytes[3 * i], bytes[3 * i + 1], bytes[3 * i + 2]]);
    }
    at += length + 12;
  }
  return [[0, 0, 0]];
}

async function renderMask(mask) {
  const png = Uint8Array.from(atob(mask.png_base64), (c) => c.charCodeAt(0));
  const palette = paletteOf(png);
  const picture = new Image();
  picture.src = `data:image/png;base64,${mask.png_base64}`;
  await picture.decode();
  const canvas = $("mask");
  canvas.width = mask.width;
  canvas.height = mask.height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.clearRect(0, 0, mask.width, mask.height);
  context.drawImage(picture, 0, 0);
  const pixels = context.getImageData(0, 0, mask.width, mask.height);
  const classOf = new Map();
  palette.forEach((rgb, index) => classOf.has(rgb.join()) || classOf.set(rgb.join(), index));
  const counts = new Array(mask.classes.length).fill(0);
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    const index = classOf.get(`${data[i]},${data[i + 1]},${data[i + 2]}`) ?? 0;
    counts[index] = (counts[index] || 0) + 1;
    if (index === 0) data[i + 3] = 0; // the background stays see-through
  }
  context.putImageData(pixels, 0, 0);
  const total = mask.width * mask.height;
  const items = mask.classes.slice(1).map((name, i) => {
    const swatch = element("span", { className: "swatch" });
    swatch.style.background = `rgb(${(palette[i + 1] || [0, 0, 0]).join(",")})`;
    return element("span", { className: "mask-class" }, swatch, `${name} ${((100 * counts[i + 1]) / total).toFixed(0)}%`);
  });
  $("mask-legend").replaceChildren(...items);
}

function showImage(file) {
  const image = $("image");
  if (image.dataset.file === file.name + file.size + file.lastModified) return;
  if (image.src) URL.revokeObjectURL(image.src);
  image.src = URL.createObjectURL(file);
  image.dataset.file = file.name + file.size + file.lastModified;
}

async function render(prediction, file) {
  showImage(file);
  renderLabels(prediction);
  renderMembers(prediction);
  renderTimings(prediction);
  if (prediction.mask) await renderMask(prediction.mask);
  else {
    $("mask").getContext("2d").clearRect(0, 0, $("mask").width, $("mask").height);
    $("mask-legend").replaceChildren();
  }
  $("result").hidden = false;
}

async function run(file, mode) {
  if (busy) return;
  busy = true;
  showError(null);
  try {
    await render(await predict(file, mode), file);
  } catch (error) {
    showError(error);
  } finally {
    busy = false;
  }
}

// ---- a burst of requests --------------------------------------------------------------------------------------

function samplePicture() {
  // Without an upload: a white picture with a random disc and square, like the synthetic training images.
  const canvas = element("canvas", { width: 96, height: 96 });
  const context = canvas.getContext("2d");
  const r = () => 16 + Math.random() * 64;
  context.fillStyle = "#fff";
  context.fillRect(0, 0, 96, 96);
  context.fillStyle = "#c33";
  context.beginPath();
  context.arc(r(), r(), 14, 0, 2 * Math.PI);
  context.fill();
  context.fillStyle = "#36c";
  context.fillRect(r() - 12, r() - 12, 24, 24);
  return new Promise((resolve) => canvas.toBlob((blob) => resolve(new File([blob], "sample.png", { type: "image/png" }))));
}

async function burst() {
  if (busy) return;
  busy = true;
  $("burst").disabled = true;
  showError(null);
  const file = lastFile || (await samplePicture());
  let last = null;
  try {
    for (let i = 1; i <= BURST; i++) {
      $("progress").textContent = `${i}/${BURST}`;
      last = await predict(file, "compare");
    }
    $("progress").textContent = `${BURST} requests sent`;
  } catch (error) {
    showError(error);
    $("progress").textContent = "";
  } finally {
    busy = false;
    $("burst").disabled = false;
  }
  if (last) await render(last, file);
  pollSoon();
}

// ---- the latency chart ----------------------------------------------------------------------------------------

function renderLegend(latest) {
  $("legend").replaceChildren(
    ...servedModes.map((mode) => {
      const stats = latest ? latest.modes[mode] : null;
      const swatch = element("span", { className: "swatch" });
      swatch.style.background = COLOURS[mode];
      const requests = stats ? stats.requests : 0;
      return element(
        "li",
        { "data-mode": mode, "data-colour": COLOURS[mode], "data-requests": String(requests) },
        swatch,
        element("strong", {}, mode),
        ` ${requests} request${requests === 1 ? "" : "s"} · p50 ${formatMs(stats && stats.p50)} ms · p95 ${formatMs(stats && stats.p95)} ms` +
          ` · queue p50 ${formatMs(stats && stats.queue)} ms · batch ${stats && stats.batch != null ? stats.batch.toFixed(1) : "–"}` +
          ` · CPU ${formatMs(stats && stats.cpu)} ms` +
          (stats && stats.cost != null ? ` · ${stats.cost.toFixed(3)} per million` : ""),
      );
    }),
  );
}

function niceStep(range, ticks) {
  const rough = range / ticks;
  const power = 10 ** Math.floor(Math.log10(rough));
  return [1, 2, 5, 10].map((m) => m * power).find((step) => step >= rough);
}

function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, width, height);

  // The time axis grows with the history, from one minute up to HISTORY_MS.
  const left = 64, right = 12, top = 12, bottom = 28;
  const now = Date.now();
  const span = Math.min(HISTORY_MS, Math.max(60000, samples.length ? now - samples[0].at : 0));
  const x = (at) => left + ((at - (now - span)) / span) * (width - left - right);
  const values = samples.flatMap((point) => servedModes.flatMap((mode) => [point.modes[mode]?.p50, point.modes[mode]?.p95]));
  const highest = Math.max(1, ...values.filter((v) => v != null));
  const step = niceStep(highest, 5);
  const topMs = Math.ceil((highest * 1.05) / step) * step;
  const y = (ms) => top + (1 - ms / topMs) * (height - top - bottom);

  context.font = "12px system-ui, sans-serif";
  context.lineWidth = 1;
  context.strokeStyle = "#e3e3e3";
  context.fillStyle = "#666";
  context.textAlign = "right";
  context.textBaseline = "middle";
  const decimals = Math.max(0, -Math.floor(Math.log10(step)));
  for (let i = 0; i * step <= topMs; i++) {
    const ms = i * step;
    context.beginPath();
    context.moveTo(left, y(ms));
    context.lineTo(width - right, y(ms));
    context.stroke();
    context.fillText(`${ms.toFixed(decimals)} ms`, left - 6, y(ms));
  }
  context.textAlign = "center";
  context.textBaseline = "top";
  const tick = [10, 30, 60].find((seconds) => span / (seconds * 1000) <= 6);
  for (let ago = Math.floor(span / 1000 / tick) * tick; ago >= 0; ago -= tick) {
    const label = ago === 0 ? "now" : ago < 60 ? `−${ago} s` : `−${ago / 60} min`;
    context.fillText(label, x(now - ago * 1000), height - bottom + 8);
  }

  const drawn = [];
  for (const mode of servedModes) {
    let any = false;
    for (const [key, dash] of [["p50", []], ["p95", [6, 4]]]) {
      context.strokeStyle = context.fillStyle = COLOURS[mode];
      context.lineWidth = 2;
      context.setLineDash(dash);
      context.beginPath();
      let pen = false;
      for (const point of samples) {
        const ms = point.modes[mode]?.[key];
        if (ms == null) {
          pen = false; // no requests in the window: a gap
          continue;
        }
        if (pen) context.lineTo(x(point.at), y(ms));
        else context.moveTo(x(point.at), y(ms));
        pen = true;
        any = true;
      }
      context.stroke();
      context.setLineDash([]);
      if (key === "p50") {
        for (const point of samples) {
          const ms = point.modes[mode]?.p50;
          if (ms == null) continue;
          context.beginPath();
          context.arc(x(point.at), y(ms), 2.5, 0, 2 * Math.PI);
          context.fill();
        }
      }
    }
    if (any) drawn.push(mode);
  }
  canvas.dataset.drawn = drawn.join(" ");
  canvas.dataset.points = String(samples.length);
}

function record(stats) {
  const now = Date.now();
  const modes = {};
  for (const [mode, entry] of Object.entries(stats.modes)) {
    modes[mode] = {
      requests: entry.requests,
      p50: entry.request_ms.p50,
      p95: entry.request_ms.p95,
      queue: entry.queue_ms.p50,
      batch: entry.mean_batch_rows,
      cpu: entry.cpu_ms_per_prediction,
      cost: entry.cost_per_million_predictions,
    };
  }
  samples.push({ at: now, modes });
  while (samples.length && samples[0].at < now - HISTORY_MS) samples.shift();
  $("window").textContent = String(stats.window_s);
  return samples[samples.length - 1];
}

let pollTimer = null;

async function poll() {
  clearTimeout(pollTimer);
  const box = $("stats-error");
  try {
    renderLegend(record(await api("stats")));
    box.hidden = true;
  } catch (error) {
    box.textContent = `stats unavailable: ${error.message}`;
    box.hidden = false;
  }
  drawChart();
  pollTimer = setTimeout(poll, POLL_MS);
}

function pollSoon() {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(poll, 100);
}

// ---- auto's choice --------------------------------------------------------------------------------------------

function renderAuto(auto) {
  $("auto").hidden = !auto;
  if (!auto) return;
  const batching = auto.batching_rows > 1 ? `batches of up to ${auto.batching_rows} rows` : "no batching";
  $("auto-reason").textContent = `${auto.mode} in layout ${auto.layout}, ${batching}: ${auto.reason} (measured in ${auto.measured_s} s).`;
  const rows = auto.candidates.map((c, i) =>
    element(
      "tr",
      { "data-mode": c.mode, "data-layout": c.layout, "data-batching": String(c.batching_rows), className: i === 0 ? "present" : "" },
      element("td", { className: "number" }, String(i + 1)),
      element("th", { scope: "row" }, c.mode),
      element("td", {}, c.layout),
      element("td", { className: "number" }, c.batching_rows > 1 ? `${c.batching_rows} (${c.mean_batch_rows.toFixed(1)})` : "off"),
      element(
        "td",
        { className: "number" },
        `${c.throughput_per_s.toFixed(1)} [${c.throughput_ci95.map((x) => (x == null ? "–" : x.toFixed(1))).join(" to ")}]`,
      ),
      element("td", { className: "number" }, formatMs(c.p50_ms)),
      element("td", { className: "number" }, formatMs(c.p99_ms)),
      element("td", {}, c.within_budget ? "yes" : "no"),
    ),
  );
  $("auto-ranking").tBodies[0].replaceChildren(...rows);
}

// ---- start ----------------------------------------------------------------------------------------------------

async function showModel() {
  try {
    const ready = await api("readyz");
    $("model").textContent = `model ${ready.model} · sha256 ${ready.sha256.slice(0, 12)}`;
    servedModes = ready.modes;
    $("upload").hidden = !ready.images;
    $("tensors-only").hidden = ready.images;
    $("v2-path").textContent = `POST /v2/models/${ready.model}/infer`;
    renderAuto(ready.auto);
    const choice = $("mode").value;
    $("mode").replaceChildren(
      ...servedModes.map((mode) => element("option", { value: mode }, mode)),
      element("option", { value: "compare" }, "compare (rotate)"),
      ...(ready.auto ? [element("option", { value: "auto" }, `auto (${ready.auto.mode})`)] : []),
    );
    $("mode").value = choice;
    renderLegend(samples[samples.length - 1] || null);
  } catch (error) {
    $("model").textContent = `not ready (${error.message}); retrying…`;
    setTimeout(showModel, POLL_MS);
  }
}

function start() {
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (!file) return;
    lastFile = file;
    $("again").disabled = false;
    run(file, $("mode").value);
  });
  $("upload").addEventListener("submit", (event) => {
    event.preventDefault();
    if (lastFile) run(lastFile, $("mode").value);
  });
  $("burst").addEventListener("click", burst);
  $("show-mask").addEventListener("change", () => ($("mask").hidden = !$("show-mask").checked));
  window.addEventListener("resize", drawChart);
  renderLegend(null);
  showModel();
  poll();
}

start();
