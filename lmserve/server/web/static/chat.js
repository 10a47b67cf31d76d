// The chat page: conversations kept on the server (Conversations API), replies streamed from
// /v1/responses with `conversation`, so the server holds the history and a reload finds it.
// Stop aborts the request (the server sees the client leave and stops generating) and keeps
// what was written so far in the conversation.

import { Api } from "./api.js";
import { Reply, textOf, turnsOf } from "./reply.js";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top-p", "max-tokens"];
const NUMBERS = { temperature: "temperature", "top-p": "top_p", "max-tokens": "max_output_tokens" };
const MAX_TITLE = 60;

class Chat {
  constructor() {
    this.api = new Api((message) => askKey(message));
    this.conversationId = null;
    this.controller = null; // aborts the reply streaming now
  }

  async start() {
    this.bind();
    for (const id of SETTINGS) $(id).value = localStorage.getItem(`lmserve.${id}`) ?? "";
    await Promise.all([this.loadModels(), this.loadConversations()]);
    await this.openAddressed();
    window.addEventListener("hashchange", () => this.openAddressed());
    document.body.dataset.ready = "true";
  }

  // The conversation the address names (#conv_...), as a link or a reload gives it.
  async openAddressed() {
    const id = location.hash.slice(1);
    if (id.startsWith("conv_") && id !== this.conversationId) await this.open(id).catch(() => this.newChat());
  }

  bind() {
    $("composer").addEventListener("submit", (e) => { e.preventDefault(); this.submit(); });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); this.submit(); }
    });
    $("stop").addEventListener("click", () => this.controller?.abort());
    $("new-chat").addEventListener("click", () => this.newChat());
    $("model").addEventListener("change", () => { localStorage.setItem("lmserve.model", $("model").value); this.showStatus(); });
    $("settings-toggle").addEventListener("click", () => {
      $("settings").hidden = !$("settings").hidden;
      $("settings-toggle").setAttribute("aria-expanded", String(!$("settings").hidden));
    });
    for (const id of SETTINGS) $(id).addEventListener("change", () => localStorage.setItem(`lmserve.${id}`, $(id).value));
    $("messages").addEventListener("click", (e) => this.clicked(e));
  }

  // ---- models

  async loadModels() {
    const { data } = await this.api.json("GET", "/v1/models");
    this.models = data.filter((m) => m.kind !== "embedding");
    const chosen = $("model").value || localStorage.getItem("lmserve.model");
    $("model").replaceChildren(...this.models.map((m) => new Option(m.id, m.id)));
    if (this.models.some((m) => m.id === chosen)) $("model").value = chosen;
    this.showStatus();
  }

  showStatus() {
    const model = this.models?.find((m) => m.id === $("model").value);
    const status = model?.status?.value;
    const progress = model?.status?.progress;
    $("model-status").textContent = status === "loaded" ? "" :
      status === "downloading" && progress ? `downloading ${Math.floor((100 * progress.done) / progress.total)}%` :
      status === "failed" ? `failed: ${model.status.error}` : status ? `${status}: loads with the first message` : "";
  }

  // ---- conversations

  async loadConversations() {
    const { data } = await this.api.json("GET", "/v1/conversations");
    $("conversations").replaceChildren(...data.map((c) => this.entry(c)));
  }

  entry(conversation) {
    const li = document.createElement("li");
    li.dataset.id = conversation.id;
    li.classList.toggle("active", conversation.id === this.conversationId);
    const title = button("title", conversation.metadata?.title || "Untitled", () => this.open(conversation.id));
    const rename = button("rename", "Rename", () => this.rename(li, conversation), "\u270E");
    const remove = button("delete", "Delete", () => this.remove(conversation), "\u2715");
    li.append(title, rename, remove);
    return li;
  }

  async open(id) {
    if (this.controller) return;
    const items = await this.items(id);
    this.conversationId = id;
    history.replaceState(null, "", `#${id}`);
    $("messages").replaceChildren();
    for (const turn of turnsOf(items)) this.addTurn(turn.role, turn.items);
    this.markActive();
  }

  async items(id) {
    const items = [];
    for (let after = null, more = true; more;) {
      const page = await this.api.json("GET", `/v1/conversations/${id}/items?order=asc&limit=100${after ? `&after=${after}` : ""}`);
      items.push(...page.data);
      [after, more] = [page.last_id, page.has_more];
    }
    return items;
  }

  newChat() {
    if (this.controller) return;
    this.conversationId = null;
    history.replaceState(null, "", location.pathname);
    $("messages").replaceChildren();
    this.markActive();
    $("prompt").focus();
  }

  markActive() {
    for (const li of $("conversations").children) li.classList.toggle("active", li.dataset.id === this.conversationId);
  }

  rename(li, conversation) {
    const input = document.createElement("input");
    input.className = "rename-input";
    input.value = conversation.metadata?.title || "";
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      const title = input.value.trim().slice(0, MAX_TITLE);
      if (save && title) await this.api.json("POST", `/v1/conversations/${conversation.id}`, { metadata: { ...conversation.metadata, title } });
      await this.loadConversations();
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") finish(true);
      if (e.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
    li.replaceChildren(input);
    input.focus();
    input.select();
  }

  async remove(conversation) {
    if (!confirm(`Delete "${conversation.metadata?.title || "Untitled"}"?`)) return;
    await this.api.json("DELETE", `/v1/conversations/${conversation.id}`);
    if (conversation.id === this.conversationId) this.newChat();
    await this.loadConversations();
  }

  // ---- turns

  addTurn(role, items) {
    const turn = document.createElement("article");
    turn.className = `turn ${role}`;
    const body = document.createElement("div");
    body.className = "body";
    turn.append(body);
    if (role === "user") {
      body.textContent = items.map(textOf).join("");
    } else {
      turn.append(actions(), stats());
      const reply = new Reply(body);
      items.forEach((item, index) => reply.set(index, item));
      reply.flush();
    }
    $("messages").append(turn);
    turn.scrollIntoView({ block: "end" });
    return turn;
  }

  submit() {
    const text = $("prompt").value;
    if (!text.trim() || this.controller) return;
    $("prompt").value = "";
    this.send(text);
  }

  async send(text) {
    this.showError("");
    const model = $("model").value;
    try {
      if (!this.conversationId) await this.create(text);
    } catch (error) {
      return this.failed(error, text, [], true);
    }
    const turns = [this.addTurn("user", [{ type: "message", role: "user", content: [{ type: "input_text", text }] }]),
                   this.addTurn("assistant", [])];
    const reply = new Reply(turns[1].querySelector(".body"));
    this.busy(new AbortController());
    try {
      for await (const event of this.api.events(this.request(text, model), this.controller.signal)) reply.apply(event);
      reply.flush();
      turns[1].querySelector(".stats").textContent = reply.summary(model);
      if (reply.error) this.showError(reply.error);
      turns[1].classList.toggle("failed", Boolean(reply.error));
    } catch (error) {
      reply.flush();
      if (error.name !== "AbortError") return this.failed(error, text, reply.started ? [] : turns, !reply.started);
      await this.keepStopped(text, reply, turns[1]);
    } finally {
      this.busy(null);
      this.loadModels();
    }
  }

  async create(text) {
    const title = text.trim().replace(/\s+/g, " ").slice(0, MAX_TITLE);
    const conversation = await this.api.json("POST", "/v1/conversations", { metadata: { title } });
    this.conversationId = conversation.id;
    history.replaceState(null, "", `#${conversation.id}`);
    await this.loadConversations();
  }

  request(text, model) {
    // truncation "auto": a chat longer than the context leaves its oldest turns out of the prompt
    // (the server keeps them all) rather than failing every message from then on
    const body = { model, input: text, conversation: this.conversationId, truncation: "auto" };
    const system = $("system").value.trim();
    if (system) body.instructions = system;
    for (const [id, name] of Object.entries(NUMBERS)) if ($(id).value !== "") body[name] = Number($(id).value);
    return body;
  }

  // A stopped reply: the server stored nothing for it, so the part written is added to the
  // conversation here, as the user saw it.
  async keepStopped(text, reply, turn) {
    turn.classList.add("stopped");
    turn.querySelector(".stats").textContent = "stopped";
    const written = reply.items.filter((item) => item?.type === "message" && textOf(item));
    const items = [{ type: "message", role: "user", content: text },
                   ...written.map((item) => ({ type: "message", role: "assistant", content: textOf(item) }))];
    await this.api.json("POST", `/v1/conversations/${this.conversationId}/items`, { items });
  }

  // A failed request: when nothing was answered, its turns leave and the message goes back to the box.
  failed(error, text, turns, restore) {
    for (const turn of turns) turn.remove();
    if (restore) $("prompt").value ||= text;
    this.showError(error.message);
  }

  busy(controller) {
    this.controller = controller;
    $("send").hidden = Boolean(controller);
    $("stop").hidden = !controller;
    document.body.classList.toggle("streaming", Boolean(controller));
  }

  showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  async clicked(event) {
    const target = event.target.closest("button");
    if (!target) return;
    const turn = target.closest(".turn");
    if (target.classList.contains("copy-code")) await copy(target.parentElement.querySelector("code").textContent, target);
    if (target.classList.contains("copy")) await copy(turn.querySelector(".body").dataset.text ?? "", target);
    if (target.classList.contains("regenerate")) await this.regenerate(turn);
  }

  // Regenerate the last reply: its turn (the user's message and everything after it) leaves the
  // conversation on the server and the page, and the message is sent again.
  async regenerate(turn) {
    if (this.controller || turn !== $("messages").lastElementChild) return;
    const items = await this.items(this.conversationId);
    const last = items.findLastIndex((item) => item.type === "message" && item.role === "user");
    if (last < 0) return;
    for (const item of items.slice(last)) {
      await this.api.json("DELETE", `/v1/conversations/${this.conversationId}/items/${item.id}`);
    }
    turn.previousElementSibling?.remove();
    turn.remove();
    await this.send(textOf(items[last]));
  }
}

function askKey(message) {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-error").textContent = message;
    dialog.addEventListener("close", () => resolve($("key-input").value.trim()), { once: true });
    if (!dialog.open) {
      $("key-input").value = "";
      dialog.showModal();
    }
  });
}

function button(className, label, onClick, symbol = label) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = className;
  element.textContent = symbol;
  element.title = label;
  element.addEventListener("click", onClick);
  return element;
}

function actions() {
  const row = document.createElement("div");
  row.className = "actions";
  row.append(button("copy", "Copy", () => {}), button("regenerate", "Regenerate", () => {}));
  return row;
}

function stats() {
  const line = document.createElement("div");
  line.className = "stats";
  return line;
}

async function copy(text, target) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
  } else { // a page served over plain http to another machine has no clipboard API
    const area = Object.assign(document.createElement("textarea"), { value: text });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const label = target.textContent;
  target.textContent = "Copied";
  setTimeout(() => { target.textContent = label; }, 1500);
}

window.chat = new Chat();
window.chat.start().catch((error) => {
  $("error").textContent = error.message;
  $("error").hidden = false;
});
