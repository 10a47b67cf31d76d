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
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data) yield JSON.parse(data);
      }
    }
  }

  async fetch(method, path, body, signal) {
    for (let message = "";;) {
      const headers = body === undefined ? {} : { "Content-Type": "application/json" };
      if (this.key) headers.Authorization = `Bearer ${this.key}`;
      const response = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
      if (response.ok) return response;
      const error = new ApiError(response.status, await response.json().catch(() => null));
      if (response.status !== 401) throw error;
      message = this.key ? error.message : "";
      this.key = await this.askKey(message);
      localStorage.setItem(KEY_STORE, this.key);
    }
  }
}
