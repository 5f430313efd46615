"""Driving the real ASGI application's WebSocket side in tests."""

import json
from urllib.parse import quote

from channels.testing import WebsocketCommunicator

from chatproject.asgi import application
from tests.conftest import ORIGIN, WAIT


class Communicator(WebsocketCommunicator):
    """channels' communicator, waiting up to WAIT where channels waits 1 s."""

    async def connect(self, timeout: float = WAIT):
        return await super().connect(timeout)

    async def receive_from(self, timeout: float = WAIT):
        return await super().receive_from(timeout)

    async def receive_json_from(self, timeout: float = WAIT):
        return await super().receive_json_from(timeout)

    async def receive_output(self, timeout: float = WAIT):
        return await super().receive_output(timeout)

    async def disconnect(self, code: int = 1000, timeout: float = WAIT):
        return await super().disconnect(code, timeout)


def communicator(
    path: str,
    *,
    ticket: str | None = None,
    transport: str = "subprotocol",
    origin: str | None = ORIGIN,
    ip: str = "127.0.0.1",
    headers: list[tuple[bytes, bytes]] | None = None,
    subprotocols: list[str] | None = None,
) -> Communicator:
    """A communicator for `path`; the ticket goes in the subprotocol, the query, or nowhere."""
    header_list = list(headers or [])
    if origin is not None:
        header_list.append((b"origin", origin.encode()))
    protocols = list(subprotocols) if subprotocols is not None else ["chat.v1"]
    if ticket is not None and transport == "subprotocol":
        protocols.append(f"ticket.{ticket}")
    if ticket is not None and transport == "query":
        path = f"{path}?ticket={quote(ticket)}"
    comm = Communicator(application, path, headers=header_list, subprotocols=protocols)
    comm.scope["client"] = [ip, 50000]
    return comm


async def receive_until(comm: Communicator, frame_type: str, timeout: float = WAIT) -> dict:
    """Frames are skipped until one of `frame_type` arrives (presence, typing... come and go)."""
    while True:
        frame = json.loads(await comm.receive_from(timeout=timeout))
        if frame["type"] == frame_type:
            return frame


async def closed_with(comm: Communicator, timeout: float = WAIT) -> tuple[int, str]:
    """Wait for the server to close; returns (code, reason). Frames before the close are skipped."""
    while True:
        message = await comm.receive_output(timeout)
        if message["type"] == "websocket.close":
            return message.get("code", 1000), message.get("reason", "")
