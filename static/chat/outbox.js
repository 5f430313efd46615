// Messages typed but not yet acknowledged. Each keeps the client_id it got when typed, so a message
// re-sent after a reconnect (or a reload: the outbox lives in sessionStorage) is stored only once.

// Errors after which the same frame may succeed later; the others need the user to decide.
const TRANSIENT = new Set(["rate_limited", "unavailable"]);
const TRANSIENT_RETRY_MS = 2000;

// Stay under the server's message rate (5/s, burst 20) when a long outbox is flushed at once:
// refused frames count towards the abuse limit that closes the socket.
const RATE_PER_SECOND = 4;
const BURST = 10;

export function newClientId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Entries are {clientId, body, createdAt, state, error}; state is "queued" (to be sent on the
 * current or next connection), "sent" (sent on the current connection, no ack yet) or "failed"
 * (refused; kept until the user sends it again or discards it).
 */
export class Outbox {
  #key;
  #entries = new Map();
  #send;
  #onChange;
  #tokens = BURST;
  #refilledAt = Date.now();
  #pumpTimer = null;

  /** `send(frame)` returns false when there is no open socket; `onChange(entry)` redraws it. */
  constructor(storageKey, { send, onChange }) {
    this.#key = storageKey;
    this.#send = send;
    this.#onChange = onChange;
    for (const saved of this.#load()) {
      const state = saved.state === "failed" ? "failed" : "queued";
      this.#entries.set(saved.clientId, { ...saved, state });
    }
  }

  get entries() {
    return [...this.#entries.values()];
  }

  get size() {
    return this.#entries.size;
  }

  has(clientId) {
    return this.#entries.has(clientId);
  }

  add(body) {
    const entry = {
      clientId: newClientId(),
      body,
      createdAt: new Date().toISOString(),
      state: "queued",
      error: "",
    };
    this.#entries.set(entry.clientId, entry);
    this.#save();
    this.#onChange(entry);
    return entry;
  }

  /** The server stored it (ack, or our own message came back): it leaves the outbox. */
  resolve(clientId) {
    const entry = this.#entries.get(clientId);
    if (!entry) return null;
    this.#entries.delete(clientId);
    this.#save();
    entry.state = "done";
    this.#onChange(entry);
    return entry;
  }

  refuse(clientId, code, detail) {
    const entry = this.#entries.get(clientId);
    if (!entry) return;
    if (TRANSIENT.has(code)) {
      entry.state = "queued";
      this.#onChange(entry);
      clearTimeout(this.#pumpTimer);
      this.#pumpTimer = setTimeout(() => this.pump(), TRANSIENT_RETRY_MS);
      return;
    }
    entry.state = "failed";
    entry.error = detail;
    this.#save();
    this.#onChange(entry);
  }

  retry(clientId) {
    const entry = this.#entries.get(clientId);
    if (!entry || entry.state !== "failed") return;
    entry.state = "queued";
    entry.error = "";
    this.#save();
    this.#onChange(entry);
  }

  discard(clientId) {
    const entry = this.#entries.get(clientId);
    if (!entry) return;
    this.#entries.delete(clientId);
    this.#save();
    entry.state = "discarded";
    this.#onChange(entry);
  }

  /** A new connection: whatever the last one sent without an ack is sent again. */
  requeue() {
    for (const entry of this.#entries.values()) {
      if (entry.state === "sent") {
        entry.state = "queued";
        this.#onChange(entry);
      }
    }
  }

  /** Send queued entries in the order they were typed, as fast as the rate allows. */
  pump() {
    clearTimeout(this.#pumpTimer);
    for (const entry of this.#entries.values()) {
      if (entry.state !== "queued") continue;
      if (!this.#takeToken()) {
        this.#pumpTimer = setTimeout(() => this.pump(), 1000 / RATE_PER_SECOND);
        return;
      }
      if (!this.#send({ type: "message", body: entry.body, client_id: entry.clientId })) return;
      entry.state = "sent";
      this.#onChange(entry);
    }
  }

  #takeToken() {
    const now = Date.now();
    const earned = ((now - this.#refilledAt) / 1000) * RATE_PER_SECOND;
    this.#tokens = Math.min(BURST, this.#tokens + earned);
    this.#refilledAt = now;
    if (this.#tokens < 1) return false;
    this.#tokens -= 1;
    return true;
  }

  #load() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(this.#key) ?? "[]");
      return Array.isArray(saved) ? saved.filter((e) => e && typeof e.clientId === "string") : [];
    } catch {
      return [];
    }
  }

  #save() {
    try {
      const entries = this.entries.map(({ clientId, body, createdAt, state, error }) => ({
        clientId,
        body,
        createdAt,
        state,
        error,
      }));
      if (entries.length) sessionStorage.setItem(this.#key, JSON.stringify(entries));
      else sessionStorage.removeItem(this.#key);
    } catch {
      // Storage full or disabled: the outbox still works for the life of the page.
    }
  }
}
