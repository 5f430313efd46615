"""Fuzzing the room socket: thousands of hostile frames through the real ASGI stack.

One authenticated socket takes every generated frame. After each frame the test sends a sentinel
ping; the server handles a socket's frames in order, so whatever arrives before the sentinel's pong
is the answer to the fuzzed frame. Two exceptions: broadcasts (message, deleted, typing,
presence...) may arrive at any time and are set aside, and accepted messages are pipelined, so
their acks may come later: they are matched by client_id and must all arrive by the end of each
example.

Hypothesis drives a synchronous @given function; every example runs on one event loop kept
running for the whole test, so the socket, the hub and the runtime live across examples as in a
real process. (An async @given test would put the "after the run" assertions in fixture
teardown; async_to_sync would start a new event loop, hence a new runtime and a dead socket, for
every example.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings as django_settings
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from chat.consumers import RoomConsumer
from chat.protocol import CLOSE_INTERNAL, CLOSE_TOO_BIG
from chat.runtime import shutdown_runtime
from tests.factories import make_room, make_ticket, make_user
from tests.ws import communicator, receive_until

pytestmark = pytest.mark.django_db(transaction=True)

FRAMES_PER_EXAMPLE = 20
EXAMPLES = 100  # FRAMES_PER_EXAMPLE * EXAMPLES >= 2,000 frames
ROOM = "fuzz"

# The error codes docs/protocol.md documents.
ERROR_CODES = {
    "invalid_frame",
    "unknown_type",
    "too_long",
    "forbidden",
    "not_found",
    "muted",
    "rate_limited",
    "unavailable",
}
# Broadcasts: not answers to a frame, they may come at any time.
EVENT_TYPES = {"message", "deleted", "restored", "typing", "presence", "membership"}
# Frames that are answered by a broadcast to others (typing) or to everyone (delete) on success.
SILENT_ON_SUCCESS = {"typing", "delete"}
SENTINEL = json.dumps({"type": "ping"})
REGRESSION_SURROGATE_CLIENT_ID = '{"type":"message","client_id":"\\ud800","body":""}'

# --- strategies --------------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """one_of with weights: aim at the protocol, keep costly big frames (a reconnect each) rare."""
    # Sampling indices, not the strategies: the strategy's repr (which Hypothesis builds) stays
    # small instead of repeating every choice, big literals included, once per unit of weight.
    indices = [i for i, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(indices).flatmap(lambda i: choices[i][1])


FRAME_TYPES = ["message", "history", "resync", "delete", "typing", "ping"]
VALID_CLIENT_ID = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")

numbers = st.sampled_from(
    [10**400, -(10**400), -1, 0, 1, 2, 50, 100, 101, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63)]
) | st.floats(allow_nan=True, allow_infinity=True)
awkward_text = weighted(
    (2, st.text(max_size=40)),
    # Control characters, lone surrogates, format characters (bidi overrides), line separators.
    (2, st.text(st.characters(categories=["Cc", "Cs", "Cf", "Zl", "Zp"]), min_size=1, max_size=8)),
    (1, st.sampled_from(["", " ", "\ud800", "a\udfffb", "\x00", "\x1b[31m", "\u202e", "\r\n"])),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | awkward_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(awkward_text, inner, max_size=3),
    max_leaves=8,
)
field_values = {
    "body": weighted((2, st.text(min_size=1, max_size=60)), (2, awkward_text), (1, json_values)),
    "client_id": weighted((1, VALID_CLIENT_ID), (2, awkward_text), (1, json_values)),
    "before": numbers | json_values,
    "after": numbers | json_values,
    "limit": numbers | json_values,
    "seq": st.integers(0, 5) | numbers | json_values,
    "from": st.integers(0, 5) | numbers | json_values,
    "to": st.integers(0, 1010) | numbers | json_values,
    "deleted": st.lists(st.integers(0, 6), max_size=4) | json_values,
    "ticket": awkward_text,
}
# Frames of the protocol's own types with fuzzed fields, and frames whose type is wrong.
typed_frames = st.fixed_dictionaries({"type": st.sampled_from(FRAME_TYPES)}, optional=field_values)
mistyped_frames = st.fixed_dictionaries(
    {"type": st.sampled_from(["auth", "hello", "pong", "Ping", "ping "]) | json_values},
    optional=field_values,
)
valid_messages = st.fixed_dictionaries(
    {
        "type": st.just("message"),
        "body": st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=80),
        "client_id": VALID_CLIENT_ID,
    }
)
serialized = st.builds(
    lambda value, ensure_ascii: json.dumps(value, ensure_ascii=ensure_ascii),
    weighted((5, typed_frames), (2, mistyped_frames), (2, valid_messages), (1, json_values)),
    st.booleans(),
)
# Cut or corrupt valid JSON: malformed frames that look almost right.
malformed = st.builds(
    lambda text, cut: text[: len(text) - cut] if cut else text + "}", serialized, st.integers(0, 5)
)
nasty_literals = st.sampled_from(
    [
        "",
        " ",
        "null",
        "[]",
        "{}",
        '{"type":null}',
        "NaN",
        "-Infinity",
        '{"type":"ping"',
        '{"type":"ping"}}',
        '{"type":"ping","type":"message"}',
        '{"type":"\ud800"}',  # a raw lone surrogate, not an escape
        '{"type":"message","client_id":"\\ud800","body":""}',  # an escaped one
        '{"type":"history","limit":1e400}',
    ]
) | st.sampled_from(["long number", "long seq"]).map(
    # Built when drawn, so that the strategy's repr does not carry them.
    lambda kind: (
        "1" * 5000  # more digits than Python will parse
        if kind == "long number"
        else '{"type":"history","after":' + "9" * 5000 + "}"
    )
)
# Depths far from the parser's recursion limit, so the test and the server agree on the outcome.
deep_nesting = st.builds(
    lambda depth, kind: {
        "list": "[" * depth + "]" * depth,
        "object": '{"a":' * depth + "1" + "}" * depth,
        "inside": '{"type":"ping","x":' + "[" * depth + "]" * depth + "}",
    }[kind],
    st.sampled_from([10, 200, 5000, 10_000, 40_000]),
    st.sampled_from(["list", "object", "inside"]),
)


def _message(body_length: int, char: str) -> str:
    frame = {"type": "message", "client_id": "big", "body": char * body_length}
    return json.dumps(frame, ensure_ascii=False)


_EMPTY_MESSAGE = len(_message(0, "a"))
_FRAME_LIMIT = django_settings.CHAT_MAX_FRAME_BYTES
_LENGTH_LIMIT = django_settings.CHAT_MAX_MESSAGE_LENGTH
# Bodies around the length limit, frames around the size limit (in characters: with "é" or "💬",
# within it in characters and over it in bytes), and one long JSON string.
near_limits = (
    st.builds(_message, st.integers(_LENGTH_LIMIT - 2, _LENGTH_LIMIT + 2), st.sampled_from("aé💬"))
    | st.builds(
        _message,
        st.integers(_FRAME_LIMIT - _EMPTY_MESSAGE - 3, _FRAME_LIMIT - _EMPTY_MESSAGE + 3),
        st.sampled_from("aé💬"),
    )
    | st.integers(_FRAME_LIMIT - 4, _FRAME_LIMIT + 2).map(lambda n: json.dumps("x" * n))
)
frames = weighted(
    (12, serialized.map(lambda text: ("text", text))),
    (3, malformed.map(lambda text: ("text", text))),
    (1, nasty_literals.map(lambda text: ("text", text))),
    (1, deep_nesting.map(lambda text: ("text", text))),
    (1, near_limits.map(lambda text: ("text", text))),
    (1, st.text(max_size=80).map(lambda text: ("text", text))),
    (1, st.binary(max_size=64).map(lambda data: ("bytes", data))),
)

# --- the socket under fuzz ---------------------------------------------------------------------


def _utf8_size(text: str) -> int:
    """A text frame's size on the wire, which CHAT_MAX_FRAME_BYTES limits (lone surrogates, which
    no client can send but the ASGI event can carry, as the server counts them)."""
    return len(text.encode("utf-8", "surrogatepass"))


def _frame_type(text: str) -> str | None:
    """The type the server will read from a frame, if it is a JSON object with a string type."""
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        return None
    kind = frame.get("type") if isinstance(frame, dict) else None
    return kind if isinstance(kind, str) else None


def check_answer(frame: dict, sent: object) -> None:
    """An answer is one of the documented frames, with documented fields."""
    kind = frame["type"]
    if kind == "error":
        assert frame["code"] in ERROR_CODES, (frame, sent)
        assert isinstance(frame["detail"], str), (frame, sent)
        assert set(frame) <= {"type", "code", "detail", "client_id"}, (frame, sent)
    elif kind == "ack":
        assert isinstance(frame["client_id"], str), (frame, sent)
        assert type(frame["seq"]) is int, (frame, sent)
    elif kind == "history":
        assert isinstance(frame["messages"], list), (frame, sent)
        assert type(frame["has_more"]) is bool, (frame, sent)
    elif kind == "resync":
        assert set(frame) == {"type", "from", "to", "deleted", "restored"}, (frame, sent)
        assert 1 <= frame["from"] <= frame["to"], (frame, sent)
        assert all(type(seq) is int for seq in frame["deleted"]), (frame, sent)
        assert isinstance(frame["restored"], list), (frame, sent)
    else:
        assert kind == "pong", (frame, sent)


def _is_deferred(frame: dict) -> bool:
    """The writer's answers to accepted messages: they may come after later frames' answers."""
    if frame["type"] == "error":
        return frame["code"] == "unavailable" and "client_id" in frame
    return frame["type"] == "ack"


class FuzzSocket:
    """One authenticated socket, reopened with a fresh ticket after a documented close."""

    def __init__(self, user, room) -> None:
        self.user, self.room = user, room
        self.comm = None
        self.frames = self.reconnects = 0
        self.dirty = False
        # client_ids of accepted messages whose ack (or "unavailable") has not arrived yet.
        self.unacked: Counter[str] = Counter()

    async def open(self) -> None:
        if self.comm is not None:
            await self.comm.disconnect()
        ticket = await database_sync_to_async(make_ticket)(self.user, self.room)
        self.comm = communicator(f"/ws/rooms/{ROOM}/", ticket=ticket)
        connected, _ = await self.comm.connect()
        assert connected
        await receive_until(self.comm, "hello")
        self.dirty = False
        self.unacked.clear()

    async def exchange_all(self, batch: list[tuple[str, str | bytes]]) -> None:
        if self.dirty:  # a failed example left unread output behind
            await self.open()
        self.dirty = True
        for kind, payload in batch:
            await self.exchange(kind, payload)
        await self.settle()
        self.dirty = False

    async def exchange(self, kind: str, payload: str | bytes) -> None:
        self.frames += 1
        sent = payload if kind == "text" else f"<binary {payload!r}>"
        if kind == "text" and _utf8_size(payload) > django_settings.CHAT_MAX_FRAME_BYTES:
            await self.settle()  # acks still owed would be lost with the socket
            await self._send(kind, payload)
            await self._expect_close(CLOSE_TOO_BIG, sent)
            return
        await self._send(kind, payload)
        fuzzed_type = _frame_type(payload) if kind == "text" else None
        answers, deferred = await self._answers_until_sentinel(sent, fuzzed_type == "ping")
        if fuzzed_type == "message" and not answers:
            # Accepted: its ack comes from the writer, now or after later frames.
            self.unacked[json.loads(payload)["client_id"]] += 1
        self._match_deferred(deferred, sent)
        silent = fuzzed_type in SILENT_ON_SUCCESS or fuzzed_type == "message"
        assert len(answers) in ({0, 1} if silent else {1}), (answers, sent)
        assert not self.comm.future.done(), sent

    async def settle(self, timeout: float = 5.0) -> None:
        """Every accepted message gets its ack."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.unacked and asyncio.get_running_loop().time() < deadline:
            answers, deferred = await self._answers_until_sentinel("<settle>", False)
            assert answers == [], answers
            self._match_deferred(deferred, "<settle>")
            if self.unacked:
                await asyncio.sleep(0.01)
        assert not self.unacked, f"accepted messages never acked: {self.unacked}"

    async def _send(self, kind: str, payload: str | bytes) -> None:
        # The raw ASGI event: the communicator's send_to refuses empty frames, which are legal.
        await self.comm.send_input({"type": "websocket.receive", kind: payload})

    async def _answers_until_sentinel(self, sent: object, fuzzed_ping: bool):
        await self.comm.send_to(text_data=SENTINEL)
        # The sentinel's pong ends the answers; a fuzzed ping is answered by a pong of its own.
        pongs = 2 if fuzzed_ping else 1
        answers, deferred = [], []
        while True:
            output = await self.comm.receive_output(timeout=5)
            assert output["type"] == "websocket.send", (output, sent)
            text = output["text"]
            # Daphne encodes every text frame as UTF-8: a lone surrogate here kills the send.
            text.encode("utf-8")
            frame = json.loads(text)
            if frame["type"] in EVENT_TYPES:
                continue
            check_answer(frame, sent)
            if frame["type"] == "pong":
                pongs -= 1
                if not pongs:
                    return answers, deferred
            (deferred if _is_deferred(frame) else answers).append(frame)

    def _match_deferred(self, deferred: list[dict], sent: object) -> None:
        for frame in deferred:
            assert self.unacked[frame["client_id"]] > 0, ("answer to no message", frame, sent)
            self.unacked[frame["client_id"]] -= 1
        self.unacked = +self.unacked

    async def _expect_close(self, code: int, sent: object) -> None:
        while True:
            output = await self.comm.receive_output(timeout=5)
            if output["type"] == "websocket.close":
                break
            assert json.loads(output["text"])["type"] in EVENT_TYPES, (output, sent)
        assert output["code"] != CLOSE_INTERNAL, sent
        assert output["code"] == code, (output, sent)
        self.reconnects += 1
        await self.open()


async def socket_still_served(user, room) -> None:
    ticket = await database_sync_to_async(make_ticket)(user, room)
    comm = communicator(f"/ws/rooms/{ROOM}/", ticket=ticket)
    connected, _ = await comm.connect()
    assert connected
    assert (await receive_until(comm, "hello"))["user"] == user.username
    await comm.send_json_to({"type": "message", "client_id": "after-fuzz", "body": "still here"})
    assert (await receive_until(comm, "ack"))["client_id"] == "after-fuzz"
    await comm.send_json_to({"type": "ping"})
    await receive_until(comm, "pong")
    await comm.disconnect()


class BackgroundLoop:
    """One event loop for the whole test, running in its own thread between calls as a server's
    does. (asyncio.Runner pauses the loop between calls; resumed, it fires every timer that fell
    due meanwhile, such as Redis read timeouts, which a server never sees.)"""

    def __enter__(self) -> BackgroundLoop:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop")
        self.thread.start()
        return self

    def run(self, coroutine, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def __exit__(self, *exc_info) -> None:
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def fuzz_limits(settings):
    """Abuse control and rate limits out of the way: every frame must meet the frame handling."""
    settings.CHAT_ABUSE_LIMIT = 10**9
    settings.CHAT_MESSAGE_RATE = 1e6
    settings.CHAT_MESSAGE_BURST = 10**6
    settings.CHAT_READ_RATE = 1e6
    settings.CHAT_READ_BURST = 10**6
    settings.CHAT_TYPING_INTERVAL = 0.001  # Redis refuses an expiry of 0 ms
    settings.CHAT_CONNECT_RATE_PER_IP = 10**6


# Not the strategies: the server's loop runs in another thread while Hypothesis draws, and
# channels_redis's serializer takes random bits for each message it sends (random_prefix_length).
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
def test_fuzzed_frames_get_documented_answers_and_server_stays_healthy(fuzz_limits, caplog):
    user = make_user("fuzzer")
    room = make_room(ROOM)
    caplog.set_level(logging.ERROR)
    with BackgroundLoop() as loop:
        sock = FuzzSocket(user, room)
        loop.run(sock.open())

        @hypothesis_settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(frames, min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE + 10))
        # Found by this test: an error frame echoed this client_id, and daphne could not encode it.
        @example([("text", REGRESSION_SURROGATE_CLIENT_ID)])
        def fuzz(batch):
            loop.run(sock.exchange_all(batch))

        try:
            fuzz()
            assert sock.frames >= 2000
            loop.run(sock.comm.disconnect())
            # The process is still healthy: a new socket with a new ticket gets hello and answers.
            loop.run(socket_still_served(user, room))
        finally:
            # Bounded: a hub that swallows its cancellation would hang here for ever.
            loop.run(shutdown_runtime(), timeout=15)
            loop.run(get_channel_layer().flush())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_socket_killed_by_an_exception_releases_its_slot(settings, monkeypatch):
    settings.CHAT_MAX_SOCKETS_PER_USER = 1
    user = await database_sync_to_async(make_user)("crasher")
    room = await database_sync_to_async(make_room)(ROOM)

    async def crash(consumer, frame):
        raise RuntimeError("a bug in a frame handler")

    monkeypatch.setitem(RoomConsumer._handlers, "ping", crash)
    ticket = await database_sync_to_async(make_ticket)(user, room)
    dying = communicator(f"/ws/rooms/{ROOM}/", ticket=ticket)
    assert (await dying.connect())[0]
    await receive_until(dying, "hello")
    await dying.send_json_to({"type": "ping"})
    with pytest.raises(RuntimeError, match="a bug in a frame handler"):
        await dying.receive_output()

    ticket = await database_sync_to_async(make_ticket)(user, room)
    comm = communicator(f"/ws/rooms/{ROOM}/", ticket=ticket)
    assert (await comm.connect())[0]
    # The dead socket's slot was released: no 4429 (too many sockets).
    assert (await receive_until(comm, "hello"))["user"] == "crasher"
    await comm.disconnect()


@pytest.mark.skipif(not django_settings.REDIS_URL, reason="the in-memory layer has no read timeout")
async def test_idle_socket_stays_open_on_redis():
    user = await database_sync_to_async(make_user)("idler")
    room = await database_sync_to_async(make_room)(ROOM)
    ticket = await database_sync_to_async(make_ticket)(user, room)
    comm = communicator(f"/ws/rooms/{ROOM}/", ticket=ticket)
    assert (await comm.connect())[0]
    await receive_until(comm, "hello")
    # Two of channels_redis' 5-second blocking reads with no traffic at all.
    assert await comm.receive_nothing(timeout=11), await comm.receive_output()
    await comm.disconnect()
