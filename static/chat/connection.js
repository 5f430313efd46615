// The room socket: a fresh ticket per connection, the subprotocol transport, keepalive, and
// reconnection with backoff. What each close code means is in docs/protocol.md §6.

import { api } from "./api.js";

export const BASE_DELAY = 1000;
export const MAX_DELAY = 30000;
// 4429 and ticket 429s: the server asked us to slow down, so wait at least this long.
export const RATE_LIMITED_DELAY = 30000;
// An idle socket is checked with a ping; a socket that answers nothing in time is given up.
const PING_AFTER = 25000;
const ANSWER_TIMEOUT = 10000;
// The backoff starts over only once a connection has stayed open this long: a server that says
// hello and then fails at once must not be retried twice a second forever.
export const STABLE_AFTER = 30000;

// Closes after which reconnecting cannot help: the user is told why and the client stops.
const STOP_ON_CLOSE = {
  1000: "closed",
  4403: "forbidden",
  4404: "gone",
};
// 4403's reason, when the server sends one (`manage.py serve` does; plain daphne drops it).
const FORBIDDEN_REASONS = { removed: "removed", banned: "banned" };
const STOP_ON_TICKET_STATUS = { 401: "signed-out", 403: "forbidden", 404: "gone" };

// Exponential backoff with "equal jitter": half the ceiling plus a random half, so clients that
// lost the same server do not all come back at the same instant. Ceilings: 1, 2, 4 ... 30 s.
export function backoffDelay(attempt, random = Math.random) {
  const ceiling = Math.min(MAX_DELAY, BASE_DELAY * 2 ** attempt);
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

function rateLimitedDelay(retryAfterSeconds = 0, random = Math.random) {
  const floor = Math.max(RATE_LIMITED_DELAY, retryAfterSeconds * 1000);
  return Math.round(floor + (random() * RATE_LIMITED_DELAY) / 2);
}

/**
 * One room's connection. States: "connecting" -> "open" (hello received) -> "waiting" (a
 * reconnection is scheduled at `retryAt`) -> "connecting" ...; or "stopped" with a `reason`
 * ("removed", "banned", "forbidden", "gone", "signed-out", "closed"), after which it never
 * reconnects by itself.
 */
export class RoomConnection {
  #room;
  #onFrame;
  #onState;
  #ws = null;
  #attempt = 0;
  #retryTimer = null;
  #pingTimer = null;
  #deadTimer = null;
  #stableTimer = null;
  #status = { state: "idle" };

  constructor(room, { onFrame, onState }) {
    this.#room = room;
    this.#onFrame = onFrame;
    this.#onState = onState;
    window.addEventListener("online", () => this.retryNow());
  }

  get status() {
    return this.#status;
  }

  get isOpen() {
    return this.#status.state === "open";
  }

  start() {
    this.#connect();
  }

  /** Send a frame if the socket is open (after hello); false if it could not be sent. */
  send(frame) {
    if (!this.isOpen || this.#ws?.readyState !== WebSocket.OPEN) return false;
    this.#ws.send(JSON.stringify(frame));
    return true;
  }

  /** Skip the rest of a backoff wait (the user asked, or the network came back). */
  retryNow() {
    if (this.#status.state !== "waiting" || this.#status.rateLimited) return;
    clearTimeout(this.#retryTimer);
    this.#connect();
  }

  stop(reason) {
    clearTimeout(this.#retryTimer);
    this.#forget(1000);
    this.#setStatus({ state: "stopped", reason });
  }

  async #connect() {
    this.#setStatus({ state: "connecting" });
    let ticket;
    try {
      // Every connection, first or not, needs a new ticket: they are single-use.
      ticket = await api("/api/tickets/", { method: "POST", body: { room: this.#room } });
    } catch (error) {
      this.#ticketRefused(error);
      return;
    }
    if (this.#status.state !== "connecting") return; // stopped while we waited
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}${ticket.ws_url}`, [
      "chat.v1",
      `ticket.${ticket.ticket}`,
    ]);
    this.#ws = ws;
    ws.addEventListener("message", (event) => this.#received(ws, event));
    ws.addEventListener("close", (event) => this.#closed(ws, event));
    this.#expectAnswerWithin(ws, ANSWER_TIMEOUT);
  }

  #ticketRefused(error) {
    if (this.#status.state === "stopped") return;
    const reason = STOP_ON_TICKET_STATUS[error.status];
    if (reason) {
      this.stop(reason);
    } else if (error.status === 429) {
      this.#scheduleRetry(rateLimitedDelay(error.retryAfter ?? 0), true);
    } else {
      this.#scheduleRetry(); // network down or server error
    }
  }

  #received(ws, event) {
    if (ws !== this.#ws || typeof event.data !== "string") return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    this.#keepAlive(ws);
    if (frame.type === "pong") return;
    if (frame.type === "hello") {
      clearTimeout(this.#stableTimer);
      this.#stableTimer = setTimeout(() => {
        if (ws === this.#ws) this.#attempt = 0;
      }, STABLE_AFTER);
      this.#setStatus({ state: "open" });
    }
    this.#onFrame(frame);
  }

  #closed(ws, event) {
    if (ws !== this.#ws) return; // a socket we already gave up on
    this.#forget();
    if (this.#status.state === "stopped") return;
    const reason = STOP_ON_CLOSE[event.code];
    if (event.code === 4403) {
      this.stop(FORBIDDEN_REASONS[event.reason] ?? reason);
    } else if (reason) {
      this.stop(reason);
    } else if (event.code === 4429) {
      this.#scheduleRetry(rateLimitedDelay(), true);
    } else {
      // 1001 restart, 1006 lost, 1011 server error, 4401 ticket or login ended (the next
      // attempt asks for a new ticket; a 401 there stops with "signed-out"), 4408...
      this.#scheduleRetry();
    }
  }

  #scheduleRetry(delay = backoffDelay(this.#attempt), rateLimited = false) {
    this.#attempt += 1;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = setTimeout(() => this.#connect(), delay);
    this.#setStatus({ state: "waiting", retryAt: Date.now() + delay, rateLimited });
  }

  // Any frame proves the socket alive; after PING_AFTER of silence we ask for a pong.
  #keepAlive(ws) {
    clearTimeout(this.#deadTimer);
    clearTimeout(this.#pingTimer);
    this.#pingTimer = setTimeout(() => {
      if (ws !== this.#ws || ws.readyState !== WebSocket.OPEN) return;
      ws.send('{"type":"ping"}');
      this.#expectAnswerWithin(ws, ANSWER_TIMEOUT);
    }, PING_AFTER);
  }

  // A half-open TCP connection can look open for minutes: give up on it and reconnect.
  #expectAnswerWithin(ws, ms) {
    clearTimeout(this.#deadTimer);
    this.#deadTimer = setTimeout(() => {
      if (ws !== this.#ws) return;
      this.#forget(4000);
      this.#scheduleRetry();
    }, ms);
  }

  #forget(code) {
    clearTimeout(this.#pingTimer);
    clearTimeout(this.#deadTimer);
    clearTimeout(this.#stableTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (code && ws && ws.readyState <= WebSocket.OPEN) ws.close(code);
  }

  #setStatus(status) {
    this.#status = status;
    this.#onState(status);
  }
}
