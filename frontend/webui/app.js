// edgellm's chat page: talks to this server's OpenAI-compatible API from the same origin.
//
// Safety: nothing a model, a document or the server says is ever parsed as HTML. Text reaches the
// page through textContent only (see renderText); the server's Content-Security-Policy also
// forbids inline script.
"use strict";

const STORE = {key: "edgellm.apiKey", chat: "edgellm.chat", settings: "edgellm.settings"};
const RAG_PROMPT = "Use the following context to answer the question. If the context does not contain " +
  "the answer, say that you do not know.\n----------------\n";

// What the server accepts as a key (frontend/access.py): a browser cannot send anything else in a header.
const API_KEY = /^[\x21-\x2b\x2d-\x7e]{1,512}$/;

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), clear: $("clear"), keyButton: $("key-button"), settings: $("settings"),
  system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens"),
  collection: $("collection"), collections: $("collections"), file: $("file"), upload: $("upload"),
  uploadProgress: $("upload-progress"), uploadStatus: $("upload-status"), useDocs: $("use-docs"),
  banner: $("banner"), docsState: $("docs-state"), conversation: $("conversation"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"), keyDialog: $("key-dialog"), keyForm: $("key-form"),
  keyReason: $("key-reason"), apiKey: $("api-key"), keyCancel: $("key-cancel"),
};

// -- browser storage -----------------------------------------------------------------------
function load(name, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(name));
    return value === null ? fallback : value;
  } catch (_) {
    return fallback;
  }
}

function save(name, value) {
  try {
    localStorage.setItem(name, JSON.stringify(value));
  } catch (_) {
    showBanner("This browser would not keep the conversation (storage full or disabled).");
  }
}

// The conversation as browser storage keeps it, checked field by field: storage is input too (an
// older page, another tab, a hand edit), and one bad entry must not stop the page from starting.
function storedChat() {
  const kept = load(STORE.chat, []);
  if (!Array.isArray(kept)) return [];
  const text = (v) => (typeof v === "string" ? v : undefined);
  const number = (v) => (typeof v === "number" && Number.isFinite(v) ? v : undefined);
  return kept.filter((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string")
    .map((m) => {
      const message = {role: m.role, content: m.content, model: text(m.model), note: text(m.note),
                       error: text(m.error), collection: text(m.collection)};
      if (m.stats && number(m.stats.tokens) !== undefined) {
        message.stats = {tokens: m.stats.tokens, ttft_ms: number(m.stats.ttft_ms),
                         tokens_per_s: number(m.stats.tokens_per_s)};
      }
      if (Array.isArray(m.sources)) {
        message.sources = m.sources.filter((p) => p && typeof p.source === "string" && number(p.score) !== undefined)
          .map((p) => ({source: p.source, score: p.score}));
      }
      return message;
    });
}

let messages = storedChat();
let running = null;  // {controller, message} while an answer is streaming
let afterKey = null;  // what to do again once an API key is entered

// -- errors ----------------------------------------------------------------------------------
// fetch could not reach the server, or the connection broke while reading an answer.
class NetworkError extends Error {}

class HttpError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function httpError(response) {
  let message = "";
  try {
    const body = await response.json();
    message = (body && body.error && typeof body.error.message === "string") ? body.error.message : "";
  } catch (_) { /* not JSON: the status says enough */ }
  return new HttpError(response.status, message || response.statusText || "no details",
                       response.headers.get("Retry-After"));
}

function describe(error) {
  if (error instanceof HttpError) {
    if (error.status === 401) return "The server needs a valid API key: " + error.message;
    if (error.status === 503 || error.status === 429) {
      const wait = error.retryAfter ? ` Try again in ${error.retryAfter} s.` : " Try again in a moment.";
      return `The server is busy (${error.status}): ${error.message.replace(/\.$/, "")}.${wait}`;
    }
    if (error.status >= 400 && error.status < 500) return `The request was refused (${error.status}): ${error.message}`;
    return `The server failed (${error.status}): ${error.message}`;
  }
  if (error instanceof NetworkError) return "Could not reach the server: " + error.message;
  return "The server sent an answer this page could not read: " + String(error && error.message ? error.message : error);
}

function showBanner(text) {
  ui.banner.textContent = text;
  ui.banner.hidden = !text;
}

// -- the API ---------------------------------------------------------------------------------
function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = load(STORE.key, "");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, {headers: headers(options && options.headers)}));
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new NetworkError(error.message);
  }
  if (!response.ok) throw await httpError(response);
  return response;
}

async function postJSON(path, body, signal) {
  return api(path, {method: "POST", body: JSON.stringify(body), signal,
                    headers: {"Content-Type": "application/json"}});
}

function askForKey(reason, retry) {
  afterKey = retry || null;
  ui.keyReason.textContent = reason;
  ui.apiKey.value = "";
  ui.keyDialog.returnValue = "";  // "save" once saved; anything else when dismissed
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.apiKey.focus();
}

// Why the key prompt shows after a 401: the saved key was refused, or there is none yet.
function refusedKeyReason() {
  return load(STORE.key, "") ? "The saved API key was not accepted: enter another." : "This server needs an API key.";
}

// Runs an API call; a 401 asks for the key, and runs ``again`` (the whole operation) once one is saved.
async function withKey(call, again) {
  try {
    return await call();
  } catch (error) {
    if (error instanceof HttpError && error.status === 401) {
      askForKey(refusedKeyReason(), again);
      return null;
    }
    throw error;
  }
}

// -- models and collections ------------------------------------------------------------------
async function loadModels() {
  const response = await withKey(() => api("/v1/models"), loadModels);
  if (!response) return;
  const body = await response.json();
  const chat = (body.data || []).filter((m) => m.kind === "chat" && !m.alias_of).map((m) => String(m.id));
  const wanted = load(STORE.settings, {}).model;
  ui.model.replaceChildren(...chat.map((id) => new Option(id, id)));
  if (chat.includes(wanted)) ui.model.value = wanted;
  ui.model.title = ui.model.value;
  if (!chat.length) showBanner("This server has no chat model.");
  else showBanner("");
  await loadCollections();
}

async function loadCollections() {
  const response = await withKey(() => api("/v1/collections"), loadCollections);
  if (!response) return;
  const body = await response.json();
  ui.collections.replaceChildren(...(body.data || []).map((c) => new Option(String(c.model), String(c.name))));
}

// -- rendering (text only, never HTML) --------------------------------------------------------
// Paragraphs split on blank lines, ``` fences as code blocks (an unclosed one runs to the end, as
// while an answer streams). Every piece of text is set with textContent.
function renderText(container, text) {
  const blocks = [];
  let paragraph = [];
  let code = null;
  const flush = () => {
    if (paragraph.length) blocks.push({kind: "p", text: paragraph.join("\n")});
    paragraph = [];
  };
  for (const line of text.split("\n")) {
    const fence = /^\s*```(.*)$/.exec(line);
    if (code !== null) {
      if (fence && !fence[1].trim()) {
        blocks.push(code);
        code = null;
      } else {
        code.lines.push(line);
      }
    } else if (fence) {
      flush();
      code = {kind: "code", language: fence[1].trim(), lines: []};
    } else if (!line.trim()) {
      flush();
    } else {
      paragraph.push(line);
    }
  }
  flush();
  if (code !== null) blocks.push(code);
  container.replaceChildren(...blocks.map((block) => {
    if (block.kind === "p") {
      const p = document.createElement("p");
      p.textContent = block.text;
      return p;
    }
    const pre = document.createElement("pre");
    const codeEl = document.createElement("code");
    codeEl.textContent = block.lines.join("\n");
    if (block.language) pre.dataset.language = block.language.slice(0, 40);
    pre.append(codeEl);
    return pre;
  }));
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function formatStats(stats) {
  const parts = [`${stats.tokens} token${stats.tokens === 1 ? "" : "s"}`];
  if (stats.ttft_ms !== undefined) parts.push(`first token ${Math.round(stats.ttft_ms)} ms`);
  if (stats.tokens_per_s !== undefined) parts.push(`${stats.tokens_per_s.toFixed(1)} tokens/s`);
  return parts.join(" · ");
}

function renderSources(message) {
  if (!message.sources.length) {
    return element("p", "sources note", `No passage of '${message.collection}' scored above the server's ` +
                   "threshold: this answer does not come from your documents.");
  }
  const box = element("details", "sources");
  box.open = true;
  box.append(element("summary", "",
    `${message.sources.length} source${message.sources.length === 1 ? "" : "s"} from '${message.collection}'`));
  const list = element("ol");
  for (const source of message.sources) {
    const item = element("li", "source");
    item.append(element("span", "score", `score ${Number(source.score).toFixed(3)}`), element("span", "text", source.source));
    list.append(item);
  }
  box.append(list);
  return box;
}

function renderMessage(message) {
  const el = element("article", `msg ${message.role}`);
  el.append(element("h2", "who", message.role === "user" ? "You" : (message.model || "Assistant")));
  const body = element("div", "body");
  renderText(body, message.content || "");
  el.append(body);
  if (message.pending) el.append(element("p", "pending", "Generating…"));
  if (message.note) el.append(element("p", "note", message.note));
  if (message.error) el.append(element("p", "msg-error error", message.error));
  if (message.stats) el.append(element("p", "stats", formatStats(message.stats)));
  if (message.sources) el.append(renderSources(message));
  message.el = el;
  return el;
}

function nearBottom() {
  const page = document.scrollingElement;
  return page.scrollHeight - page.scrollTop - page.clientHeight < 160;
}

function scrollToEnd() {
  const last = ui.conversation.lastElementChild;
  if (last) last.scrollIntoView({block: "end"});
}

function render() {
  ui.conversation.replaceChildren(...messages.map(renderMessage));
  scrollToEnd();
}

let frame = 0;
function rerender(message) {  // at most once per frame while a reply streams
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    const follow = nearBottom();  // a reader who scrolled up to read stays where they are
    if (message.el && message.el.isConnected) message.el.replaceWith(renderMessage(message));
    if (follow) scrollToEnd();
  });
}

function keepChat() {
  save(STORE.chat, messages.map(({el, pending, ...kept}) => kept));
}

function keepSettings() {
  save(STORE.settings, {model: ui.model.value, system: ui.system.value, temperature: ui.temperature.value,
                        maxTokens: ui.maxTokens.value, collection: ui.collection.value, useDocs: ui.useDocs.checked,
                        open: ui.settings.open});
  showDocsState();
}

// Retrieval stays on once chosen (an upload turns it on): say so beside the message box, where it is
// seen even with the settings folded away.
function showDocsState() {
  const collection = ui.collection.value.trim() || "default";
  ui.docsState.textContent = ui.useDocs.checked ? `Answers use the documents of '${collection}'.` : "";
  ui.docsState.hidden = !ui.useDocs.checked;
  ui.model.title = ui.model.value;
}

function restoreSettings() {
  const s = load(STORE.settings, {});
  if (typeof s.system === "string") ui.system.value = s.system;
  if (typeof s.temperature === "string") ui.temperature.value = s.temperature;
  if (typeof s.maxTokens === "string") ui.maxTokens.value = s.maxTokens;
  if (typeof s.collection === "string") ui.collection.value = s.collection;
  ui.useDocs.checked = s.useDocs === true;
  ui.settings.open = typeof s.open === "boolean" ? s.open : window.matchMedia("(min-width: 720px)").matches;
  showDocsState();
}

// -- chat ------------------------------------------------------------------------------------
function setRunning(state) {
  running = state;
  ui.send.disabled = !!state;
  ui.stop.disabled = !state;
  document.body.classList.toggle("busy", !!state);
  ui.conversation.setAttribute("aria-busy", state ? "true" : "false");  // screen readers wait for the whole answer
}

// Whether a finished reply failed (an error, or no text at all): its turn is history no more.
const failed = (reply) => reply && reply.role === "assistant" && !reply.pending && (!!reply.error || !reply.content);

// The request for the reply now pending: the system text, then the conversation so far. A turn whose
// reply failed (a 400, a 503, an error mid-answer...) is left out, question and all: sent again it
// would fail again, or make two user turns in a row. A reply cut by Stop keeps its text.
function chatRequest(systemText) {
  const history = [];
  if (systemText) history.push({role: "system", content: systemText});
  messages.forEach((m, i) => {
    if (m.pending || failed(m) || (m.role === "user" && failed(messages[i + 1]))) return;
    history.push({role: m.role, content: m.content});
  });
  const body = {model: ui.model.value, messages: history, stream: true, stream_options: {include_usage: true}};
  if (ui.temperature.value.trim() !== "") body.temperature = Number(ui.temperature.value);
  if (ui.maxTokens.value.trim() !== "") body.max_tokens = Number(ui.maxTokens.value);
  return body;
}

async function retrieve(question, collection, signal) {
  const response = await postJSON("/v1/retrieve", {messages: [{role: "user", content: question}], collection}, signal);
  const body = await response.json();
  return Array.isArray(body.points) ? body.points : [];
}

// Reads a server-sent event stream, calling onEvent with each data payload; true once [DONE] came.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      if (error.name === "AbortError") throw error;
      return false;  // the connection broke mid-answer
    }
    const {value, done} = chunk;
    if (done) return false;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return true;
      onEvent(JSON.parse(data));
    }
  }
}

async function send() {
  const text = ui.prompt.value;
  if (running || !text.trim()) return;
  if (!ui.model.value) {
    showBanner("No chat model to send to: is the server up, and was the API key accepted?");
    return;
  }
  showBanner("");
  keepSettings();
  const controller = new AbortController();
  const user = {role: "user", content: text};
  const reply = {role: "assistant", content: "", model: ui.model.value, pending: true};
  messages.push(user, reply);
  ui.prompt.value = "";
  setRunning({controller, message: reply});
  render();
  keepChat();
  const started = performance.now();
  let firstAt = null;
  let usage = null;
  try {
    let systemText = ui.system.value.trim();
    let ragOff = false;
    if (ui.useDocs.checked) {
      const collection = ui.collection.value.trim() || "default";
      reply.collection = collection;
      reply.sources = await retrieve(text, collection, controller.signal);
      if (reply.sources.length) {
        systemText = (systemText ? systemText + "\n\n" : "") + RAG_PROMPT +
          reply.sources.map((s) => s.source).join("\n\n");
      }
      ragOff = true;  // the page did the retrieval: the server's own RAG (if configured) stays out
      rerender(reply);
    }
    const body = chatRequest(systemText);
    if (ragOff) body.rag = false;
    const response = await postJSON("/v1/chat/completions", body, controller.signal);
    const complete = await readEvents(response, (event) => {
      if (event.error) throw new HttpError(0, event.error.message || "the server reported an error");
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const piece = choice.delta && typeof choice.delta.content === "string" ? choice.delta.content : "";
        if (piece) {
          if (firstAt === null) firstAt = performance.now();
          reply.content += piece;
        }
        if (choice.finish_reason === "length") reply.truncated = true;
      }
      rerender(reply);
    });
    if (!complete) reply.error = "The connection dropped before the answer was complete.";
    else if (reply.truncated) reply.note = "The answer reached the max tokens limit.";
  } catch (error) {
    if (error.name === "AbortError") {
      reply.note = "Stopped.";
    } else if (error instanceof HttpError && error.status === 401) {
      reply.error = describe(error);
      askForKey("The server needs an API key. Send the message again once it is saved.");
    } else if (error instanceof HttpError && error.status === 0) {
      reply.error = "The answer failed: " + error.message;
    } else {
      reply.error = describe(error);
    }
  } finally {
    controller.abort();  // a stream the page gave up on (bad data, an error event) ends the job too
    const ended = performance.now();
    if (usage) {
      reply.stats = {tokens: usage.completion_tokens};
      if (firstAt !== null) {
        reply.stats.ttft_ms = firstAt - started;
        if (usage.completion_tokens > 1 && ended > firstAt) {
          reply.stats.tokens_per_s = (usage.completion_tokens - 1) / ((ended - firstAt) / 1000);
        }
      }
    }
    delete reply.truncated;
    reply.pending = false;
    setRunning(null);
    keepChat();
    if (reply.el && reply.el.isConnected) reply.el.replaceWith(renderMessage(reply));
    ui.prompt.focus();
  }
}

// -- documents -------------------------------------------------------------------------------
function upload() {
  const file = ui.file.files[0];
  if (!file) {
    ui.uploadStatus.textContent = "Choose a .txt or .md file first.";
    return;
  }
  const collection = ui.collection.value.trim() || "default";
  const form = new FormData();
  form.append("file", file);
  form.append("collection", collection);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/create/rag");
  try {
    for (const [name, value] of Object.entries(headers())) xhr.setRequestHeader(name, value);
  } catch (error) {  // a stored key no header can carry
    askForKey("The saved API key cannot be sent: enter it again.");
    return;
  }
  ui.upload.disabled = true;
  ui.uploadProgress.hidden = false;
  ui.uploadProgress.value = 0;
  ui.uploadStatus.textContent = `Uploading ${file.name}…`;
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) ui.uploadProgress.value = Math.round(100 * e.loaded / e.total);
  };
  xhr.upload.onload = () => {
    ui.uploadProgress.removeAttribute("value");  // indeterminate while the server embeds it
    ui.uploadStatus.textContent = `Uploaded ${file.name}; the server is splitting and embedding it…`;
  };
  const done = (text) => {
    ui.upload.disabled = false;
    ui.uploadProgress.hidden = true;
    ui.uploadStatus.textContent = text;
  };
  xhr.onerror = () => done(`Uploading ${file.name} failed: the connection to the server was lost.`);
  xhr.onload = () => {
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch (_) { /* shown below */ }
    if (xhr.status === 200 && body) {
      const chunks = `${body.chunks} chunk${body.chunks === 1 ? "" : "s"}`;
      done(`${body.filename}: ${body.status}, ${chunks} in collection '${body.collection}'.`);
      ui.useDocs.checked = true;
      keepSettings();
      loadCollections().catch((error) => showBanner(describe(error)));
      return;
    }
    const message = body && body.error && body.error.message ? body.error.message : xhr.statusText;
    if (xhr.status === 401) {
      done("The server needs an API key: upload again once it is saved.");
      askForKey(refusedKeyReason());
      return;
    }
    done(describe(new HttpError(xhr.status, message, xhr.getResponseHeader("Retry-After"))));
  };
  xhr.send(form);
}

// -- wiring ----------------------------------------------------------------------------------
ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
ui.stop.addEventListener("click", () => running && running.controller.abort());
ui.clear.addEventListener("click", () => {
  if (running) running.controller.abort();
  messages = [];
  keepChat();
  render();
  ui.prompt.focus();
});
ui.upload.addEventListener("click", upload);
ui.keyButton.addEventListener("click", () => askForKey("Enter the server's API key (empty: none).", loadModels));
ui.keyForm.addEventListener("submit", (e) => {  // method=dialog: the dialog closes itself
  const key = ui.apiKey.value.trim();
  if (key && !API_KEY.test(key)) {
    e.preventDefault();
    ui.keyReason.textContent = "An API key is 1 to 512 visible ASCII characters, without spaces or commas.";
    return;
  }
  save(STORE.key, key);
  const retry = afterKey;
  afterKey = null;
  if (retry) retry().catch((error) => showBanner(describe(error)));
});
ui.keyCancel.addEventListener("click", () => ui.keyDialog.close());
ui.keyDialog.addEventListener("cancel", () => { afterKey = null; });  // Escape
ui.keyDialog.addEventListener("close", () => {
  if (ui.keyDialog.returnValue !== "save" && !ui.model.options.length) {
    afterKey = null;
    showBanner("This server needs an API key: enter it with the API key button.");
  }
});
for (const el of [ui.model, ui.system, ui.temperature, ui.maxTokens, ui.collection, ui.useDocs]) {
  el.addEventListener("change", keepSettings);
}
ui.settings.addEventListener("toggle", keepSettings);

restoreSettings();
for (const m of messages) m.pending = false;
render();
loadModels().catch((error) => showBanner(describe(error)));
ui.prompt.focus();
