"""The room socket: parse a frame, check the room policy, call one service or selector, answer."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import DatabaseError
from django.utils.dateparse import parse_datetime

from chat import audit, broadcast, frames, metrics, permissions, selectors, services
from chat.models import MAX_SEQ, Membership
from chat.protocol import (
    CLOSE_AUTH_TIMEOUT,
    CLOSE_FORBIDDEN,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_RATE_LIMITED,
    CLOSE_REASONS,
    CLOSE_ROOM_GONE,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    CLOSE_UNAUTHORIZED,
    ERR_INVALID_FRAME,
    ERR_RATE_LIMITED,
    ERR_TOO_LONG,
    ERR_UNAVAILABLE,
    ERR_UNKNOWN_TYPE,
    chosen_subprotocol,
    resync_max_seqs,
)
from chat.runtime import get_runtime
from chat.services import SendItem
from chat.state import StateUnavailable
from chatproject.dbthread import database_sync_to_async

logger = logging.getLogger("chat.consumers")

Reason = audit.Reason

_CLOSE_FOR_REASON = {
    Reason.TOO_MANY_CONNECTIONS: CLOSE_RATE_LIMITED,
    Reason.AUTH_TIMEOUT: CLOSE_AUTH_TIMEOUT,
    Reason.NOT_FOUND: CLOSE_ROOM_GONE,
    Reason.FORBIDDEN: CLOSE_FORBIDDEN,
    Reason.UNAVAILABLE: CLOSE_TRY_AGAIN,
}
# Messages of one socket being stored at once; beyond this the socket stops reading frames.
MAX_IN_FLIGHT = 32


# The longest a `history` or `resync` waits for its turn before it is refused instead.
READ_WAIT_MAX = 1.0


def pace(full_at: float, now: float, rate: float, burst: int) -> tuple[float, float]:
    """How long one more event must wait under `rate` per second after a burst of `burst`, and
    the new `full_at` (GCRA: the time the bucket would be full again if nothing else came)."""
    due = max(full_at, now)
    wait = max(0.0, due - (burst - 1) / rate - now)
    return wait, due + 1 / rate


class FrameError(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


class RoomConsumer(AsyncWebsocketConsumer):
    # The process's hub holds the one channel-layer channel; a socket needs none of its own.
    channel_layer_alias = None

    # A socket's state, in slots: an instance of a class with more attribute names than CPython
    # shares between instances (30) gets a dict of its own, 1.6 KB per idle socket.
    __slots__ = (
        "_abuse",
        "_held",
        "_inflight",
        "_reads_at",
        "attached",
        "base_send",
        "channel_layer",
        "close_code",
        "closing",
        "counted",
        "credential",
        "fast_send",
        "finished",
        "joined",
        "membership",
        "membership_version",
        "opened_at",
        "presence_version",
        "ready",
        "received",
        "record",
        "room",
        "room_id",
        "room_version",
        "runtime",
        "scope",
        "sent",
        "socket_id",
        "state_version",
        "transport",
        "user",
        "user_id",
        "username",
    )

    async def __call__(self, scope, receive, send) -> None:
        self.runtime = get_runtime()
        # Under `manage.py serve`, daphne's send is handle_reply bound to our protocol, which can
        # write a frame prepared once for all of a room's sockets (chatproject/server.py).
        protocol = send.args[0] if isinstance(send, functools.partial) and send.args else None
        self.fast_send = getattr(protocol, "send_prepared", None)
        self.record = audit.ConnectionAudit(scope, room_slug=scope.get("room_slug", ""))
        # Whatever reads the handshake's headers has read them: the origin check, the ticket,
        # the client IP, the record above. The scope, which the frames above this one hold for
        # the socket's life, lets go of them: their memory (docs/performance.md, idle), and the
        # cookies a browser sends with them, which no later log line or error report should see.
        scope.pop("headers", None)
        self.attached = self.ready = self.closing = False
        self.presence_version = 0
        # The chain positions of the membership and room state this socket has (chat.services:
        # each change's audit row): an older change arriving after it is dropped. And of the
        # state it read as it joined, None until then: a change audited later that it has not
        # had (its event lost) closes it at the hub's heartbeat (chat.hub).
        self.membership_version = self.room_version = 0
        self.state_version: int | None = None
        self.close_code: int | None = None
        self.received = self.sent = 0
        self.opened_at = time.monotonic()
        self.socket_id = uuid.uuid4().hex
        self._held: list[dict[str, Any]] = []
        self._inflight: set[asyncio.Future] = set()
        self._abuse: list[float] = []
        self._reads_at = 0.0
        self.scope, self.base_send, self.channel_layer = scope, send, None
        try:
            # AsyncConsumer.__call__ wraps every event in a task and an asyncio.wait() so it can
            # listen to a channel layer too; a socket here listens to the client only.
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        except asyncio.CancelledError:
            # Server shutdown: tell the client to come back, and leave a complete trail.
            if self.close_code is None:
                with contextlib.suppress(Exception):
                    await self._close(CLOSE_GOING_AWAY)
            await self._finish()
            await self.runtime.audit.flush()
            raise
        except Exception:
            # A bug: the server closes the socket with 1011. Still leave the room, the caps and
            # presence, and record the close, or the user's socket slots would leak.
            self.close_code = self.close_code or CLOSE_INTERNAL
            raise
        finally:
            await self._finish()

    async def dispatch(self, message) -> None:
        # Channels runs close_old_connections (a thread hop) before every handler; our database
        # work all goes through database_sync_to_async, which does that itself.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    # --- connect -------------------------------------------------------------------------------

    async def websocket_connect(self, message) -> None:
        scope = self.scope
        self.transport = scope.get("ticket_transport", audit.Transport.NONE)
        if scope.get("auth_error"):
            return await self._reject(scope["auth_error"])
        user, ticket = scope["user"], scope["ticket"]
        self.user, self.user_id, self.username = user, user.pk, user.username
        self.room_id, self.credential = ticket.room_id, ticket.credential
        try:
            await self._join(user, ticket)
        except Exception as error:
            # Redis or the database failed mid-way: the client retries later (1013).
            if not isinstance(error, StateUnavailable):
                metrics.ERRORS.labels("consumer").inc()
                logger.exception("socket could not join its room")
            if not self.closing:
                await self._reject(Reason.UNAVAILABLE)
        return None

    async def _join(self, user, ticket) -> None:
        state = self.runtime.state
        if not await state.socket_open(
            self.user_id, self.socket_id, settings.CHAT_MAX_SOCKETS_PER_USER
        ):
            return await self._reject(Reason.TOO_MANY_CONNECTIONS)
        self.counted = True
        # Subscribe, then read the state: a change committed after the read reaches us as an event.
        context = await self.runtime.hub.attach(self, functools.partial(self._context, ticket.jti))
        self.attached = True
        if context.room is None or context.room.archived_at is not None:
            return await self._reject(Reason.NOT_FOUND)
        if not context.user_active:
            return await self._reject(Reason.USER_INACTIVE)
        if context.ticket_revoked:
            return await self._reject(Reason.TICKET_REVOKED)
        self.room, self.membership = context.room, context.membership
        if not permissions.can_view(user, self.room, self.membership):
            return await self._reject(Reason.FORBIDDEN)
        self.joined = True
        announce, online, self.presence_version, departed = await state.presence_join(
            self.room_id, self.username, self.socket_id
        )
        for username, version in departed:
            # Users whose leases had all lapsed, which this join took out of the room's list
            # (chat.state): announced at once, so that nothing below can lose them. This
            # socket's own hello is past them.
            await self._publish(
                broadcast.departure_event(self.room_id, self.room.slug, username, version)
            )
        await self._accept()
        await self.record.decide(
            self.runtime,
            outcome=audit.Outcome.ACCEPTED,
            user=user,
            room=self.room,
            jti=ticket.jti,
            transport=self.transport,
        )
        later: list[str] = []
        for event in self._held:
            if event["type"] == "hub.presence":
                # A join or leave that hello's list does not show yet follows hello (chat.hub).
                if event["version"] > self.presence_version:
                    later.append(event["text"])
                continue
            # The state they carry is in hello; only their effect (a close) matters here.
            await self._apply_control(event, notify=False)
            if self.closing:
                return None
        self._held.clear()
        last_seq = self.runtime.hub.ready(self)
        await self.send_text(frames.dumps(self._hello(last_seq, online)))
        for text in later:
            await self.send_text(text)
        if announce:
            # The joiner's own hello already lists it; tell everyone else (chat.state: a first
            # socket, and someone there to hear it).
            await self._publish(self._presence(self.presence_version, joined=True))
        return None

    async def _context(self, jti: str) -> tuple[selectors.SocketContext, int, int]:
        """The socket's state, its room's last_seq and the audit chain's (for the hub,
        chat.hub.Hub.attach)."""
        context = await database_sync_to_async(selectors.socket_context)(
            room_id=self.room_id, user_id=self.user_id, jti=jti, credential=self.credential
        )
        # What the read shows includes every change at or before the chain position read with
        # it: such a change's event, come while the socket joined, is not applied again, and the
        # hub's heartbeat, which may look at the socket from now on, does not take it as missed.
        self.state_version = self.membership_version = self.room_version = context.audit_seq
        last_seq = context.room.last_seq if context.room is not None else 0
        return context, last_seq, context.audit_seq

    def _hello(self, last_seq: int, online: list[str]) -> dict[str, Any]:
        room, membership = self.room, self.membership
        return {
            "type": "hello",
            "room": room.slug,
            "title": room.title,
            "visibility": room.visibility,
            "user": self.username,
            "staff": permissions.has_staff_powers(self.user),
            "role": membership.role if membership else None,
            "moderator": permissions.is_moderator(self.user, room, membership),
            "can_post": permissions.can_post(self.user, room, membership),
            "muted_until": frames.iso(membership.muted_until if membership else None),
            "last_seq": last_seq,
            "presence": online,
            "limits": {
                "max_length": settings.CHAT_MAX_MESSAGE_LENGTH,
                "history_limit": settings.CHAT_HISTORY_LIMIT,
                "resync_max_seqs": resync_max_seqs(settings.CHAT_MAX_FRAME_BYTES),
            },
        }

    async def _accept(self) -> None:
        if not self.scope.get("socket_accepted"):
            await self.accept(chosen_subprotocol(self.scope))

    async def _reject(self, reason: str) -> None:
        """Accept and close at once: a close code is the only answer a browser can read."""
        code = _CLOSE_FOR_REASON.get(reason, CLOSE_UNAUTHORIZED)
        user = self.scope.get("user")
        await self.record.decide(
            self.runtime,
            outcome=audit.Outcome.REJECTED,
            reason=reason,
            user=user if getattr(user, "is_authenticated", False) else None,
            room=getattr(self, "room", None),
            jti=self.scope.get("ticket_jti", ""),
            transport=self.transport,
        )
        await self._accept()
        await self._close(code)

    # --- frames --------------------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        self.received += 1
        if not self.ready or self.closing:
            return
        frame: dict[str, Any] = {}
        try:
            if text_data is None:
                raise FrameError(ERR_INVALID_FRAME, "binary frames are not supported")
            # Daphne refuses bigger frames itself (--websocket-max-message-size); this covers any
            # other server. Characters first: each is at most four UTF-8 bytes, so a frame of
            # no more than a quarter of the limit in characters fits without being encoded.
            if 4 * len(text_data) > settings.CHAT_MAX_FRAME_BYTES and (
                len(text_data.encode("utf-8", "surrogatepass")) > settings.CHAT_MAX_FRAME_BYTES
            ):
                await self._audit_rejection(ERR_TOO_LONG)
                await self._close(CLOSE_TOO_BIG)
                return
            frame = _parse(text_data)
            handler = self._handlers.get(frame["type"])
            if handler is None:
                raise FrameError(ERR_UNKNOWN_TYPE, f"unknown frame type {frame['type'][:32]!r}")
            await handler(self, frame)
        except FrameError as error:
            await self._refuse(error.code, error.detail)
        except (StateUnavailable, DatabaseError) as error:
            # A backing service failed (Redis, the database): not the client's fault, so no
            # abuse count; the socket stays open and the client may send again.
            logger.warning("frame not served, backing service failed: %s", type(error).__name__)
            # A message's answer names it, whatever failed (its rate, or the read of a resend
            # after a mute), so that its sender knows which to send again.
            extra = _client_id_of(frame.get("client_id")) if frame.get("type") == "message" else {}
            await self.send_text(
                frames.error(ERR_UNAVAILABLE, "temporarily unavailable; try again", **extra)
            )

    async def _refuse(self, code: str, detail: str, **extra: Any) -> None:
        """Answer a refused frame with an error frame; persistent abuse closes the socket (4429)."""
        await self._audit_rejection(code)
        await self.send_text(frames.error(code, detail, **extra))
        now = time.monotonic()
        self._abuse = [t for t in self._abuse if now - t < settings.CHAT_ABUSE_WINDOW]
        self._abuse.append(now)
        if len(self._abuse) > settings.CHAT_ABUSE_LIMIT:
            self.runtime.audit.add(
                audit.security_event_row(
                    event=audit.Event.RATE_LIMITED,
                    target=self.user,
                    room=self.room,
                    ip=self.record.ip,
                    reason=f"{len(self._abuse)} refused frames",
                )
            )
            await self._close(CLOSE_RATE_LIMITED)

    async def _audit_rejection(self, code: str) -> None:
        self.runtime.audit.add(
            audit.message_log(
                event=audit.MessageEvent.REJECTED,
                reason=code,
                user=self.user,
                room=self.room,
                connection_id=self.record.id,
                ip=self.record.ip,
            )
        )

    async def on_message(self, frame: dict[str, Any]) -> None:
        client_id = frame.get("client_id")
        try:
            client_id = services.clean_client_id(client_id)
            body = services.clean_body(frame.get("body"))
        except services.ServiceError as error:
            return await self._refuse(error.code, error.detail, **_client_id_of(client_id))
        if refusal := permissions.post_refusal(self.user, self.room, self.membership):
            # A message stored before the mute (or the room's change), whose ack was lost with
            # an earlier socket, is acked with its seq, as the store would (docs/protocol.md).
            # The read it takes spends the sender's message rate, as a message would: past it,
            # the refusal, which the abuse limit counts.
            if await self._take_message_token():
                stored = await database_sync_to_async(selectors.message_seq_of)(
                    room_id=self.room_id, author_id=self.user_id, client_id=client_id
                )
                if stored is not None:
                    return await self.send_text(frames.ack(client_id, stored))
            return await self._refuse(*refusal, client_id=client_id)
        if not await self._take_message_token():
            return await self._refuse(
                ERR_RATE_LIMITED, "too many messages; slow down", client_id=client_id
            )
        item = SendItem(self.room, self.user, body, client_id, self.record.id, self.record.ip)
        # The writer answers (ack, or the error the service found, e.g. a ban committed a moment
        # ago) before it broadcasts the message. We read on meanwhile, up to a limit.
        answered = self.runtime.writer.submit(item, self.send_text)
        self._inflight.add(answered)
        answered.add_done_callback(self._inflight.discard)
        if len(self._inflight) >= MAX_IN_FLIGHT:
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
        return None

    async def _take_message_token(self) -> bool:
        return await self.runtime.state.take_token(
            f"messages:{self.user_id}", settings.CHAT_MESSAGE_RATE, settings.CHAT_MESSAGE_BURST
        )

    async def on_history(self, frame: dict[str, Any]) -> None:
        before, after = _seq(frame, "before"), _seq(frame, "after")
        if before is not None and after is not None:
            raise FrameError(ERR_INVALID_FRAME, "give before or after, not both")
        limit = frame.get("limit", 50)
        if type(limit) is not int or not 1 <= limit <= settings.CHAT_HISTORY_LIMIT:
            raise FrameError(ERR_INVALID_FRAME, f"limit must be 1..{settings.CHAT_HISTORY_LIMIT}")
        if not await self._paced_read():
            return
        messages, has_more = await database_sync_to_async(self._history)(before, after, limit)
        # A page stays within the frame limit, whatever the bodies: the part nearest to what
        # was asked for (the oldest after a seq, else the newest), and has_more for the rest.
        kept = _within(messages, settings.CHAT_MAX_FRAME_BYTES, newest=after is None)
        if len(kept) < len(messages):
            messages, has_more = kept, True
        reply = {"type": "history", "messages": messages, "has_more": has_more}
        reply.update({k: v for k, v in (("before", before), ("after", after)) if v is not None})
        await self.send_text(frames.dumps(reply))

    async def _paced_read(self) -> bool:
        """Wait this socket's turn for a database read (`history`, `resync`): at most
        CHAT_READ_RATE a second after a burst of CHAT_READ_BURST. A client that asks again
        once answered (the pages' catch-up does) waits a moment at worst; one whose turn is
        more than READ_WAIT_MAX away is refused (`rate_limited`, which counts towards the abuse
        close), since while a read waits the socket's later frames queue unread in the server.
        False if the socket closed meanwhile."""
        wait, reads_at = pace(
            self._reads_at, time.monotonic(), settings.CHAT_READ_RATE, settings.CHAT_READ_BURST
        )
        if wait > READ_WAIT_MAX:
            raise FrameError(ERR_RATE_LIMITED, "too many history or resync requests; slow down")
        self._reads_at = reads_at
        if wait > 0:
            await asyncio.sleep(wait)
        return not self.closing

    def _history(self, before, after, limit) -> tuple[list[dict], bool]:
        page, has_more = selectors.messages_page(
            room=self.room, before=before, after=after, limit=limit
        )
        return selectors.message_payloads(page, room=self.room), has_more

    async def on_resync(self, frame: dict[str, Any]) -> None:
        """What changed among messages the client already shows: deletions and restorations
        made while it was away (live ones reach it as `deleted` and `restored` frames)."""
        first, last = _seq(frame, "from"), _seq(frame, "to")
        if first is None or last is None or not 1 <= first <= last:
            raise FrameError(ERR_INVALID_FRAME, "give from and to, with 1 <= from <= to")
        most = resync_max_seqs(settings.CHAT_MAX_FRAME_BYTES)
        if last - first >= most:
            raise FrameError(ERR_INVALID_FRAME, f"resync at most {most} seqs at a time")
        shown = frame.get("deleted", [])
        if (
            type(shown) is not list
            or len(shown) > last - first + 1
            or any(type(seq) is not int or not first <= seq <= last for seq in shown)
        ):
            raise FrameError(ERR_INVALID_FRAME, "deleted must list seqs from `from` to `to`")
        if not await self._paced_read():
            return
        deleted, restored, last = await database_sync_to_async(selectors.changes_between)(
            room=self.room,
            first=first,
            last=last,
            shown_deleted=set(shown),
            most_restored=settings.CHAT_HISTORY_LIMIT,
        )
        # The oldest restored messages that fit in half a frame; the answer then covers up to
        # the last of them, and the client asks again from the next seq.
        kept = _within(restored, settings.CHAT_MAX_FRAME_BYTES // 2, newest=False)
        if len(kept) < len(restored):
            last = kept[-1]["seq"]
            deleted = [seq for seq in deleted if seq <= last]
        reply = {"type": "resync", "from": first, "to": last, "deleted": deleted, "restored": kept}
        await self.send_text(frames.dumps(reply))

    async def on_delete(self, frame: dict[str, Any]) -> None:
        seq = _seq(frame, "seq")
        if seq is None:
            raise FrameError(ERR_INVALID_FRAME, "seq is required")
        try:
            await database_sync_to_async(services.message_delete)(
                actor=self.user,
                room=self.room,
                seq=seq,
                connection_id=self.record.id,
                ip=self.record.ip,
            )
        except services.ServiceError as error:
            raise FrameError(error.code, error.detail) from None

    async def on_typing(self, frame: dict[str, Any]) -> None:
        if refusal := permissions.post_refusal(self.user, self.room, self.membership):
            raise FrameError(*refusal)
        if not await self.runtime.state.throttle(
            f"typing:{self.room_id}:{self.user_id}", settings.CHAT_TYPING_INTERVAL
        ):
            raise FrameError(ERR_RATE_LIMITED, "typing at most every few seconds")
        await self._publish(
            broadcast.frame_event(
                self.room_id,
                frames.typing(self.room.slug, self.username),
                exclude_user=self.user_id,
            )
        )

    async def on_ping(self, frame: dict[str, Any]) -> None:
        await self.send_text(frames.PONG)

    _handlers = {
        "message": on_message,
        "history": on_history,
        "resync": on_resync,
        "delete": on_delete,
        "typing": on_typing,
        "ping": on_ping,
    }

    # --- from the hub --------------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        if self.closing:
            return
        self.sent += 1
        # Straight to the socket under `manage.py serve` (acks, errors, hello, history), as the
        # hub's fan-out writes, instead of an ASGI message through daphne and autobahn's
        # per-frame path. Writes stay in call order either way; a socket that is not open
        # (before accept, while closing) takes daphne's path, which knows what to do then.
        # Corked (chatproject/server.py Corks): a batch's acks to this socket go in one send().
        if self.fast_send is not None and self.fast_send(frames.prepared(text), True):
            return
        await self.base_send({"type": "websocket.send", "text": text})

    async def on_control(self, event: dict[str, Any]) -> None:
        if not self.ready:
            self._held.append(event)
            return
        await self._apply_control(event)

    async def _apply_control(self, event: dict[str, Any], *, notify: bool = True) -> None:
        """Apply a revocation, membership change or room change; close if access is gone.

        `notify`: send the client the membership frame that comes with a change; off for changes
        held before hello, which already describes the resulting state.
        """
        if self.closing:
            return
        kind = event["type"]
        if kind == "hub.revoke":
            if event.get("spare_staff") and permissions.has_staff_powers(self.user):
                return
            if not event.get("credential") or event["credential"] == self.credential:
                await self._close(event["code"], event.get("reason"))
            return
        if kind == "hub.membership":
            if not self._newer(event, "membership_version"):
                return
            self.membership = _membership(self.room_id, self.user_id, event["state"])
            # A ban, a removal or a lower role closes a member's socket; staff powers pass over
            # them (with the second factor required, they bind a staff account's password-only
            # credentials, which have no staff powers: chat.permissions._target_rank).
            if event.get("close") and not permissions.has_staff_powers(self.user):
                code, reason = event["close"]
                await self._close(code, reason)
                return
        elif kind == "hub.room":
            if not self._newer(event, "room_version"):
                return
            state = event["state"]
            self.room.visibility, self.room.title = state["visibility"], state["title"]
            self.room.archived_at = _dt(state["archived_at"])
            if self.room.archived_at is not None:
                await self._close(CLOSE_ROOM_GONE, "room archived")
                return
        if not permissions.can_view(self.user, self.room, self.membership):
            await self._close(CLOSE_FORBIDDEN)
        elif notify and kind == "hub.membership" and event.get("text"):
            await self.send_text(event["text"])
        elif notify and kind == "hub.room":
            can_post = permissions.can_post(self.user, self.room, self.membership)
            await self.send_text(event["texts"][1 if can_post else 0])

    def _newer(self, event: dict[str, Any], attribute: str) -> bool:
        """Whether a membership or room change is newer than the state this socket has (the
        version in `attribute`); if so, its version becomes the socket's. Two changes made
        moments apart on two processes can arrive in either order (chat.hub._newer)."""
        version = event.get("version")
        if version is None:  # an older publisher's, during an upgrade: taken, as before
            return True
        if version <= getattr(self, attribute):
            return False
        setattr(self, attribute, version)
        return True

    # --- close ---------------------------------------------------------------------------------

    async def _close(self, code: int, reason: str | None = None) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        await self.close(code, reason or CLOSE_REASONS.get(code))

    async def websocket_disconnect(self, message) -> None:
        if self.close_code is None:
            self.close_code = message.get("code")
        raise StopConsumer()

    async def _publish(self, event: dict[str, Any]) -> None:
        """A hub event (chat.broadcast) to every process with sockets in this room."""
        await broadcast.apublish(broadcast.room_group(self.room_id), event)

    def _presence(self, version: int, *, joined: bool) -> dict[str, Any]:
        """This user's join or leave, made at the room's presence `version`. A join is not sent
        to the user's own sockets: the joiner's hello lists it, and so did the others'."""
        if not joined:
            return broadcast.departure_event(self.room_id, self.room.slug, self.username, version)
        text = frames.presence(self.room.slug, joined=self.username)
        return broadcast.presence_event(
            self.room_id, self.username, text, version, exclude_user=self.user_id
        )

    async def _finish(self) -> None:
        """Leave the hub, presence and caps, and seal the connection's audit record. Runs once."""
        if getattr(self, "finished", False):
            return
        self.finished = True
        self.closing = True
        state = self.runtime.state
        try:
            if self.attached:
                await self.runtime.hub.detach(self)
            if getattr(self, "counted", False):
                # One call leaves the user's socket slots and, if it had joined, the presence;
                # a version if the user has left a room where someone is left to hear it.
                joined = getattr(self, "joined", False)
                presence = (self.room_id, self.username) if joined else None
                if version := await state.socket_close(self.user_id, self.socket_id, presence):
                    await self._publish(self._presence(version, joined=False))
        except Exception:
            logger.exception("socket cleanup failed")
        finally:
            self.record.close(
                self.runtime, code=self.close_code, received=self.received, sent=self.sent
            )


def _client_id_of(value: Any) -> dict[str, str]:
    """An answer's `client_id` field: the frame's own if it is a well-formed one, else none."""
    if isinstance(value, str) and services.CLIENT_ID_RE.fullmatch(value):
        return {"client_id": value}
    return {}


def _parse(text: str) -> dict[str, Any]:
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        raise FrameError(ERR_INVALID_FRAME, "frames must be JSON objects") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise FrameError(ERR_INVALID_FRAME, 'frames must be JSON objects with a string "type"')
    return frame


def _seq(frame: dict[str, Any], key: str) -> int | None:
    value = frame.get(key)
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise FrameError(ERR_INVALID_FRAME, f"{key} must be a non-negative integer")
    return value


def _dt(value: str | None):
    return parse_datetime(value) if value else None


def _membership(room_id: int, user_id: int, state: dict[str, Any] | None) -> Membership | None:
    """A membership rebuilt from a hub event (chat.services.membership_state), never saved."""
    if state is None:
        return None
    return Membership(
        room_id=room_id,
        user_id=user_id,
        role=state["role"],
        muted_until=_dt(state["muted_until"]),
        banned_at=_dt(state["banned_at"]),
    )


def _within(messages: list[dict], budget: int, *, newest: bool) -> list[dict]:
    """As many of `messages` as fit in `budget` bytes of JSON, taken from the newest end or the
    oldest; at least one, so a page always makes progress."""
    overhead = 200  # the history frame around the list
    # Cheap bound first: four bytes a character at most, 1 KiB for the other fields.
    if len(messages) <= 1 or (
        sum(4 * len(m.get("body") or "") + 1024 for m in messages) <= budget - overhead
    ):
        return messages
    ordered = reversed(messages) if newest else iter(messages)
    kept, used = [], overhead
    for message in ordered:
        used += len(frames.dumps(message).encode("utf-8", "surrogatepass")) + 1
        if kept and used > budget:
            break
        kept.append(message)
    return list(reversed(kept)) if newest else kept
