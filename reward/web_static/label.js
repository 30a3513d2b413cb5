// The labelling page: one pair at a time for the person named in ?annotator=. Model text only ever goes into the
// page through textContent, so it shows as written and is never parsed as HTML.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const annotator = new URLSearchParams(location.search).get("annotator");
const $ = (id) => document.getElementById(id);
let pair = null;   // the pair on screen, or null when nothing is left for this person
let busy = false;  // one request at a time: a double key press must not answer the next pair unseen

function say(text, ok) {
  $("status").textContent = text;
  $("status").className = ok ? "ok" : "";
}

function render(state) {
  pair = state.pair;
  const p = state.progress;
  $("progress").textContent = `${annotator}: ${p.mine} labelled by you · ${p.decided} of ${p.total} pairs done · ` +
    `${p.left_for_me} left for you`;
  const pairView = [$("prompt"), $("responses"), $("comment"), $("source"), document.querySelector('label[for="comment"]')];
  pairView.forEach((el) => { el.hidden = pair === null; });
  document.querySelectorAll("#choices button[data-choice]").forEach((b) => { b.hidden = pair === null; });
  $("done").hidden = pair !== null;
  if (pair === null) {
    $("done").textContent = p.held_by_others
      ? `Nothing for you right now: ${p.held_by_others} pairs are on someone else's screen. Reload later.`
      : `Nothing left for you to label. ${p.decided} of ${p.total} pairs are done.`;
    return;
  }
  const prompt = $("prompt");
  prompt.replaceChildren();
  for (const message of pair.prompt) {
    const turn = document.createElement("div");
    turn.className = "turn";
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = `${message.role}:`;
    const content = document.createElement("span");
    content.textContent = message.content;
    turn.append(role, content);
    prompt.append(turn);
  }
  $("response-a").textContent = pair.response_a;
  $("response-b").textContent = pair.response_b;
  $("source").textContent = `pair ${pair.id} · from ${pair.source}`;
}

async function call(method, path, body) {
  if (busy) return null;
  busy = true;
  document.querySelectorAll("#choices button").forEach((b) => { b.disabled = true; });
  try {
    const response = await fetch(path, {
      method,
      headers: body ? { "Content-Type": "application/json", "X-CSRF-Token": csrf } : {},
      body: body ? JSON.stringify(body) : undefined,
      credentials: "same-origin",
    });
    const data = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
    if (!response.ok) {
      say(data.error || `the server answered ${response.status}`);
      return null;
    }
    return data;
  } catch (error) {
    say(`not saved: the server cannot be reached (${error.message}); your answer was not recorded`);
    return null;
  } finally {
    busy = false;
    document.querySelectorAll("#choices button").forEach((b) => { b.disabled = false; });
  }
}

async function answer(choice) {
  if (pair === null) return;
  const state = await call("POST", "/api/answer",
    { annotator, pair_id: pair.id, choice, comment: $("comment").value });
  if (state) {
    $("comment").value = "";
    say(choice === "skip" ? "skipped: it comes back after the others" : "saved", true);
    render(state);
  }
}

async function undo() {
  const state = await call("POST", "/api/undo", { annotator });
  if (state) {
    say(state.undone ? "took back your last answer: here it is again" : "nothing to undo", true);
    render(state);
  }
}

const KEYS = { a: "a", "1": "a", b: "b", "2": "b", t: "tie", "3": "tie", s: "skip" };

document.addEventListener("keydown", (event) => {
  if (!annotator) return;
  const typing = event.target instanceof HTMLTextAreaElement || event.target instanceof HTMLInputElement;
  if (typing) {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
    event.preventDefault();
    undo();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  if (key === "u") {
    undo();
  } else if (KEYS[key]) {
    event.preventDefault();
    answer(KEYS[key]);
  }
});

document.addEventListener("DOMContentLoaded", async () => {
  if (!annotator) {
    $("who").hidden = false;
    $("who-name").value = localStorage.getItem("annotator") || "";
    $("who-name").focus();
    return;
  }
  localStorage.setItem("annotator", annotator);
  document.querySelectorAll("#choices button[data-choice]").forEach((b) => {
    b.addEventListener("click", () => answer(b.dataset.choice));
  });
  $("undo").addEventListener("click", undo);
  const state = await call("GET", `/api/next?annotator=${encodeURIComponent(annotator)}`);
  if (state) {
    $("desk").hidden = false;
    render(state);
  }
});
