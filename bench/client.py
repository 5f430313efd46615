"""The load client: lean picows sockets, a keep-alive HTTP/1.1 client for tickets, and the books.

Everything runs on one asyncio loop in one process pinned to its own core. Per delivery the
client takes a timestamp, parses one JSON frame and does two dict/set operations, so that it can
follow well over 10,000 deliveries/s; it reports its own CPU so a saturated client is visible.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.servers import Target

_ids = itertools.count()
_loads = json.loads
_now = time.perf_counter_ns


class RefusedError(Exception):
    """The server closed or refused a socket (a close code, or an HTTP error on the ticket)."""


# --- the books ------------------------------------------------------------------------------------


@dataclass(eq=False)
class Room:
    slug: str
    conns: list[Conn] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)  # message id -> client send time (ns)


class Books:
    """Deliveries of the current measurement: latencies, duplicates, unknown ids, acks, errors."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.latencies: list[int] = []
        self.duplicates = 0
        self.unknown = 0
        self.acks = 0
        self.errors: dict[str, int] = {}
        self.out_of_order = 0
        self.other_frames = 0
        self.last_rx = 0
        self.first_tx = 0

    @property
    def deliveries(self) -> int:
        return len(self.latencies)


class Conn(WSListener):
    """One client socket; `on_ws_frame` is the hot path of the whole client."""

    def __init__(self, target: Target, room: Room, books: Books, name: str) -> None:
        self.target, self.room, self.books, self.name = target, room, books, name
        self.chat = target.name == "chat"
        self.transport: WSTransport | None = None
        self.seen: set[str] = set()
        self.inflight: set[str] = set()  # own messages not yet acked (persist scenario)
        self.window: asyncio.Event | None = None
        self.hello: asyncio.Future = asyncio.get_running_loop().create_future()
        self.last_seq = 0
        self.close_code: int | None = None
        self._parts: list[bytes] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if not self.chat and not self.hello.done():
            self.hello.set_result(None)  # the baselines say nothing on connect

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.hello.done():
            self.hello.set_exception(RefusedError(f"closed before hello ({self.close_code})"))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = _now()
        kind = frame.msg_type
        if kind is WSMsgType.CLOSE:
            self.close_code = frame.get_close_code().value
            return
        if kind is not WSMsgType.TEXT and kind is not WSMsgType.CONTINUATION:
            return
        if not frame.fin:
            self._parts.append(frame.get_payload_as_bytes())
            return
        payload = frame.get_payload_as_bytes()
        if self._parts:
            payload = b"".join([*self._parts, payload])
            self._parts.clear()
        books = self.books
        if self.chat:
            if not payload.startswith(b'{"type":"message"'):
                self._chat_other(payload)
                return
            data = _loads(payload)
            mid = data["client_id"]
            seq = data["seq"]
            if seq != self.last_seq + 1:
                books.out_of_order += 1
            self.last_seq = seq
        else:
            mid = _loads(_loads(payload)["message"])["id"]
            if mid in self.inflight:  # a baseline's echo to the sender stands for the ack
                self._acked(mid)
        sent = self.room.sent.get(mid)
        if sent is None:
            books.unknown += 1
            return
        if mid in self.seen:
            books.duplicates += 1
            return
        self.seen.add(mid)
        books.latencies.append(now - sent)
        books.last_rx = now

    def _chat_other(self, payload: bytes) -> None:
        if payload.startswith(b'{"type":"ack"'):
            self._acked(_loads(payload)["client_id"])
        elif payload.startswith(b'{"type":"hello"'):
            hello = _loads(payload)
            self.last_seq = hello["last_seq"]
            if not self.hello.done():
                self.hello.set_result(hello)
        elif payload.startswith(b'{"type":"error"'):
            error = _loads(payload)
            code = error.get("code", "?")
            self.books.errors[code] = self.books.errors.get(code, 0) + 1
            self._acked(error.get("client_id"), stored=False)
        else:
            self.books.other_frames += 1  # presence, typing...

    def _acked(self, mid: str | None, *, stored: bool = True) -> None:
        if mid in self.inflight:
            self.inflight.discard(mid)
            self.books.acks += stored
            if self.window is not None:
                self.window.set()

    # --- sending ----------------------------------------------------------------------------------

    def send_message(self) -> str:
        """Send one message carrying a unique id and the send time; same shape for every target."""
        mid = f"{self.name}-{next(_ids)}"
        sent = _now()
        body = f'{{"id":"{mid}","t":{sent}}}'
        if self.chat:
            frame = json.dumps({"type": "message", "body": body, "client_id": mid})
        else:
            frame = json.dumps({"message": body})
        self.room.sent[mid] = sent
        if not self.books.first_tx:
            self.books.first_tx = sent
        self.transport.send(WSMsgType.TEXT, frame.encode())
        return mid

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            # A normal closure (1000). picows's default sends a code of 0, which RFC 6455 does not
            # allow: every server took each close as a protocol violation (autobahn answers 1002
            # and arms a closing-handshake timer), and the handshakes measured that path.
            self.transport.send_close(WSCloseCode.OK)
            self.transport.disconnect()


# --- HTTP -----------------------------------------------------------------------------------------


class Http:
    """A keep-alive HTTP/1.1 connection; enough of the protocol for JSON POSTs to daphne."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, data: dict, token: str) -> tuple[int, dict]:
        for attempt in range(2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            body = json.dumps(data).encode()
            head = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            self.writer.write(head + body)
            try:
                return await self._response()
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _response(self) -> tuple[int, dict]:
        assert self.reader is not None
        status = int((await self.reader.readuntil(b"\r\n")).split()[1])
        headers = {}
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            raw = await self.reader.readexactly(int(headers["content-length"]))
        else:  # chunked
            chunks = []
            while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            await self.reader.readexactly(2)
            raw = b"".join(chunks)
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, json.loads(raw) if raw else {}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# --- connecting -----------------------------------------------------------------------------------


@dataclass
class Timing:
    ticket_ns: int = 0
    connect_ns: int = 0


@dataclass(frozen=True)
class Ticket:
    """A ticket the chat issued, and the socket path it opens."""

    ws_path: str
    ticket: str

    @classmethod
    def from_answer(cls, answer: dict) -> Ticket:
        """The ticket in a 201 answer of `POST /api/tickets/`."""
        return cls(answer["ws_url"], answer["ticket"])


async def take_ticket(http: Http, slug: str, token: str) -> Ticket:
    status, answer = await http.post_json("/api/tickets/", {"room": slug}, token)
    if status != 201:
        raise RefusedError(f"ticket: HTTP {status} {answer}")
    return Ticket.from_answer(answer)


async def open_conn(
    target: Target,
    room: Room,
    books: Books,
    *,
    port: int,
    token: str | None = None,
    http: Http | None = None,
    name: str = "c",
    timing: Timing | None = None,
    ticket: Ticket | None = None,
) -> Conn:
    """Ticket (chat; taken beforehand if given), WebSocket upgrade with Origin and
    subprotocols, then hello (chat)."""
    origin = f"http://127.0.0.1:{port}"
    headers = {"Origin": origin}
    path = target.ws_path(room.slug)
    started = _now()
    if target.authenticated:
        if ticket is None:
            assert http is not None
            assert token is not None
            ticket = await take_ticket(http, room.slug, token)
        path = ticket.ws_path
        headers["Sec-WebSocket-Protocol"] = f"chat.v1, ticket.{ticket.ticket}"
    ticketed = _now()
    _, conn = await ws_connect(
        lambda: Conn(target, room, books, name),
        f"ws://127.0.0.1:{port}{path}",
        extra_headers=headers,
        websocket_handshake_timeout=30,
    )
    await asyncio.wait_for(conn.hello, 30)
    if timing is not None:
        timing.ticket_ns = ticketed - started
        timing.connect_ns = _now() - ticketed
    return conn


async def open_room(
    target: Target,
    slug: str,
    members: list[dict] | int,
    books: Books,
    *,
    ports: list[int],
    concurrency: int = 16,
) -> Room:
    """Connect every member of a room (member dicts with tokens for chat, a count otherwise)."""
    room = Room(slug)
    count = len(members) if isinstance(members, list) else members
    conns: list[Conn | None] = [None] * count
    queue = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker() -> None:
        http_by_port = {port: Http(port) for port in ports}
        try:
            while not queue.empty():
                i = queue.get_nowait()
                port = ports[i % len(ports)]
                token = members[i]["token"] if isinstance(members, list) else None
                conns[i] = await open_conn(
                    target,
                    room,
                    books,
                    port=port,
                    token=token,
                    http=http_by_port[port],
                    name=f"{slug}-{i}",
                )
        finally:
            for http in http_by_port.values():
                http.close()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    room.conns = [c for c in conns if c is not None]
    return room


async def settle(books: Books, *, quiet: float = 0.5, limit: float = 120.0) -> None:
    """Wait until the server has gone quiet (presence announcements after a room fills up)."""
    deadline = time.monotonic() + limit
    last = (books.other_frames, books.deliveries)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = (books.other_frames, books.deliveries)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet:
            return
