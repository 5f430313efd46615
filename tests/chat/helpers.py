"""Socket-test helpers: connect users to rooms through the real ASGI application."""

import json
import time
from types import SimpleNamespace

from channels.db import database_sync_to_async
from django.conf import settings

from chat import broadcast
from chat import state as state_module
from tests.factories import make_ticket
from tests.ws import WAIT, Communicator, communicator, receive_until


async def join(user, room, *, credential: str = "test", **kwargs) -> tuple[Communicator, dict]:
    """Open an authenticated socket for `user` in `room` (with a ticket of the login
    `credential`) and return it with its hello."""
    token = await database_sync_to_async(make_ticket)(user, room, credential=credential)
    comm = communicator(f"/ws/rooms/{room.slug}/", ticket=token, **kwargs)
    connected, _ = await comm.connect()
    assert connected
    return comm, await receive_until(comm, "hello")


async def send(comm: Communicator, **frame) -> None:
    await comm.send_to(text_data=json.dumps(frame))


async def receive_all(comm: Communicator, frame_type: str, count: int) -> list[dict]:
    """The next `count` frames of `frame_type`, others skipped, each waited for up to WAIT.

    For frames a test expects; `drain` after it checks that nothing more came. (A drain alone
    would end at the first quiet moment, which a slow host can have before they all arrive.)
    """
    return [await receive_until(comm, frame_type, WAIT) for _ in range(count)]


async def drain(comm: Communicator, timeout: float = 0.2) -> list[dict]:
    """Every frame that arrives until the socket goes quiet for `timeout` seconds: to check that
    nothing (more) arrives; `receive_all` for frames that must."""
    frames = []
    while not await comm.receive_nothing(timeout=timeout):
        message = await comm.receive_output()
        if message["type"] != "websocket.send":
            frames.append({"type": "__close__", "code": message.get("code")})
            break
        frames.append(json.loads(message["text"]))
    return frames


def sync(fn):
    """Run ORM code from an async test (committed: socket tests use transactional databases)."""
    return database_sync_to_async(fn)


# Later than any lease not renewed since the present moment.
LAPSED = settings.CHAT_PRESENCE_LEASE + 1


def state_clock_ahead(monkeypatch, seconds: float) -> None:
    """Run the shared state's clocks (chat.state: the wall clock Redis's leases are scored by,
    the memory state's monotonic one) `seconds` ahead of now: a lease that nobody renews in the
    meantime lapses as it would have that much later."""
    monkeypatch.setattr(
        state_module,
        "time",
        SimpleNamespace(
            time=lambda: time.time() + seconds, monotonic=lambda: time.monotonic() + seconds
        ),
    )


def drop_publications(monkeypatch, *kinds: str) -> None:
    """Hub events of `kinds` published after a commit never reach the layer, as when a channel
    over its capacity drops them silently or a failed publish only logs."""
    publish = broadcast.publish

    def lossy(group, event):
        if event["type"] not in kinds:
            publish(group, event)

    monkeypatch.setattr(broadcast, "publish", lossy)
