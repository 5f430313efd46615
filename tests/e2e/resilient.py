"""A reconnecting protocol client (docs/protocol.md, section 5) for failure and recovery tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from dataclasses import dataclass, field

import httpx
import websockets

from tests.factories import PASSWORD


@dataclass
class ResilientClient:
    """Keeps the highest seq seen, resumes through history after every reconnect, and re-sends
    every message not yet acked with its original client_id: nothing lost, nothing twice."""

    base_url: str
    ws_base: str
    origin: str
    username: str
    room: str
    messages: dict[int, dict] = field(default_factory=dict)  # seq -> message, each kept once
    duplicates: int = 0
    outbox: dict[str, str] = field(default_factory=dict)  # client_id -> body, until stored
    # docs/protocol.md §5: every message up to resume_seq has arrived; live frames move it only
    # once a catch-up has ended (during one they are newer than the gap being filled).
    resume_seq: int = 0
    caught_up: bool = False
    connects: int = 0
    closes: list[int] = field(default_factory=list)
    _ws: websockets.ClientConnection | None = None
    _task: asyncio.Task | None = None
    _stopped: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def max_seq(self) -> int:
        return max(self.messages, default=0)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopped = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def send(self, body: str) -> str:
        client_id = uuid.uuid4().hex
        self.outbox[client_id] = body
        if self._ws is not None:
            frame = {"type": "message", "body": body, "client_id": client_id}
            # If the socket just closed, it stays in the outbox and goes again after reconnect.
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._ws.send(json.dumps(frame))
        return client_id

    async def wait_until(self, condition, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def wait_for_seq(self, seq: int, timeout: float) -> None:
        await self.wait_until(lambda: len(self.messages) >= seq, timeout)

    async def _run(self) -> None:
        delay = 0.2
        while not self._stopped:
            try:
                await self._session()
                delay = 0.2
            except (OSError, httpx.HTTPError, websockets.WebSocketException, TimeoutError):
                pass
            if self._stopped:
                return
            await asyncio.sleep(delay * (0.5 + random.random()))  # jitter
            delay = min(delay * 2, 2.0)

    async def _session(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as http:
            login = await http.post(
                "/api/auth/token/", json={"username": self.username, "password": PASSWORD}
            )
            login.raise_for_status()
            auth = {"Authorization": f"Bearer {login.json()['access']}"}
            ticket = await http.post("/api/tickets/", json={"room": self.room}, headers=auth)
            ticket.raise_for_status()
            ticket = ticket.json()
        async with websockets.connect(
            self.ws_base + ticket["ws_url"],
            subprotocols=["chat.v1", f"ticket.{ticket['ticket']}"],
            origin=self.origin,
        ) as ws:
            self._ws = ws
            self.connects += 1
            self._changed.set()
            try:
                async for raw in ws:
                    await self._on_frame(ws, json.loads(raw))
            finally:
                self._ws = None
                if ws.close_code is not None:
                    self.closes.append(ws.close_code)

    async def _on_frame(self, ws, frame: dict) -> None:
        kind = frame["type"]
        if kind == "hello":
            self.caught_up = False
            for client_id, body in list(self.outbox.items()):
                await ws.send(json.dumps({"type": "message", "body": body, "client_id": client_id}))
            if self.resume_seq < frame["last_seq"]:
                await self._ask_after(ws)
            else:
                self._catch_up_done()
        elif kind == "ack":
            self.outbox.pop(frame["client_id"], None)
        elif kind == "message":
            self._keep(frame)
            if self.caught_up:
                self.resume_seq = max(self.resume_seq, frame["seq"])
        elif kind == "history":
            for message in frame["messages"]:
                self._keep(message)
                self.resume_seq = max(self.resume_seq, message["seq"])
            if frame["has_more"]:
                await self._ask_after(ws)
            else:
                self._catch_up_done()

    async def _ask_after(self, ws) -> None:
        await ws.send(json.dumps({"type": "history", "after": self.resume_seq, "limit": 100}))

    def _catch_up_done(self) -> None:
        self.caught_up = True
        self.resume_seq = max(self.resume_seq, self.max_seq)

    def _keep(self, message: dict) -> None:
        # Our own message in the stream is stored: its ack may have gone down with a socket.
        if message.get("author") == self.username:
            self.outbox.pop(message.get("client_id"), None)
        if message["seq"] in self.messages:
            self.duplicates += 1
        else:
            self.messages[message["seq"]] = message
            self._changed.set()
