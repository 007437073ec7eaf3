// The page's behaviour: three panels on the service's own HTTP API, same origin.
// No framework and no build step; every request goes to the routes in the README.
"use strict";

// The page lives at <service>/ui/, so the API is one level up (works behind a path prefix too).
const API = new URL("../", window.location.href);

class ApiError extends Error {}

// With API keys on, the key this tab was given: kept in sessionStorage, so it lives as
// long as the tab and is never written to disk or sent to another origin.
const KEY_ITEM = "serving-api-key";
let askingForKey = null; // one prompt at a time, however many requests were refused

function withKey(init) {
  const key = sessionStorage.getItem(KEY_ITEM);
  if (!key) return init;
  return { ...init, headers: { ...(init && init.headers), Authorization: `Bearer ${key}` } };
}

// The server wants a key (401): ask once, for every request waiting on the answer.
function askForKey() {
  askingForKey ||= Promise.resolve().then(() => {
    const key = window.prompt("This service needs an API key. It is kept for this tab only.");
    askingForKey = null;
    if (key && key.trim()) sessionStorage.setItem(KEY_ITEM, key.trim());
    else sessionStorage.removeItem(KEY_ITEM);
    return Boolean(key && key.trim());
  });
  return askingForKey;
}

// One API call → the decoded body, or an ApiError carrying the service's own message.
async function api(path, init, askedForKey = false) {
  let response;
  const sentKey = sessionStorage.getItem(KEY_ITEM);
  try {
    response = await fetch(new URL(path, API), withKey(init));
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError("The service did not answer; is it running?");
  }
  if (response.ok) return response;
  if (response.status === 401 && !askedForKey) {
    // Sent before another request's prompt stored a key: retry with that one.
    const stored = sessionStorage.getItem(KEY_ITEM);
    if ((stored && stored !== sentKey) || (await askForKey())) return api(path, init, true);
  }
  if (response.status === 401) sessionStorage.removeItem(KEY_ITEM); // ask again next time
  let message = `The service answered ${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    const details = (body.detail || []).map((d) => d.msg).filter(Boolean);
    message = details.length ? details.join("; ") : body.error || message;
  } catch {
    // not JSON: keep the status line
  }
  throw new ApiError(`${message} (HTTP ${response.status})`);
}

const byId = (id) => document.getElementById(id);

const postJson = (path, body, signal) =>
  api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });

// One request in flight per panel: each call aborts the previous one and gives a new signal.
function latestOnly() {
  let current = null;
  const next = () => {
    if (current) current.abort();
    current = new AbortController();
    return current.signal;
  };
  next.cancel = () => current && current.abort();
  return next;
}

function showError(element, error) {
  if (error && error.name === "AbortError") return;
  element.textContent = error instanceof ApiError ? error.message : `Something went wrong: ${error}`;
  element.hidden = false;
}

function clearError(element) {
  element.hidden = true;
  element.textContent = "";
}

function debounce(fn, ms) {
  let timer;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

const percent = (p) => `${(100 * p).toFixed(1)} %`;

// --- Classify -------------------------------------------------------------------------

function setUpClassify() {
  const pad = byId("pad");
  const ctx = pad.getContext("2d");
  const zone = byId("drop-zone");
  const upload = byId("upload");
  const digitOut = byId("digit");
  const confidenceOut = byId("confidence");
  const seen = byId("model-input");
  const errorBox = byId("classify-error");
  const bars = byId("probabilities");
  const brush = pad.width / 14; // a finger-sized stroke, about a seventh of a digit's height

  const rows = [];
  for (let digit = 0; digit < 10; digit++) {
    const item = document.createElement("li");
    item.innerHTML = `<span>${digit}</span><div class="track"><div class="fill"></div></div>` +
      `<span class="value">–</span>`;
    bars.append(item);
    rows.push(item);
  }

  let inked = false;
  let showingUpload = false; // the pad shows an uploaded image, not a drawing
  let seenUrl = null;
  const nextRequest = latestOnly();

  function blank() {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, pad.width, pad.height);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = brush;
    ctx.strokeStyle = "#000";
    ctx.fillStyle = "#000";
    inked = false;
    showingUpload = false;
  }

  function resetResult() {
    digitOut.textContent = "–";
    digitOut.classList.add("idle");
    confidenceOut.textContent = "";
    seen.hidden = true;
    rows.forEach((row) => {
      row.classList.remove("top");
      row.querySelector(".fill").style.width = "0";
      row.querySelector(".value").textContent = "–";
      row.removeAttribute("aria-label");
    });
  }

  function show(result) {
    digitOut.textContent = String(result.digit);
    digitOut.classList.remove("idle");
    confidenceOut.textContent = `confidence ${percent(result.confidence)}`;
    result.probabilities.forEach((p, digit) => {
      const row = rows[digit];
      row.classList.toggle("top", digit === result.digit);
      row.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
      row.querySelector(".value").textContent = percent(p);
      row.setAttribute("aria-label", `${digit}: ${percent(p)}`);
    });
  }

  // Sends one image (a Blob or File) to /classify and /classify_input together.
  async function classify(image) {
    const signal = nextRequest();
    const form = () => {
      const data = new FormData();
      data.append("image", image, image.name || "drawing.png");
      return data;
    };
    clearError(errorBox);
    try {
      const [answer, input] = await Promise.all([
        api("classify", { method: "POST", body: form(), signal }),
        api("classify_input", { method: "POST", body: form(), signal }),
      ]);
      const result = await answer.json();
      const png = await input.blob();
      if (signal.aborted) return;
      show(result);
      if (seenUrl) URL.revokeObjectURL(seenUrl);
      seenUrl = URL.createObjectURL(png);
      seen.src = seenUrl;
      seen.hidden = false;
    } catch (error) {
      if (signal.aborted) return;
      resetResult();
      if (showingUpload) blank(); // the rejected image is not what the next stroke draws on
      showError(errorBox, error);
    }
  }

  const classifyDrawing = debounce(() => {
    if (!inked) return;
    pad.toBlob((blob) => classify(blob), "image/png");
  }, 250);

  // Pointer drawing: mouse, touch and pen alike.
  let last = null;
  const point = (event) => {
    const box = pad.getBoundingClientRect();
    return [
      ((event.clientX - box.left) * pad.width) / box.width,
      ((event.clientY - box.top) * pad.height) / box.height,
    ];
  };
  function dot([x, y]) {
    if (showingUpload) blank(); // a new drawing, not a scribble on the uploaded image
    ctx.beginPath();
    ctx.arc(x, y, brush / 2, 0, 2 * Math.PI);
    ctx.fill();
    inked = true;
  }
  function lineTo(to) {
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...to);
    ctx.stroke();
    last = to;
    inked = true;
  }
  pad.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    last = point(event);
    dot(last);
  });
  pad.addEventListener("pointermove", (event) => {
    if (!last) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    (events.length ? events : [event]).forEach((e) => lineTo(point(e)));
  });
  const endStroke = () => {
    if (!last) return;
    last = null;
    classifyDrawing();
  };
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  // Keyboard drawing: arrows move the pen, Space lowers or lifts it.
  const pen = { x: pad.width / 2, y: pad.height / 2, down: false };
  pad.addEventListener("keydown", (event) => {
    const step = event.shiftKey ? pad.width / 28 : pad.width / 14;
    const moves = { ArrowUp: [0, -step], ArrowDown: [0, step], ArrowLeft: [-step, 0], ArrowRight: [step, 0] };
    if (event.key in moves) {
      const [dx, dy] = moves[event.key];
      const to = [
        Math.min(Math.max(pen.x + dx, 0), pad.width),
        Math.min(Math.max(pen.y + dy, 0), pad.height),
      ];
      if (pen.down) {
        last = [pen.x, pen.y];
        lineTo(to);
        last = null;
      }
      [pen.x, pen.y] = to;
    } else if (event.key === " ") {
      pen.down = !pen.down;
      if (pen.down) dot([pen.x, pen.y]);
      pad.setAttribute("aria-label", `Drawing pad, pen ${pen.down ? "down" : "up"}`);
    } else if (event.key === "Enter") {
      pen.down = false;
      classifyDrawing();
    } else if (event.key === "Escape") {
      clear();
    } else {
      return;
    }
    event.preventDefault();
  });

  function clear() {
    nextRequest.cancel();
    blank();
    resetResult();
    clearError(errorBox);
    pen.down = false;
  }
  byId("clear").addEventListener("click", clear);

  // Uploads and drops: show the image on the pad, send the file itself.
  async function useFile(file) {
    if (!file) return;
    blank();
    try {
      const bitmap = await createImageBitmap(file);
      const scale = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
      const [w, h] = [bitmap.width * scale, bitmap.height * scale];
      ctx.imageSmoothingEnabled = scale < 1;
      ctx.drawImage(bitmap, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
      bitmap.close();
      showingUpload = true;
    } catch {
      // Not an image this browser can show: the service says what is wrong with it.
    }
    classify(file);
  }
  upload.addEventListener("change", () => {
    useFile(upload.files[0]);
    upload.value = "";
  });
  const uploadLabel = document.querySelector('label[for="upload"]');
  upload.addEventListener("focus", () => uploadLabel.classList.add("focused"));
  upload.addEventListener("blur", () => uploadLabel.classList.remove("focused"));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    useFile(event.dataTransfer.files[0]);
  });

  blank();
}

// --- Sentiment ------------------------------------------------------------------------

function setUpSentiment() {
  const review = byId("review");
  const labelOut = byId("sentiment-label");
  const scoreOut = byId("sentiment-score");
  const bar = byId("sentiment-bar");
  const errorBox = byId("sentiment-error");
  const nextRequest = latestOnly();

  function show(label, score) {
    labelOut.textContent = label;
    labelOut.className = score === null ? "big idle" : `big ${label}`;
    bar.className = `meter-fill ${label}`;
    bar.style.width = score === null ? "0" : `${(100 * score).toFixed(1)}%`;
    scoreOut.textContent = score === null ? "–" : score.toFixed(3);
  }

  async function score() {
    const signal = nextRequest();
    try {
      const answer = await postJson("sentiment", { text: review.value }, signal);
      const result = await answer.json();
      if (signal.aborted) return;
      clearError(errorBox);
      show(result.label, result.score);
    } catch (error) {
      if (signal.aborted) return;
      show("–", null);
      showError(errorBox, error);
    }
  }

  review.addEventListener("input", debounce(score, 300));
  document.querySelectorAll(".example").forEach((button) => {
    button.addEventListener("click", () => {
      review.value = button.textContent;
      score();
    });
  });
}

// --- Generate -------------------------------------------------------------------------

function setUpGenerate() {
  const form = byId("generate-form");
  const digitIn = byId("gen-digit");
  const countIn = byId("gen-n");
  const seedIn = byId("gen-seed");
  const grid = byId("gen-grid");
  const note = byId("gen-note");
  const download = byId("gen-download");
  const errorBox = byId("generate-error");
  let downloadUrl = null;
  const nextRequest = latestOnly();
  form.noValidate = true; // the service validates, and the page shows its message

  // The choices live in the URL, so that a result can be shared.
  const params = new URLSearchParams(window.location.search);
  if (params.has("digit")) digitIn.value = params.get("digit");
  if (params.has("n")) countIn.value = params.get("n");
  if (params.has("seed")) seedIn.value = params.get("seed");

  function choices() {
    const request = { n: Number(countIn.value), seed: Number(seedIn.value) };
    if (digitIn.value !== "") request.digit = Number(digitIn.value);
    return request;
  }

  async function run() {
    const request = choices();
    const query = new URLSearchParams({ digit: digitIn.value, n: countIn.value, seed: seedIn.value });
    history.replaceState(null, "", `?${query}${window.location.hash}`);
    const signal = nextRequest();
    try {
      const [answer, gridPng] = await Promise.all([
        postJson("generate", request, signal),
        postJson("generate", { ...request, grid: true }, signal),
      ]);
      const result = await answer.json();
      const png = await gridPng.blob();
      if (signal.aborted) return;
      clearError(errorBox);
      grid.replaceChildren(...result.images.map((image, index) => {
        const img = document.createElement("img");
        img.src = `data:image/png;base64,${image.png}`;
        img.alt = `generated digit ${image.digit} (${index + 1} of ${result.images.length})`;
        img.dataset.digit = String(image.digit);
        return img;
      }));
      note.textContent = `${result.images.length} digit${result.images.length === 1 ? "" : "s"}, ` +
        `seed ${result.seed}: the same choices always give the same images.`;
      if (downloadUrl) URL.revokeObjectURL(downloadUrl);
      downloadUrl = URL.createObjectURL(png);
      download.href = downloadUrl;
      download.download = `digits-${digitIn.value || "any"}-n${request.n}-seed${result.seed}.png`;
      download.hidden = false;
    } catch (error) {
      if (signal.aborted) return;
      grid.replaceChildren();
      note.textContent = "";
      download.hidden = true;
      showError(errorBox, error);
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  digitIn.addEventListener("change", run);
  byId("gen-new-seed").addEventListener("click", () => {
    const [value] = crypto.getRandomValues(new Uint32Array(1));
    seedIn.value = String(value);
    run();
  });
  run();
}

setUpClassify();
setUpSentiment();
setUpGenerate();
