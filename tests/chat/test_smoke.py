import pytest

from tests.factories import make_room, make_ticket, make_user
from tests.ws import communicator, receive_until

pytestmark = pytest.mark.django_db(transaction=True)


async def test_hello_after_valid_ticket():
    from channels.db import database_sync_to_async

    @database_sync_to_async
    def setup():
        user = make_user("alice")
        room = make_room("lobby")
        return make_ticket(user, room)

    ticket = await setup()
    comm = communicator("/ws/rooms/lobby/", ticket=ticket)
    connected, subprotocol = await comm.connect()
    assert connected
    assert subprotocol == "chat.v1"
    hello = await receive_until(comm, "hello")
    assert hello["room"] == "lobby"
    assert hello["user"] == "alice"
    await comm.disconnect()
