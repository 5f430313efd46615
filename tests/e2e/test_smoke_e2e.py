import json

import httpx
import pytest
import websockets
from asgiref.sync import sync_to_async

from tests.factories import PASSWORD, make_room, make_user

pytestmark = pytest.mark.e2e


async def test_login_ticket_connect_and_chat(daphne):
    await sync_to_async(lambda: (make_user("alice"), make_room("lobby")))()
    async with httpx.AsyncClient(base_url=daphne.url) as http:
        tokens = (
            await http.post("/api/auth/token/", json={"username": "alice", "password": PASSWORD})
        ).json()
        auth = {"Authorization": f"Bearer {tokens['access']}"}
        ticket = (await http.post("/api/tickets/", json={"room": "lobby"}, headers=auth)).json()
    async with websockets.connect(
        daphne.ws_url(ticket["ws_url"]),
        subprotocols=["chat.v1", f"ticket.{ticket['ticket']}"],
        origin=daphne.origin,
    ) as ws:
        assert ws.subprotocol == "chat.v1"
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello"
        await ws.send(json.dumps({"type": "message", "body": "hi", "client_id": "c1"}))
        frames = [json.loads(await ws.recv()) for _ in range(2)]
        assert {f["type"] for f in frames} == {"ack", "message"}
