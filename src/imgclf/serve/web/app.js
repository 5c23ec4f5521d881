// imgclf web page: choose or drop an image, see it, see the class probabilities.
// Plain JavaScript, no dependencies; talks only to this server (/v1/model, /v1/predict, /v1/explain,
// /v1/neighbors/{index}/thumbnail). Similar training cases are asked for only when the model has an index.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const els = {
    modelLine: $("model-line"), footerModel: $("footer-model"), keyPanel: $("key-panel"), keyForm: $("key-form"),
    keyInput: $("key-input"), dropzone: $("dropzone"), fileInput: $("file-input"), preview: $("preview"),
    dropHint: $("drop-hint"), fileName: $("file-name"), change: $("change-button"), limits: $("limits"),
    status: $("status"), prediction: $("prediction"), predicted: $("predicted"), decision: $("decision"),
    bars: $("bars"), explainFigure: $("explain-figure"), explainImg: $("explain-img"), explainCaption: $("explain-caption"),
    neighbors: $("neighbors"), neighborList: $("neighbor-list"),
  };
  const NEIGHBORS = 5;
  const KEY_STORE = "imgclf-api-key";
  let model = null;
  let previewUrl = null;
  let explainUrl = null;
  let thumbnailUrls = [];
  let requestId = 0;

  function headers() {
    const key = sessionStorage.getItem(KEY_STORE);
    return key ? { "X-API-Key": key } : {};
  }

  function setStatus(text, kind) {
    els.status.textContent = text;
    els.status.className = "status" + (kind ? " " + kind : "");
    els.status.hidden = !text;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    return "HTTP " + response.status;
  }

  async function loadModel() {
    let response;
    try {
      response = await fetch("/v1/model", { headers: headers() });
    } catch (e) {
      els.modelLine.textContent = "Cannot reach the server.";
      return;
    }
    if (response.status === 401) {
      els.keyPanel.hidden = false;
      els.modelLine.textContent = "API key needed.";
      els.keyInput.focus();
      return;
    }
    if (!response.ok) {
      els.modelLine.textContent = "Model info unavailable: " + (await errorText(response));
      return;
    }
    model = await response.json();
    els.keyPanel.hidden = true;
    els.modelLine.textContent = model.class_names.length + " classes: " + model.class_names.join(", ");
    els.footerModel.textContent = "model " + model.model_id + " · " + model.engine + " · " + model.backbone;
    const l = model.limits;
    els.limits.textContent = l.types + " · up to " + l.max_upload_mb + " MB and " +
      (l.max_pixels / 1e6).toLocaleString() + " megapixels";
  }

  function formatPercent(p) {
    const v = 100 * p;
    if (v >= 99.95 && v < 100) return ">99.9 %";
    if (v > 0 && v < 0.05) return "<0.1 %";
    return v.toFixed(1) + " %";
  }

  function showPrediction(result) {
    const pred = result.predictions[0];
    els.predicted.textContent = pred.predicted;
    els.predicted.dataset.probability = String(pred.probability);
    els.decision.textContent = result.threshold === null
      ? "Highest probability (argmax) · " + pred.width + "×" + pred.height + " " + pred.format
      : "Decision: P(" + result.positive_class + ") ≥ " + Number(result.threshold).toPrecision(3) + " · " + pred.width + "×" + pred.height + " " + pred.format;
    els.bars.replaceChildren();
    const entries = Object.entries(pred.probabilities).sort((a, b) => b[1] - a[1]);
    for (const [name, p] of entries) {
      const li = document.createElement("li");
      li.className = "bar-row" + (name === pred.predicted ? " winner" : "");
      li.dataset.class = name;
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = name;
      label.title = name;
      const track = document.createElement("span");
      track.className = "bar-track";
      track.setAttribute("role", "meter");
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "1");
      track.setAttribute("aria-valuenow", String(p));
      track.setAttribute("aria-label", name);
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = Math.max(0, Math.min(100, 100 * p)).toFixed(2) + "%";
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = formatPercent(p);
      li.append(label, track, value);
      els.bars.appendChild(li);
    }
    els.prediction.hidden = false;
  }

  function clearNeighbors() {
    for (const url of thumbnailUrls) URL.revokeObjectURL(url);
    thumbnailUrls = [];
    els.neighborList.replaceChildren();
    els.neighbors.hidden = true;
  }

  // thumbnails are fetched (not linked) so that the API key header goes with them
  async function loadThumbnail(img, url, id) {
    try {
      const response = await fetch(url, { headers: headers() });
      if (!response.ok || id !== requestId) return;
      const blobUrl = URL.createObjectURL(await response.blob());
      thumbnailUrls.push(blobUrl);
      img.src = blobUrl;
    } catch (e) { /* the label and similarity stay */ }
  }

  function showNeighbors(cases, id) {
    clearNeighbors();
    if (!cases || !cases.length) return;
    for (const c of cases) {
      const li = document.createElement("li");
      li.className = "neighbor";
      li.dataset.label = c.label;
      li.dataset.similarity = String(c.similarity);
      const img = document.createElement("img");
      img.alt = "Training image of " + c.label;
      if (c.path) img.title = c.path;
      const label = document.createElement("span");
      label.className = "neighbor-label";
      label.textContent = c.label;
      label.title = c.label;
      const sim = document.createElement("span");
      sim.className = "neighbor-similarity";
      sim.textContent = "similarity " + Number(c.similarity).toFixed(2);
      li.append(img, label, sim);
      els.neighborList.appendChild(li);
      if (c.thumbnail_url) loadThumbnail(img, c.thumbnail_url, id);
    }
    els.neighbors.hidden = false;
  }

  async function explain(file, id) {
    if (!model || !model.explain) return;
    const form = new FormData();
    form.append("file", file, file.name || "image");
    els.explainFigure.hidden = false;
    els.explainCaption.textContent = "Computing Grad-CAM…";
    els.explainImg.hidden = true;
    try {
      const response = await fetch("/v1/explain", { method: "POST", body: form, headers: headers() });
      if (id !== requestId) return;
      if (!response.ok) {
        els.explainCaption.textContent = "Grad-CAM unavailable: " + (await errorText(response));
        return;
      }
      const blob = await response.blob();
      if (explainUrl) URL.revokeObjectURL(explainUrl);
      explainUrl = URL.createObjectURL(blob);
      els.explainImg.src = explainUrl;
      els.explainImg.hidden = false;
      const cls = response.headers.get("X-Class");
      const p = Number(response.headers.get("X-Probability"));
      els.explainCaption.textContent = "Grad-CAM for “" + cls + "” (" + formatPercent(p) + "): warm colours are where the model looked.";
    } catch (e) {
      if (id === requestId) els.explainCaption.textContent = "Grad-CAM failed: " + e.message;
    }
  }

  async function classify(file) {
    if (!file) return;
    const id = ++requestId;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    els.preview.src = previewUrl;
    els.preview.hidden = false;
    els.dropHint.hidden = true;
    els.dropzone.classList.add("has-image");
    els.fileName.textContent = file.name || "pasted image";
    els.change.hidden = false;
    els.prediction.hidden = true;
    els.explainFigure.hidden = true;
    clearNeighbors();
    if (model && file.size > model.limits.max_upload_mb * 1048576) {
      setStatus("This file is " + (file.size / 1048576).toFixed(1) + " MB; the limit is " + model.limits.max_upload_mb + " MB.", "error");
      return;
    }
    setStatus("Classifying…", "busy");
    const form = new FormData();
    form.append("file", file, file.name || "image");
    let response;
    try {
      const wantNeighbors = model && model.neighbors && model.neighbors.available;
      const url = wantNeighbors ? "/v1/predict?neighbors=" + Math.min(NEIGHBORS, model.neighbors.max_neighbors) : "/v1/predict";
      response = await fetch(url, { method: "POST", body: form, headers: headers() });
    } catch (e) {
      if (id === requestId) setStatus("Cannot reach the server: " + e.message, "error");
      return;
    }
    if (id !== requestId) return;
    if (response.status === 401) {
      els.keyPanel.hidden = false;
      setStatus(await errorText(response), "error");
      return;
    }
    if (!response.ok) {
      setStatus(await errorText(response), "error");
      return;
    }
    const result = await response.json();
    setStatus("", "");
    showPrediction(result);
    showNeighbors(result.predictions[0].neighbors, id);
    explain(file, id);
  }

  // a file the browser cannot show (not an image, or e.g. TIFF): no broken-image icon
  els.preview.addEventListener("error", () => {
    els.preview.hidden = true;
    els.dropHint.hidden = false;
    els.dropzone.classList.remove("has-image");
  });

  // choosing, dropping, pasting
  els.fileInput.addEventListener("change", () => {
    classify(els.fileInput.files[0]);
    els.fileInput.value = "";
  });
  els.dropzone.addEventListener("click", (ev) => {
    if (ev.target.tagName !== "LABEL") els.fileInput.click();
  });
  els.dropzone.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); els.fileInput.click(); }
  });
  for (const type of ["dragenter", "dragover"]) {
    els.dropzone.addEventListener(type, (ev) => { ev.preventDefault(); els.dropzone.classList.add("dragging"); });
  }
  for (const type of ["dragleave", "dragend"]) {
    els.dropzone.addEventListener(type, () => els.dropzone.classList.remove("dragging"));
  }
  els.dropzone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    els.dropzone.classList.remove("dragging");
    const files = ev.dataTransfer && ev.dataTransfer.files;
    if (files && files.length) classify(files[0]);
  });
  // a file dropped beside the drop zone must not navigate away from the page
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
  document.addEventListener("paste", (ev) => {
    const items = ev.clipboardData ? Array.from(ev.clipboardData.files) : [];
    if (items.length) classify(items[0]);
  });
  els.keyForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY_STORE, els.keyInput.value);
    els.keyInput.value = "";
    loadModel();
  });

  loadModel();
})();
