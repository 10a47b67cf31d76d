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
    this.locked = false; // one action at a time: a send, a regenerate, an open, a delete
  }

  // Run `action` unless another is under way (then say so); its error is shown, not lost.
  async exclusive(action) {
    if (this.locked) return this.showError("Wait for the reply to finish, or stop it.");
    this.locked = true;
    try {
      await action();
    } catch (error) {
      this.showError(error.message);
    } finally {
      this.locked = false;
    }
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
    if (id.startsWith("conv_") && id !== this.conversationId) await this.open(id).catch(() => this.clear());
  }

  bind() {
    $("composer").addEventListener("submit", (e) => { e.preventDefault(); this.submit(); });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); this.submit(); }
    });
    $("stop").addEventListener("click", () => this.controller?.abort());
    document.addEventListener("keydown", (e) => { if (e.key === "Escape") this.controller?.abort(); });
    $("new-chat").addEventListener("click", () => this.exclusive(async () => this.clear()));
    $("model").addEventListener("change", () => { localStorage.setItem("lmserve.model", $("model").value); this.showStatus(); });
    $("settings-toggle").addEventListener("click", () => {
      $("settings").hidden = !$("settings").hidden;
      $("settings-toggle").setAttribute("aria-expanded", String(!$("settings").hidden));
    });
    for (const id of SETTINGS) $(id).addEventListener("change", () => localStorage.setItem(`lmserve.${id}`, $(id).value));
    $("messages").addEventListener("click", (e) => this.clicked(e));
    $("sidebar-toggle").addEventListener("click", () => this.showSidebar(!document.body.classList.contains("sidebar-open")));
    $("conversations").addEventListener("click", (e) => { if (e.target.closest(".title")) this.showSidebar(false); });
    $("new-chat").addEventListener("click", () => this.showSidebar(false));
  }

  showSidebar(open) {
    document.body.classList.toggle("sidebar-open", open);
    $("sidebar-toggle").setAttribute("aria-expanded", String(open));
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
    const title = button("title", conversation.metadata?.title || "Untitled",
                         () => this.exclusive(() => this.open(conversation.id)));
    const rename = button("rename", "Rename", () => this.rename(li, conversation), "\u270E");
    const remove = button("delete", "Delete", () => this.exclusive(() => this.remove(conversation)), "\u2715");
    li.append(title, rename, remove);
    return li;
  }

  async open(id) {
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

  clear() {
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
      try {
        if (save && title) await this.api.json("POST", `/v1/conversations/${conversation.id}`, { metadata: { ...conversation.metadata, title } });
      } catch (error) {
        this.showError(error.message);
      }
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
    if (conversation.id === this.conversationId) this.clear();
    await this.loadConversations();
  }

  // ---- turns

  addTurn(role, items, stored = true) {
    const turn = document.createElement("article");
    turn.className = `turn ${role}`;
    const body = document.createElement("div");
    body.className = "body";
    turn.append(body);
    if (role === "user") {
      body.textContent = items.map(textOf).join("");
    } else {
      turn.dataset.stored = String(stored);
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
    if (!text.trim() || this.locked) return;
    $("prompt").value = "";
    this.exclusive(() => this.send(text));
  }

  async send(text) {
    this.showError("");
    const model = $("model").value;
    try {
      if (!this.conversationId) await this.create(text);
    } catch (error) {
      return this.failed(error, text, []);
    }
    const turns = [this.addTurn("user", [{ type: "message", role: "user", content: [{ type: "input_text", text }] }]),
                   this.addTurn("assistant", [], false)];
    const reply = new Reply(turns[1].querySelector(".body"));
    this.busy(new AbortController());
    try {
      for await (const event of this.api.events(this.request(text, model), this.controller.signal)) reply.apply(event);
      if (!reply.status && !reply.error) reply.error = "The connection closed before the reply was finished.";
      this.finishTurn(turns[1], reply, model);
    } catch (error) {
      if (error.name === "AbortError") {
        // Stopped: unless the reply had finished first (then the server stored it), keep what it wrote.
        return reply.status ? this.finishTurn(turns[1], reply, model) : await this.keepStopped(text, reply, turns[1]);
      }
      if (!reply.started) return this.failed(error, text, turns);
      reply.error = error.message;
      this.finishTurn(turns[1], reply, model);
    } finally {
      this.busy(null);
      this.loadModels();
    }
  }

  // A reply that ended: its numbers, or its error. Only a reply the server stored may be regenerated
  // by deleting it there.
  finishTurn(turn, reply, model) {
    reply.flush();
    turn.querySelector(".stats").textContent = reply.summary(model);
    if (reply.error) this.showError(reply.error);
    turn.classList.toggle("failed", Boolean(reply.error));
    turn.dataset.stored = String(!reply.error);
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
    turn.dataset.stored = "true";
  }

  // A request that failed before any answer: its turns leave and the message goes back to the box.
  failed(error, text, turns) {
    for (const turn of turns) turn.remove();
    $("prompt").value ||= text;
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
    if (target.classList.contains("regenerate")) await this.exclusive(() => this.regenerate(turn));
  }

  // Regenerate the last reply: its turn (the user's message and everything after it) leaves the
  // page and, if the server stored it, the conversation there; then the message is sent again.
  async regenerate(turn) {
    if (turn !== $("messages").lastElementChild) return;
    const asked = turn.previousElementSibling;
    const text = asked?.querySelector(".body").textContent ?? "";
    if (turn.dataset.stored === "true") {
      const items = await this.items(this.conversationId);
      const last = items.findLastIndex((item) => item.type === "message" && item.role === "user");
      for (const item of last < 0 ? [] : items.slice(last)) {
        await this.api.json("DELETE", `/v1/conversations/${this.conversationId}/items/${item.id}`);
      }
    }
    asked?.remove();
    turn.remove();
    if (text) await this.send(text);
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
