"""The per-process hub: one channel-layer channel per process, fan-out to local sockets in memory.

Plain Channels gives every socket its own channel and group membership, so a broadcast to a room of
N members costs N channel-layer deliveries, N consumer dispatches (each with a thread hop) and N
JSON encodings. Here a process joins each room group once, receives each event once, and writes
the frame text, serialized once by the publisher, to each of its sockets directly.

Message frames are numbered (seq). The hub delivers them to a room's sockets in order and without
gaps: a late or missing number is awaited briefly, then read from the database, and the heartbeat
reads its rooms' last seq for a last message whose publication never came. A socket therefore
sees every message after the `last_seq` of its hello exactly once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from channels.layers import get_channel_layer
from django.conf import settings

from chat import audit, broadcast, frames, metrics, selectors
from chat.protocol import CLOSE_FORBIDDEN, CLOSE_TRY_AGAIN, CLOSE_UNAUTHORIZED
from chat.runtime import cancel_and_wait
from chat.services import ROOM_CLOSES, SOCKET_PRIVILEGES, USER_CLOSE_REASONS
from chatproject.dbthread import database_sync_to_async

if TYPE_CHECKING:
    from chat.runtime import Runtime

logger = logging.getLogger("chat.hub")

# How long an out-of-order message waits for the ones before it before they are read from the DB.
GAP_WAIT = 0.2
# Versions remembered per room and kind (a message's deletions and restorations, a user's joins
# and leaves) to drop an event that arrives after a later one about the same thing (_newer). Two
# such events arrive out of order only within moments of each other; a room would need this many
# other messages changed (or users come and gone) in between for a late one to be missed.
VERSIONS_KEPT = 1024

# Audited changes read a heartbeat at most (_catch_up_changes); more wait for the next one.
CHANGES_PER_HEARTBEAT = 500
# The audited changes published to a room (chat.services): of a member, and of the room. A
# socket that missed one is closed as its live event would have closed it (services.ROOM_CLOSES).
# One that only alters what the socket shows (a mute, a role, a member added, the room's title or
# visibility) closes it 4401 too: the client reconnects and its new hello has the state, which is
# simpler than replaying the change, and only happens when an event was lost.
MEMBERSHIP_CHANGES = frozenset(
    {
        audit.Event.MEMBER_ADDED,
        audit.Event.ROLE_CHANGED,
        audit.Event.MEMBER_MUTED,
        audit.Event.MEMBER_UNMUTED,
        audit.Event.MEMBER_BANNED,
        audit.Event.MEMBER_REMOVED,
    }
)
ROOM_CHANGES = frozenset({audit.Event.ROOM_UPDATED, audit.Event.ROOM_ARCHIVED})
STATE_CHANGED = (CLOSE_UNAUTHORIZED, "state changed")

T = TypeVar("T")


class Socket(Protocol):
    socket_id: str
    sent: int
    closing: bool
    # Writes a frame prepared once for many sockets (the flag: more frames follow in this turn
    # of the loop, send them together); None where the server offers no such path.
    fast_send: Callable[[Any, bool], bool] | None
    room_id: int
    user_id: int
    username: str
    credential: str
    opened_at: float
    ready: bool
    presence_version: int  # of the room's list of users its hello gave (chat.state)
    # Audit chain positions (chat.consumers): of the state read as it joined (None until read),
    # and of its membership and room state, moved on by each change event it takes.
    state_version: int | None
    membership_version: int
    room_version: int
    room: Any  # its chat.models.Room, loaded before ready()

    async def send_text(self, text: str) -> None: ...
    async def on_control(self, event: dict[str, Any]) -> None: ...


@dataclass(eq=False)
class RoomFeed:
    room_id: int
    sockets: dict[str, Socket] = field(default_factory=dict)
    delivered: int = -1  # -1 until the room's last_seq has been read after subscribing
    started: asyncio.Event = field(default_factory=asyncio.Event)
    early: list[dict[str, Any]] = field(default_factory=list)  # events before `started`
    pending: dict[int, str] = field(default_factory=dict)  # out-of-order frames by seq
    # Frames about a message not delivered yet (deleted, restored), by its seq, in arrival order.
    after: dict[int, list[str]] = field(default_factory=dict)
    # The version of the last deletion or restoration taken per message seq (_newer). One at or
    # before changes_floor, the audit chain's position when the feed started, is dropped too:
    # its sockets read after it.
    changes_seen: dict[int, int] = field(default_factory=dict)
    changes_floor: int = 0
    gap_timer: asyncio.TimerHandle | None = None
    filling: bool = False
    stored: int = 0  # the room's last_seq as the heartbeat last read it (Hub._catch_up)
    presence_seen: dict[str, int] = field(default_factory=dict)  # last version per username
    slug: str = ""  # the room's, once a socket is ready: for the departures a sweep announces


def _newer(seen: dict[Any, int], key: Any, version: int, *, floor: int = 0) -> bool:
    """Whether an event about `key` at `version` is newer than the last one taken (and above
    `floor`); if so, it becomes the last. Events about one thing (a message's deletion and
    restoration, a user's join and leave) made moments apart on two processes can arrive in
    either order, each published after its own commit: sent in arrival order, the older would
    stay on every screen. `seen` keeps its VERSIONS_KEPT most recently taken keys."""
    if version <= max(floor, seen.get(key, 0)):
        return False
    seen.pop(key, None)  # to the end: the oldest entries go first
    seen[key] = version
    if len(seen) > VERSIONS_KEPT:
        del seen[next(iter(seen))]
    return True


def _is_timeout(error: BaseException) -> bool:
    if isinstance(error, TimeoutError):
        return True
    try:
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover  (redis is a dependency)
        return False
    return isinstance(error, RedisTimeoutError)


class Hub:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.layer = get_channel_layer()
        self.channel: str | None = None
        self.rooms: dict[int, RoomFeed] = {}
        self.users: dict[int, set[Socket]] = defaultdict(set)
        # Groups being subscribed to or left (_changing_group): a lock each, and how many tasks
        # hold or await it.
        self._changing: dict[str, asyncio.Lock] = {}
        self._waiting: Counter[str] = Counter()
        self._start_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._receiver: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None
        # The audit chain position up to which lost changes have been looked for
        # (_catch_up_changes); None while no socket here has read its state.
        self._changes_checked: int | None = None

    # --- sockets ---------------------------------------------------------------------------------

    async def attach(self, sock: Socket, read: Callable[[], Awaitable[tuple[T, int, int]]]) -> T:
        """Subscribe this process to the socket's room and user, register the socket, then
        `read()` its state and return it.

        The read comes after the subscriptions, so a change committed after it reaches the socket
        as an event. It returns (state, the room's last_seq, the audit chain's last position);
        for the room's first socket here, that last_seq is where the room's feed starts, and
        every deletion or restoration at or before that position is in what its sockets read,
        so an older change frame still on its way is dropped: one read for all (a thread hop and
        a statement fewer on such a handshake). Until `ready()` the socket gets control events
        (revocation, membership changes), which the consumer holds until it has loaded its
        state, but no frames.
        """
        await self._start()
        try:
            return await self._attach(sock, read)
        except BaseException:
            # Leave nothing behind: the consumer never counts as attached, so never detaches.
            await self.detach(sock)
            raise

    async def _attach(self, sock: Socket, read: Callable[[], Awaitable[tuple[T, int, int]]]) -> T:
        if not self.users.get(sock.user_id):
            await self._join(broadcast.user_group(sock.user_id))
        self.users[sock.user_id].add(sock)
        feed = self.rooms.get(sock.room_id)
        if feed is None:
            feed = self.rooms[sock.room_id] = RoomFeed(sock.room_id)
            feed.sockets[sock.socket_id] = sock
            try:
                await self._join(broadcast.room_group(sock.room_id))
                # Read after subscribing: every message numbered above this will reach us.
                state, feed.delivered, feed.changes_floor = await read()
                self._read_state_at(feed.changes_floor)
            except BaseException:
                # Whoever waits on this feed finds it gone and fails; detach will find no feed.
                feed.started.set()
                await self._end_feed(feed)
                raise
            try:
                # Events that came while we read, in order; no await between the last one and
                # set().
                while feed.early:
                    await self._on_room_event(feed, feed.early.pop(0))
            finally:
                feed.started.set()
            return state
        feed.sockets[sock.socket_id] = sock
        await feed.started.wait()
        if self.rooms.get(sock.room_id) is not feed:
            raise RuntimeError("could not subscribe to the room")
        state, _, audit_seq = await read()
        self._read_state_at(audit_seq)
        return state

    def _read_state_at(self, audit_seq: int) -> None:
        """A socket here read its state at chain position `audit_seq`: the changes to look for
        start there at the latest. The first such read starts them (nothing before it concerns
        a socket here); a read older than the position (two sockets reading at once) takes it
        back, since that socket's state lacks what came after."""
        if self._changes_checked is None or audit_seq < self._changes_checked:
            self._changes_checked = audit_seq

    def ready(self, sock: Socket) -> int:
        """Start frames for the socket; returns the seq after which it receives every message."""
        sock.ready = True
        feed = self.rooms[sock.room_id]
        feed.slug = sock.room.slug
        return feed.delivered

    async def detach(self, sock: Socket) -> None:
        users = self.users.get(sock.user_id)
        if users is not None:
            users.discard(sock)
            if not users:
                del self.users[sock.user_id]
                await self._leave(broadcast.user_group(sock.user_id))
        feed = self.rooms.get(sock.room_id)
        if (
            feed is not None
            and feed.sockets.pop(sock.socket_id, None) is not None
            and not feed.sockets
        ):
            await self._end_feed(feed)

    async def _end_feed(self, feed: RoomFeed) -> None:
        """Forget the room's feed and leave its group (a socket of the room that attaches
        meanwhile starts a new feed, which joins the group once this has left it)."""
        del self.rooms[feed.room_id]
        if feed.gap_timer is not None:
            feed.gap_timer.cancel()
        await self._leave(broadcast.room_group(feed.room_id))

    def local_sockets(self) -> list[Socket]:
        return [s for feed in self.rooms.values() for s in feed.sockets.values()]

    async def _close_all(self, code: int, reason: str) -> None:
        for sock in self.local_sockets():
            try:
                await sock.on_control(
                    broadcast.revoke_event(code=code, reason=reason, user_id=sock.user_id)
                )
            except Exception:
                logger.exception("could not close socket %s", sock.socket_id)

    # --- lifecycle -------------------------------------------------------------------------------

    async def _start(self) -> None:
        if self._receiver is not None:
            return
        async with self._start_lock:
            if self._receiver is not None:
                return
            self.channel = await self.layer.new_channel(prefix="chathub")
            loop = asyncio.get_running_loop()
            self._receiver = loop.create_task(self._receive_loop(), name="chat-hub-receive")
            self._heartbeat = loop.create_task(self._heartbeat_loop(), name="chat-hub-heartbeat")

    async def stop(self) -> None:
        tasks = [self._receiver, self._heartbeat, *self._tasks]
        # None of them has cleanup that needs more than a few turns of the loop.
        await cancel_and_wait([t for t in tasks if t is not None], within=10, grace=0.05)
        self._receiver = self._heartbeat = None

    @contextlib.asynccontextmanager
    async def _changing_group(self, group: str):
        """Held while this process subscribes to `group` or leaves it: one change at a time,
        each sent once the one before has been answered. Two at once go on two connections of
        the layer's pool, and a group_discard can land after a group_add answered first: the
        socket that subscribed has read its state, and a ban or revocation published before
        anything subscribes again passes this process by, leaving the socket open on the room."""
        lock = self._changing.setdefault(group, asyncio.Lock())
        self._waiting[group] += 1
        try:
            async with lock:
                yield
        finally:
            self._waiting[group] -= 1
            if not self._waiting[group]:
                del self._waiting[group], self._changing[group]

    async def _join(self, group: str) -> None:
        async with self._changing_group(group):
            await self.layer.group_add(group, self.channel)

    async def _leave(self, group: str) -> None:
        """Unsubscribe from `group`. A socket that attaches meanwhile and wants it subscribes
        again once this has been answered (_changing_group)."""
        async with self._changing_group(group):
            try:
                await self.layer.group_discard(group, self.channel)
            except Exception:
                logger.exception("group_discard %s failed", group)

    async def _receive_loop(self) -> None:
        while True:
            # A cancellation redis-py lost (chat.runtime.cancel_and_wait) is still counted by
            # Task.cancelling(): once a receive returns, the loop ends.
            if asyncio.current_task().cancelling():
                raise asyncio.CancelledError
            try:
                event = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if asyncio.current_task().cancelling():
                    raise
                if _is_timeout(error):
                    # A read that outlived the socket timeout: the layer is slow, not gone.
                    logger.warning("hub receive timed out; retrying")
                    continue
                # Redis restarting, say. Our group memberships may be gone with it, so events
                # could be missed silently: close this process's sockets (1013); clients
                # reconnect with backoff and resume from history, losing nothing.
                logger.exception(
                    "hub lost the channel layer; closing %d sockets", len(self.local_sockets())
                )
                await self._close_all(CLOSE_TRY_AGAIN, "try again later")
                await asyncio.sleep(1.0)
                continue
            try:
                await self._dispatch(event)
            except Exception:
                metrics.ERRORS.labels("hub").inc()
                logger.exception("hub could not handle %s", event.get("type"))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(settings.CHAT_HEARTBEAT)
            try:
                await self.heartbeat()
            except Exception:
                logger.exception("hub heartbeat failed")

    async def heartbeat(self) -> None:
        """Renew leases and group memberships; close sockets past their maximum age; catch up
        with lost messages and close the sockets that missed a change; announce the departures
        of users whose leases lapsed in this process's rooms."""
        sockets = self.local_sockets()
        await self.runtime.state.renew(
            [(s.user_id, s.socket_id, s.room_id, s.username) for s in sockets]
        )
        for room_id in list(self.rooms):
            await self.layer.group_add(broadcast.room_group(room_id), self.channel)
        for user_id in list(self.users):
            await self.layer.group_add(broadcast.user_group(user_id), self.channel)
        oldest = time.monotonic() - settings.CHAT_MAX_CONNECTION_AGE
        for sock in sockets:
            if sock.opened_at < oldest:
                await sock.on_control(
                    broadcast.revoke_event(
                        code=CLOSE_UNAUTHORIZED, reason="session expired", user_id=sock.user_id
                    )
                )
        try:
            await self._catch_up()
        except Exception:
            logger.exception("hub catch-up failed")
        try:
            await self._catch_up_changes()
        except Exception:
            logger.exception("hub catch-up of changes failed")
        # Last, after this process's own leases are renewed (and so never swept by it), and so
        # that a failure here (Redis gone) costs none of the above.
        await self._sweep_presence()

    async def _catch_up(self) -> None:
        """Fill the gaps no later message has shown. A lost publication (dropped by a channel
        over its capacity, a failed publish, a publisher that died after its commit) is found
        when a later seq arrives; a room's last message has none, and in a quiet room its
        sockets would never get it. One read of the rooms' last_seq a heartbeat."""
        feeds = [feed for feed in self.rooms.values() if feed.started.is_set()]
        if not feeds:
            return
        stored = await database_sync_to_async(selectors.rooms_last_seq)(
            [feed.room_id for feed in feeds]
        )
        for feed in feeds:
            feed.stored = max(feed.stored, stored.get(feed.room_id, 0))
            if feed.stored > feed.delivered and not feed.filling and feed.gap_timer is None:
                self._start_fill(feed)

    async def _catch_up_changes(self) -> None:
        """Close the sockets that missed a change of their membership, room or account: its
        event lost (dropped by a channel over its capacity, a failed publish, a publisher that
        died after its commit), a ban or a revocation would leave the socket open on the room.
        Every such change is audited (chat.services), its row's chain position the version its
        event carried; a socket whose state is older missed it. One read of the changes
        concerning this process's rooms and users a heartbeat, from where the last one ended."""
        if not self.users:
            # Nothing to look after: the next socket's read starts afresh (_read_state_at).
            self._changes_checked = None
            return
        checked = self._changes_checked
        if checked is None:
            return
        user_events = set(USER_CLOSE_REASONS)
        if not settings.CHAT_ADMIN_REQUIRE_OTP:  # then a device removed closes nothing
            user_events.discard(audit.Event.SECOND_FACTOR_REMOVED)
        changes, last = await database_sync_to_async(selectors.socket_changes_after)(
            after=checked,
            room_ids=list(self.rooms),
            user_ids=list(self.users),
            room_events=sorted(MEMBERSHIP_CHANGES | ROOM_CHANGES),
            user_events=sorted(user_events),
            limit=CHANGES_PER_HEARTBEAT,
        )
        for change in changes:
            for sock, event in self._missed(change):
                logger.warning(
                    "socket %s missed %s (audit %s); closing it",
                    sock.socket_id,
                    change.event,
                    change.seq,
                )
                await sock.on_control(event)
        # A socket that read its state meanwhile may have taken the position back.
        now = self._changes_checked
        if now == checked:
            self._changes_checked = last
        elif now is not None:
            self._changes_checked = min(last, now)

    def _missed(self, change: selectors.SocketChange) -> list[tuple[Socket, dict[str, Any]]]:
        """The sockets here that have not had `change`, each with the event that closes it."""
        if change.event == audit.Event.PRIVILEGES_CHANGED and not (
            SOCKET_PRIVILEGES & change.details.keys()
        ):
            return []  # a group or a permission: it closed nothing live
        seq = change.seq
        code, reason = ROOM_CLOSES.get(change.event, STATE_CHANGED)
        # As live (chat.consumers): staff powers pass over a ban or a removal.
        spare_staff = code == CLOSE_FORBIDDEN
        if change.event in MEMBERSHIP_CHANGES:
            feed = self.rooms.get(change.room_id)
            sockets = [
                s
                for s in (feed.sockets.values() if feed else ())
                if s.user_id == change.user_id and s.membership_version < seq
            ]
        elif change.event in ROOM_CHANGES:
            feed = self.rooms.get(change.room_id)
            sockets = [s for s in (feed.sockets.values() if feed else ()) if s.room_version < seq]
        else:
            sockets = [
                s
                for s in self.users.get(change.user_id, ())
                if s.state_version is not None and s.state_version < seq
            ]
            if change.event in (audit.Event.LOGOUT, audit.Event.REFRESH_REUSED):
                # Only that login's sockets, as live; a row that does not name it (written
                # before rows did) closes none.
                sockets = [
                    s for s in sockets if change.credential and s.credential == change.credential
                ]
            code, reason = CLOSE_UNAUTHORIZED, USER_CLOSE_REASONS[change.event]
        return [
            (
                sock,
                broadcast.revoke_event(
                    code=code, reason=reason, user_id=sock.user_id, spare_staff=spare_staff
                ),
            )
            for sock in sockets
            if sock.state_version is not None and not sock.closing
        ]

    async def _sweep_presence(self) -> None:
        """Announce the users gone from this process's rooms without a word: their sockets'
        leases lapsed (their process died, or their close never reached Redis), so no close
        announced them. The state takes each such user out of the room's list once, whichever
        process sweeps or joins there first (chat.state), with the version to announce, as a
        close gives. A room whose sockets here are all still joining is left to their joins,
        which sweep it too."""
        slugs = {room_id: feed.slug for room_id, feed in self.rooms.items() if feed.slug}
        for room_id, username, version in await self.runtime.state.sweep(list(slugs)):
            await broadcast.apublish(
                broadcast.room_group(room_id),
                broadcast.departure_event(room_id, slugs[room_id], username, version),
            )

    # --- events ----------------------------------------------------------------------------------

    async def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "hub.revoke" and event.get("room") is None:
            for sock in list(self.users.get(event["user"], ())):
                await sock.on_control(event)
            return
        feed = self.rooms.get(event.get("room"))
        if feed is None:
            return
        if not feed.started.is_set():
            feed.early.append(event)
            return
        await self._on_room_event(feed, event)

    async def _on_room_event(self, feed: RoomFeed, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "hub.messages":
            items = event["items"]
            for seq, text in items:
                # Several messages to each socket in this turn: corked, one send() each.
                await self._on_message(feed, seq, text, cork=len(items) > 1)
            if "ts" in event:
                metrics.DELIVERY_LATENCY.observe(max(0.0, time.time() - event["ts"]))
        elif kind == "hub.frame":
            seq = event.get("seq")
            version = event.get("version")
            # Unversioned (an older publisher's, during an upgrade): taken, as before.
            if version is not None and not _newer(
                feed.changes_seen, seq, version, floor=feed.changes_floor
            ):
                return
            if seq is not None and seq > feed.delivered:
                # The message it is about is late or parked behind a gap: it goes first.
                feed.after.setdefault(seq, []).append(event["text"])
                return
            await self._send_all(feed, event["text"], exclude_user=event.get("exclude_user"))
        elif kind == "hub.presence":
            await self._on_presence(feed, event)
        elif kind in ("hub.membership", "hub.revoke"):
            target = event.get("user")
            for sock in list(feed.sockets.values()):
                if target is None or sock.user_id == target:
                    await sock.on_control(event)
        elif kind == "hub.room":
            for sock in list(feed.sockets.values()):
                await sock.on_control(event)

    async def _on_presence(self, feed: RoomFeed, event: dict[str, Any]) -> None:
        """A join or a leave, to the sockets whose hello's list predates it. Each socket's hello
        lists the room's users at a presence version (chat.state); an announcement made at that
        version or before is already in it, and would undo a later, unannounced change (a user
        who left, then came back to a room where nobody else was). A socket still joining gets
        the event as a control event and decides after its hello."""
        version, excluded = event["version"], event.get("exclude_user")
        # Announcements from different processes can arrive out of order (channels_redis orders
        # a group's messages by each publisher's clock): one older than the last of its user's
        # that came is dropped for every socket.
        if not _newer(feed.presence_seen, event["user"], version):
            return
        behind = []
        for sock in list(feed.sockets.values()):
            if sock.closing or sock.user_id == excluded:
                continue
            if not sock.ready:
                await sock.on_control(event)
            elif sock.presence_version < version:
                behind.append(sock)
        await self._send_all(feed, event["text"], sockets=behind)

    async def _on_message(self, feed: RoomFeed, seq: int, text: str, *, cork: bool = False) -> None:
        if seq <= feed.delivered or seq in feed.pending:
            return
        if seq == feed.delivered + 1 and not feed.filling:
            await self._deliver(feed, seq, text, cork=cork)
            await self._drain_pending(feed)
            return
        feed.pending[seq] = text
        if feed.gap_timer is None and not feed.filling:
            loop = asyncio.get_running_loop()
            feed.gap_timer = loop.call_later(GAP_WAIT, self._start_fill, feed)

    async def _deliver(self, feed: RoomFeed, seq: int, text: str, *, cork: bool) -> None:
        """Message `seq`, the next in order, to the room's sockets; then what was held for it."""
        feed.delivered = seq
        await self._send_all(feed, text, cork=cork)
        if feed.after:
            await self._send_after(feed)

    async def _send_after(self, feed: RoomFeed) -> None:
        for seq in sorted(s for s in feed.after if s <= feed.delivered):
            for text in feed.after.pop(seq):
                await self._send_all(feed, text, cork=True)

    async def _drain_pending(self, feed: RoomFeed) -> None:
        # A gap fill delivers from the database what may also have arrived live meanwhile
        # (parked in pending while it read): those copies are done with. Left in place, they
        # would keep the fill loop running and point its next range below what was delivered.
        for seq in [seq for seq in feed.pending if seq <= feed.delivered]:
            del feed.pending[seq]
        while feed.delivered + 1 in feed.pending:
            seq = feed.delivered + 1
            await self._deliver(feed, seq, feed.pending.pop(seq), cork=True)
        if not feed.pending and feed.gap_timer is not None:
            feed.gap_timer.cancel()
            feed.gap_timer = None

    def _start_fill(self, feed: RoomFeed) -> None:
        feed.gap_timer = None
        behind = feed.pending or feed.stored > feed.delivered
        if not behind or self.rooms.get(feed.room_id) is not feed:
            return
        feed.filling = True
        task = asyncio.get_running_loop().create_task(self._fill(feed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fill(self, feed: RoomFeed) -> None:
        """Read the missing messages from the database and deliver everything in order."""
        try:
            # Up to the first message held for the gap, else to what the room has stored.
            upto = min(feed.pending) - 1 if feed.pending else feed.stored
            missing = await database_sync_to_async(selectors.message_frames_between)(
                feed.room_id, feed.delivered, upto
            )
            for seq, text in missing:
                if seq == feed.delivered + 1:
                    await self._deliver(feed, seq, text, cork=True)
            if feed.delivered < upto:
                # Numbers that never committed cannot exist (seq is gap-free), so this is a
                # message deleted from the database by hand; skip it rather than stall the room.
                logger.warning(
                    "room %s: messages %s..%s missing", feed.room_id, feed.delivered + 1, upto
                )
                feed.delivered = upto
                await self._send_after(feed)
        except Exception:
            logger.exception("gap fill failed in room %s", feed.room_id)
        finally:
            feed.filling = False
        await self._drain_pending(feed)
        if feed.pending and feed.gap_timer is None:
            feed.gap_timer = asyncio.get_running_loop().call_later(GAP_WAIT, self._start_fill, feed)

    async def _send_all(
        self,
        feed: RoomFeed,
        text: str,
        *,
        exclude_user: int | None = None,
        cork: bool = False,
        sockets: list[Socket] | None = None,
    ) -> None:
        """Write one frame to the room's ready sockets (or those of `sockets`): serialized once,
        framed once; with `cork`, sent with the frames that follow it in this turn
        (chatproject/server.py)."""
        prepared = None
        sent = 0
        for sock in list(feed.sockets.values()) if sockets is None else sockets:
            if not sock.ready or sock.closing or sock.user_id == exclude_user:
                continue
            try:
                if sock.fast_send is not None:
                    if prepared is None:
                        prepared = frames.prepared(text)
                    if sock.fast_send(prepared, cork):
                        sock.sent += 1
                        sent += 1
                    continue
                await sock.send_text(text)
                sent += 1
            except Exception:
                logger.debug("send to %s failed", sock.socket_id, exc_info=True)
        metrics.DELIVERIES.inc(sent)
