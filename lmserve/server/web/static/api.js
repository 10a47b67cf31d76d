// The page's only way to the server: JSON calls and the Responses API's event stream, with the
// API key (kept in this browser's localStorage) on every call. A 401 asks for a key through
// `askKey(message)` and tries again with the one given.

const KEY_STORE = "lmserve.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

export class Api {
  constructor(askKey) {
    this.askKey = askKey;
    this.key = localStorage.getItem(KEY_STORE) || "";
  }

  async json(method, path, body) {
    const response = await this.fetch(method, path, body);
    return response.json();
  }

  // The typed events of one streamed response, as objects, until the stream ends.
  async *events(body, signal) {
    const response = await this.fetch("POST", "/v1/responses", { ...body, stream: true }, signal);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (let done = false; !done;) {
        const chunk = await reader.read();
        done = chunk.done;
        buffer = (buffer + (chunk.value ?? "")).replace(/\r\n?/g, "\n");
        const frames = buffer.split("\n\n");
        buffer = done ? "" : frames.pop(); // the last piece may be a frame still arriving
        for (const frame of frames) {
          const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
          if (data) yield JSON.parse(data);
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  async fetch(method, path, body, signal) {
    for (;;) {
      const key = this.key;
      const headers = body === undefined ? {} : { "Content-Type": "application/json" };
      if (key) headers.Authorization = `Bearer ${key}`;
      const response = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
      if (response.ok) return response;
      const error = new ApiError(response.status, await response.json().catch(() => null));
      if (response.status !== 401) throw error;
      if (this.key !== key) continue; // another call was given a new key meanwhile
      this.key = await this.askKey(key ? error.message : "");
      localStorage.setItem(KEY_STORE, this.key);
    }
  }
}
