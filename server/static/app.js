"use strict";
// The glm-serve chat page: streams /v1/chat/completions (SSE) with fetch. No build step, no dependencies.
// URLs are relative ("v1/models"), so the page also works behind a proxy that serves it under a path prefix.

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  system: $("system"), clear: $("clear"), messages: $("messages"), composer: $("composer"), input: $("input"),
  send: $("send"), stop: $("stop"),
};
const KEY = "glm-serve.chat.";
let history = load("history", []); // [{role, content, stats?}]
let controller = null; // the running request's AbortController

function load(name, fallback) {
  try { return JSON.parse(localStorage.getItem(KEY + name)) ?? fallback; } catch { return fallback; }
}
function save() {
  localStorage.setItem(KEY + "history", JSON.stringify(history));
  localStorage.setItem(KEY + "settings", JSON.stringify({
    model: ui.model.value, temperature: ui.temperature.value, maxTokens: ui.maxTokens.value, system: ui.system.value,
  }));
  localStorage.setItem(KEY + "apiKey", JSON.stringify(ui.apiKey.value));
}

// ---- a small, safe markdown renderer: everything is HTML-escaped first, then a few patterns become tags ----
function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}
function inline(text) { // `text` is escaped already
  const kept = []; // code spans and links, kept away from the bold/italic patterns
  const keep = (html) => `\u0000${kept.push(html) - 1}\u0000`;
  return text
    .replace(/`([^`\n]+)`/g, (_, code) => keep(`<code>${code}</code>`))
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
      (_, label, url) => keep(`<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`))
    .replace(/\*\*(?=\S)([^*\n]*\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*(?=\S)([^*\n]*\S)\*(?![*\w])/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_(?=\S)([^_\n]*\S)_(?![_\w])/g, "$1<em>$2</em>")
    .replace(/\n/g, "<br>")
    .replace(/\u0000(\d+)\u0000/g, (_, i) => kept[i]);
}
function markdown(source) {
  const out = [];
  let para = [], list = null, code = null;
  const endPara = () => { if (para.length) out.push(`<p>${inline(para.join("\n"))}</p>`); para = []; };
  const endList = () => {
    if (list) out.push(`<${list.tag}${list.start}>${list.items.map((i) => `<li>${inline(i)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  for (const line of escapeHtml(source.replace(/\u0000/g, "")).split("\n")) {
    if (code) {
      if (/^\s*```\s*$/.test(line)) { out.push(`<pre><code>${code.join("\n")}</code></pre>`); code = null; } else code.push(line);
      continue;
    }
    let m;
    if (/^\s*```/.test(line)) { endPara(); endList(); code = []; continue; }
    if ((m = /^\s*([-*+]|(\d+)[.)])\s+(.*)$/.exec(line))) {
      const tag = m[2] ? "ol" : "ul";
      endPara();
      if (!list || list.tag !== tag) { endList(); list = { tag, start: m[2] && m[2] !== "1" ? ` start="${+m[2]}"` : "", items: [] }; }
      list.items.push(m[3]);
    } else if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) {
      endPara(); endList();
      const level = Math.min(6, m[1].length + 2);
      out.push(`<h${level}>${inline(m[2])}</h${level}>`);
    } else if (!line.trim()) {
      endPara(); // a list goes on after a blank line: "1. a\n\n2. b" is one list
    } else if (list && /^\s+\S/.test(line)) {
      list.items[list.items.length - 1] += " " + line.trim();
    } else {
      endList();
      para.push(line);
    }
  }
  if (code) out.push(`<pre><code>${code.join("\n")}</code></pre>`); // a fence still streaming
  endPara(); endList();
  return out.join("");
}

// ---- rendering ----
function bubble(msg) {
  const el = document.createElement("div");
  el.className = `msg ${msg.role}`;
  const content = document.createElement("div");
  content.className = "content";
  if (msg.role === "assistant") content.innerHTML = markdown(msg.content); else content.textContent = msg.content;
  el.append(content);
  if (msg.stats) {
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.textContent = msg.stats;
    el.append(stats);
  }
  return el;
}
function render() {
  ui.messages.replaceChildren(...history.map(bubble));
  if (!history.length) ui.messages.innerHTML = '<p class="empty">Start a conversation · 开始对话</p>';
  ui.messages.scrollTop = ui.messages.scrollHeight;
}
function showError(text) {
  const el = bubble({ role: "error", content: text });
  ui.messages.querySelector(".empty")?.remove();
  ui.messages.append(el);
  el.scrollIntoView({ block: "end" });
}
function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  document.body.dataset.busy = busy;
}

// ---- talking to the server ----
class ServerError extends Error {
  constructor(status, message, code, retryAfter) {
    super(message);
    Object.assign(this, { status, code, retryAfter });
  }
}
class Unreachable extends Error {}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (ui.apiKey.value.trim()) h.Authorization = `Bearer ${ui.apiKey.value.trim()}`;
  return h;
}
async function request(url, options) {
  let res;
  try {
    res = await fetch(url, { ...options, headers: headers() });
  } catch (err) {
    throw err.name === "AbortError" ? err : new Unreachable();
  }
  if (res.ok) return res;
  let message = `${res.status} ${res.statusText}`, code = null;
  try {
    const body = await res.json();
    message = body.error?.message || body.detail || message;
    code = body.error?.code;
  } catch { /* not JSON: keep the status line */ }
  throw new ServerError(res.status, message, code, res.headers.get("Retry-After"));
}
function describe(err) {
  if (err instanceof Unreachable) return "Cannot reach the server. Is it running? 无法连接服务器。";
  if (!(err instanceof ServerError)) return err.message;
  if (err.status === 401) return `API key missing or wrong: enter it in the API key field. (${err.message})`;
  if (err.status === 429) return `The server is busy. ${err.message}${err.retryAfter ? ` Try again in ${err.retryAfter} s.` : ""}`;
  if (err.code === "context_length_exceeded") {
    return `The conversation is too long for the model. ${err.message} Clear the conversation to start over.`;
  }
  return `Error ${err.status}: ${err.message}`;
}
async function* sseData(body) { // the `data:` payloads of a text/event-stream
  const reader = body.getReader(), decoder = new TextDecoder();
  let buffer = "", data = [];
  try {
    for (;;) {
      let chunk;
      try { chunk = await reader.read(); } catch (err) { throw err.name === "AbortError" ? err : new Unreachable(); }
      if (chunk.done) return;
      buffer += decoder.decode(chunk.value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        else if (line === "" && data.length) { yield data.join("\n"); data = []; }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
function statsText(usage, started, first, ended) {
  const wait = `first token after ${(((first || ended) - started) / 1000).toFixed(2)} s`;
  if (!usage) return wait;
  const later = usage.completion_tokens - 1; // the first token pays for the prompt; speed is how fast the rest came
  const speed = first && ended > first && later > 0 ? (later * 1000) / (ended - first) : 0;
  return `${usage.prompt_tokens} prompt + ${usage.completion_tokens} answer tokens · ${speed.toFixed(1)} tokens/s · ${wait}`;
}

async function ask(question) {
  const messages = [...history, { role: "user", content: question }].map(({ role, content }) => ({ role, content }));
  if (ui.system.value.trim()) messages.unshift({ role: "system", content: ui.system.value.trim() });
  const body = { model: ui.model.value || undefined, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat(ui.temperature.value), maxTokens = parseInt(ui.maxTokens.value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (maxTokens > 0) body.max_tokens = maxTokens;

  const answer = { role: "assistant", content: "" };
  history.push({ role: "user", content: question }, answer);
  render();
  const view = ui.messages.lastElementChild, content = view.querySelector(".content");
  view.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let first = 0, usage = null, failure = null;
  try {
    const res = await request("v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    for await (const data of sseData(res.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(`The server stopped the answer: ${chunk.error.message}`);
      usage = chunk.usage || usage;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        first ||= performance.now();
        const atBottom = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
        answer.content += delta;
        content.innerHTML = markdown(answer.content);
        if (atBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
      }
    }
    answer.stats = statsText(usage, started, first, performance.now());
  } catch (err) {
    if (err.name === "AbortError") answer.stats = "Stopped · 已停止";
    else failure = describe(err);
  }
  controller = null;
  if (!answer.content && history.at(-1) === answer) { // unanswered (and not cleared): give the question back
    history.splice(-2);
    if (!ui.input.value) ui.input.value = question;
  }
  save();
  render();
  if (failure) showError(failure);
  setBusy(false);
}

async function loadModels() {
  const saved = load("settings", {}).model;
  try {
    const cards = (await (await request("v1/models", {})).json()).data || [];
    const chat = cards.filter((c) => !c.kind || c.kind === "chat"); // glm-serve lists chat models first
    ui.model.replaceChildren(...chat.map((c) => {
      const option = new Option(c.id, c.id);
      if (c.max_model_len) option.title = `context: ${c.max_model_len} tokens`;
      return option;
    }));
    if (chat.some((c) => c.id === saved)) ui.model.value = saved;
  } catch (err) {
    showError(`Could not list the models. ${describe(err)}`);
  }
}

// ---- wiring ----
const settings = load("settings", {});
for (const [name, el] of [["temperature", ui.temperature], ["maxTokens", ui.maxTokens], ["system", ui.system]]) {
  if (settings[name] !== undefined) el.value = settings[name];
  el.addEventListener("change", save);
}
ui.apiKey.value = load("apiKey", "");
ui.apiKey.addEventListener("change", () => { save(); loadModels(); });
ui.model.addEventListener("change", save);
ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const question = ui.input.value.trim();
  if (!question || controller) return;
  ui.input.value = "";
  ask(question);
});
ui.input.addEventListener("keydown", (e) => { // Enter sends; Shift+Enter and IME composition (中文输入) do not
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
    e.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => controller?.abort());
ui.clear.addEventListener("click", () => {
  controller?.abort();
  history = [];
  save();
  render();
  ui.input.focus();
});
setBusy(false);
render();
loadModels();
ui.input.focus();
