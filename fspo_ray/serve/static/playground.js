// The playground: a user's preferences, a question answered with and without them, and the user's
// choice between the two answers sent back as feedback (a new preference pair). Plain browser
// JavaScript against the service's own API; nothing to build, nothing from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, user: null, question: null, answers: {}, added: [] };

$("key").value = sessionStorage.getItem("fspo-key") || "";
$("key").addEventListener("change", () => { sessionStorage.setItem("fspo-key", $("key").value); loadModel(); });

function headers() {
  const key = $("key").value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

function say(text) { $("status").textContent = text; }

async function call(method, path, body) {
  const response = await fetch(path, { method, headers: headers(), body: body && JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = data.error ? data.error.message : Array.isArray(data.detail)
      ? data.detail.map((e) => `${e.loc.slice(1).join(".")}: ${e.msg}`).join("; ") : data.detail;
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return data;
}

async function loadModel() {
  try {
    state.model = (await call("GET", "/v1/models")).data[0].id;
    $("model").textContent = `model: ${state.model}`;
  } catch (error) { say(error.message); }
}

function showPairs(pairs, note) {
  $("pairs").replaceChildren(...pairs.map((p) => {
    const item = document.createElement("li");
    item.textContent = `${p.question} — prefers “${p.preferred}” over “${p.dispreferred}”`;
    return item;
  }));
  $("pairs-note").textContent = note;
}

async function loadPairs() {
  try {  // reading a history back needs the admin key; with the ordinary one, the pairs added here are shown
    const page = await call("GET", `/v1/users/${encodeURIComponent(state.user)}/preferences?limit=100`);
    showPairs(page.pairs, `(${page.pairs.length} stored)`);
  } catch (error) {
    showPairs(state.added.slice().reverse(), `(added here; reading stored pairs needs the admin key)`);
  }
}

$("user-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.user = $("user-id").value.trim();
  state.added = [];
  say(`user ${state.user}`);
  await loadPairs();
});

$("pair-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!state.user) return say("pick a user first");
  const pair = { question: $("pair-question").value, preferred: $("pair-preferred").value,
                 dispreferred: $("pair-dispreferred").value };
  try {
    await call("POST", `/v1/users/${encodeURIComponent(state.user)}/preferences`, { pairs: [pair] });
    state.added.push(pair);
    event.target.reset();
    say("preference added");
    await loadPairs();
  } catch (error) { say(error.message); }
});

// One answer, streamed into `element` as OpenAI-style chunks arrive; its text when it ends.
async function stream(body, element) {
  element.textContent = "";
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
    body: JSON.stringify({ ...body, model: state.model, stream: true }) });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(`${response.status}: ${data.error ? data.error.message : response.statusText}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
      if (delta) { text += delta; element.textContent = text; }
    }
  }
  return text.trim();
}

$("ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!state.user) return say("pick a user first");
  if (!state.model) await loadModel();
  state.question = $("question").value.trim();
  for (const which of ["personalized", "base"]) {
    $(`prefer-${which}`).disabled = true;
    $(`answer-${which}`).classList.remove("chosen");
  }
  say("answering…");
  const messages = [{ role: "user", content: state.question }];
  try {
    const [personalized, base] = await Promise.all([
      stream({ messages, user: state.user }, $("answer-personalized")),
      stream({ messages }, $("answer-base")),
    ]);
    state.answers = { personalized, base };
    const different = personalized && base && personalized !== base;
    for (const which of ["personalized", "base"]) $(`prefer-${which}`).disabled = !different;
    say(different ? "which answer does the user prefer?" : "the two answers are the same: nothing to choose");
  } catch (error) { say(error.message); }
});

for (const [which, other] of [["personalized", "base"], ["base", "personalized"]]) {
  $(`prefer-${which}`).addEventListener("click", async () => {
    try {
      const saved = await call("POST", "/v1/feedback", { user_id: state.user, pair: { question: state.question,
        preferred: state.answers[which], dispreferred: state.answers[other] } });
      $(`answer-${which}`).classList.add("chosen");
      for (const button of ["personalized", "base"]) $(`prefer-${button}`).disabled = true;
      state.added.push({ question: state.question, preferred: state.answers[which], dispreferred: state.answers[other] });
      say(`feedback stored as pair ${saved.id}`);
      await loadPairs();
    } catch (error) { say(error.message); }
  });
}

loadModel();
