"""A small protocol client for end-to-end tests: JWT login, tickets, and a socket with helpers."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import WAIT
from tests.factories import PASSWORD


@dataclass
class ChatClient:
    base_url: str
    origin: str
    username: str
    http: httpx.AsyncClient = field(init=False)
    access: str = ""
    refresh: str = ""

    async def __aenter__(self) -> ChatClient:
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=10, verify=False)  # noqa: S501
        response = await self.http.post(
            "/api/auth/token/", json={"username": self.username, "password": PASSWORD}
        )
        response.raise_for_status()
        self.access, self.refresh = response.json()["access"], response.json()["refresh"]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}

    async def ticket(self, room: str) -> dict:
        response = await self.http.post("/api/tickets/", json={"room": room}, headers=self.auth)
        response.raise_for_status()
        return response.json()

    async def connect(self, room: str, ws_base: str) -> Socket:
        ticket = await self.ticket(room)
        ws = await websockets.connect(
            ws_base + ticket["ws_url"],
            subprotocols=["chat.v1", f"ticket.{ticket['ticket']}"],
            origin=self.origin,
            # websockets stops reading the connection while 16 frames wait unread: a test that
            # closes a socket it did not read to the end (its own broadcasts, say) then waited
            # the full close_timeout (10 s) for a close frame queued behind them.
            max_queue=None,
        )
        sock = Socket(ws)
        sock.hello = await sock.expect("hello")
        return sock


@dataclass
class Socket:
    ws: ClientConnection
    hello: dict = field(default_factory=dict)
    seen: list[dict] = field(default_factory=list)

    async def send(self, **frame) -> None:
        await self.ws.send(json.dumps(frame))

    async def expect(self, frame_type: str, timeout: float = WAIT) -> dict:
        """Next frame of this type; others are kept in `seen`."""
        async with asyncio.timeout(timeout):
            while True:
                frame = json.loads(await self.ws.recv())
                self.seen.append(frame)
                if frame["type"] == frame_type:
                    return frame

    async def closed(self, timeout: float = WAIT) -> tuple[int, str]:
        async with asyncio.timeout(timeout):
            try:
                while True:
                    self.seen.append(json.loads(await self.ws.recv()))
            except websockets.ConnectionClosed as closed:
                if closed.rcvd is None:  # the connection ended without a close frame
                    return 1006, ""
                return closed.rcvd.code, closed.rcvd.reason

    async def close(self) -> None:
        await self.ws.close()
