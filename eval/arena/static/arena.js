// The arena page: show a pair, take left / right / tie (buttons or arrow keys), record it, and
// show the next pair at once (compare mode fetches and preloads it while the rater looks).
"use strict";
const csrf = document.querySelector('meta[name="csrf"]').content;
const mode = document.body.dataset.mode;
const $ = (id) => document.getElementById(id);
let current = null;
let shownAt = 0;
let busy = false;
let upcoming = null;

function newUid() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.error || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function preload(pair) {
  const load = (url) => new Promise((done) => {
    const image = new Image();
    image.onload = image.onerror = done;
    image.src = url;
  });
  return Promise.all([load(pair.left.url), load(pair.right.url)]).then(() => pair);
}

function setEnabled(on) {
  for (const id of ["pick-left", "pick-right", "pick-tie"]) $(id).disabled = !on;
}

function show(pair) {
  $("left").src = pair.left.url;
  $("right").src = pair.right.url;
  $("pair").hidden = $("tie-row").hidden = false; // hidden until there is a pair to show
  $("prompt-shown").textContent = pair.prompt; // text, never HTML
  current = pair;
  shownAt = performance.now();
  setEnabled(true);
  document.body.dataset.shown = `${pair.left.uid}:${pair.right.uid}`;
}

function fetchPair(prompt) {
  return post("/api/pair", prompt === undefined ? {} : { prompt }).then(preload);
}

async function judge(choice) {
  if (!current || busy) return;
  busy = true;
  setEnabled(false);
  const body = {
    uid: newUid(), pair: current.pair, choice,
    latency_ms: Math.round(performance.now() - shownAt),
  };
  let saved = false;
  try {
    let data = null;
    for (let attempt = 0; ; attempt++) {
      try {
        data = await post("/api/judge", body); // the same uid on a retry: counted once
        break;
      } catch (error) {
        if (error.status || attempt >= 2) throw error;
        await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
      }
    }
    saved = true;
    $("count").textContent = data.count;
    document.body.dataset.count = data.count;
    $("status").textContent = "";
    if (mode === "generate") {
      show(await preload(data.next));
    } else {
      const next = await upcoming.catch(() => fetchPair()); // a failed prefetch: once more
      upcoming = fetchPair();
      upcoming.catch(() => {}); // a failure shows when this pair is needed
      show(next);
    }
  } catch (error) {
    // A saved choice is never offered again: the judged pair stays disabled.
    $("status").textContent = saved
      ? `${error.message} (your choice was saved; reload for another pair)`
      : error.message;
    if (!saved) setEnabled(true);
  } finally {
    busy = false;
  }
}

$("pick-left").addEventListener("click", () => judge("left"));
$("pick-right").addEventListener("click", () => judge("right"));
$("pick-tie").addEventListener("click", () => judge("tie"));
document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement) return;
  const choice = { ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie" }[event.key];
  if (choice) {
    event.preventDefault();
    judge(choice);
  }
});

if (mode === "generate") {
  $("prompt-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt) return;
    $("status").textContent = "drawing...";
    setEnabled(false);
    try {
      show(await fetchPair(prompt));
      $("status").textContent = "";
      $("prompt").blur();
    } catch (error) {
      $("status").textContent = error.message;
    }
  });
} else {
  fetchPair().then((pair) => {
    show(pair);
    upcoming = fetchPair();
    upcoming.catch(() => {});
  }).catch((error) => { $("status").textContent = error.message; });
}
