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


def test_serve_appends_the_audit_spool_before_it_listens(server_factory, settings, tmp_path):
    """Rows a server spooled at a shutdown the database was down for (chat/spool.py) are in the
    chain once the next server answers, followed by the event that accounts for them."""
    import uuid

    from django.utils import timezone

    from chat import audit, spool
    from chat.models import ConnectionLog, SecurityEvent

    settings.CHAT_AUDIT_SPOOL_DIR = tmp_path / "audit-spool"  # the server's CHAT_DATA_DIR below
    connection = uuid.uuid4()
    path = spool.save(
        [
            ConnectionLog(id=connection, outcome="accepted", opened_at=timezone.now()),
            audit.ConnectionClose(connection, timezone.now(), 1001, 0, 0),
        ]
    )
    server_factory(CHAT_DATA_DIR=str(tmp_path))
    assert ConnectionLog.objects.get(id=connection).close_code == 1001
    event = SecurityEvent.objects.get(event=audit.Event.AUDIT_SPOOLED)
    assert (event.details["file"], event.details["rows"]) == (path.name, 2)
    assert not path.exists()
    assert audit.verify_chain().ok
