// One assistant reply on the page: its output items (messages, reasoning, tool calls), built
// from the Responses API's stream events or read back from a stored conversation, each drawn in
// its own element and redrawn at most once per frame while it grows.

import { escapeHtml, renderMarkdown } from "./markdown.js";

export function textOf(item) {
  if (typeof item.content === "string") return item.content;
  const parts = item.content?.length ? item.content : item.summary ?? [];
  return parts.map((part) => part.text ?? "").join("");
}

// Stored items -> turns: a user message opens a turn, everything after it is the reply.
export function turnsOf(items) {
  const turns = [];
  for (const item of items) {
    if (item.type === "message" && (item.role === "system" || item.role === "developer")) continue;
    const role = item.type === "message" && item.role === "user" ? "user" : "assistant";
    if (role === "user" || turns.at(-1)?.role !== "assistant") turns.push({ role, items: [] });
    turns.at(-1).items.push(item);
  }
  return turns;
}

export class Reply {
  constructor(body) {
    this.body = body;
    this.items = [];
    this.views = [];
    this.dirty = new Set();
    this.frame = 0;
    this.started = false; // the server began answering (response.created)
    this.times = { sent: performance.now(), first: null, last: null };
    this.usage = null;
    this.status = null;
    this.error = null;
  }

  set(index, item) {
    this.items[index] = item;
    this.dirty.add(index);
    if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  flush() {
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    const box = this.body.closest("#messages"); // follows the reply while the reader is at the bottom
    const following = box !== null && box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    for (const index of this.dirty) {
      this.views[index] ??= this.view(this.items[index]);
      this.views[index].update(this.items[index]);
    }
    this.dirty.clear();
    if (following) box.scrollTop = box.scrollHeight;
    this.body.dataset.text = this.items.filter((i) => i?.type === "message").map(textOf).join("\n\n");
  }

  view(item) {
    const view = VIEWS[item.type] ?? VIEWS.message;
    const element = view.make(item);
    element.classList.add("item", item.type);
    this.body.append(element);
    return { update: (latest) => view.update(element, latest) };
  }

  apply(event) {
    const handler = EVENTS[event.type];
    if (handler) handler(this, event);
  }

  grow(event, field, kind) {
    const item = this.items[event.output_index];
    this.times.first ??= performance.now();
    this.times.last = performance.now();
    if (field === "arguments") {
      item.arguments = (item.arguments ?? "") + event.delta;
    } else {
      item.content = [{ type: kind, text: textOf(item) + event.delta }];
    }
    this.set(event.output_index, item);
  }

  finished(response) {
    this.usage = response.usage;
    this.status = response.status;
    this.model = response.model;
  }

  summary(model) {
    if (this.error) return "failed";
    if (!this.usage) return "";
    const { output_tokens: out, input_tokens: prompt } = this.usage;
    const cached = this.usage.input_tokens_details?.cached_tokens ?? 0;
    const { sent, first, last } = this.times;
    const seconds = first !== null && last > first ? (last - first) / 1000 : null;
    const parts = [this.model ?? model, `${out} tokens`];
    if (seconds && out > 1) parts.push(`${((out - 1) / seconds).toFixed(1)} tok/s`);
    if (first !== null) parts.push(`${((first - sent) / 1000).toFixed(2)} s to first token`);
    parts.push(`${cached} of ${prompt} prompt tokens cached`);
    if (this.status === "incomplete") parts.push("stopped at the token limit");
    return parts.join(" · ");
  }
}

const EVENTS = {
  "response.created": (reply) => { reply.started = true; },
  "response.output_item.added": (reply, e) => reply.set(e.output_index, structuredClone(e.item)),
  "response.output_text.delta": (reply, e) => reply.grow(e, "content", "output_text"),
  "response.reasoning_text.delta": (reply, e) => reply.grow(e, "content", "reasoning_text"),
  "response.function_call_arguments.delta": (reply, e) => reply.grow(e, "arguments"),
  "response.output_item.done": (reply, e) => reply.set(e.output_index, e.item),
  "response.completed": (reply, e) => reply.finished(e.response),
  "response.incomplete": (reply, e) => reply.finished(e.response),
  "error": (reply, e) => { reply.error = e.message; },
  "response.failed": (reply, e) => { reply.error ??= e.response?.error?.message ?? "the reply failed"; },
};

const VIEWS = {
  message: {
    make: () => document.createElement("div"),
    update: (element, item) => { element.innerHTML = renderMarkdown(textOf(item)); },
  },
  reasoning: {
    make: () => {
      const details = document.createElement("details"); // folded until opened
      details.innerHTML = "<summary>Reasoning</summary><div class=\"reasoning-text\"></div>";
      return details;
    },
    update: (element, item) => { element.querySelector(".reasoning-text").innerHTML = renderMarkdown(textOf(item)); },
  },
  function_call: {
    make: () => document.createElement("div"),
    update: (element, item) => {
      element.innerHTML = `<div class="label">Tool call: <code>${escapeHtml(item.name ?? "")}</code></div>` +
        `<pre><code>${escapeHtml(item.arguments ?? "")}</code></pre>`;
    },
  },
  function_call_output: {
    make: () => document.createElement("div"),
    update: (element, item) => {
      element.innerHTML = `<div class="label">Tool result</div><pre><code>${escapeHtml(String(item.output ?? ""))}</code></pre>`;
    },
  },
};
