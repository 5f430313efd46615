"""Every write: one keyword-only function per action; checked, audited, broadcast after commit."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Subquery, Value
from django.db.models.functions import Least
from django.utils import timezone
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.tokens import RefreshToken

from accounts.services import (
    credential_for_jwt,
    login_end,
    login_has_ended,
    rotated_refresh,
    tickets_revoke_for_login,
)
from accounts.tokens import FAMILY_CLAIM
from chat import audit, broadcast, frames, permissions, selectors, sql
from chat.models import Membership, Message, Room
from chat.protocol import CLOSE_FORBIDDEN, CLOSE_ROOM_GONE, CLOSE_UNAUTHORIZED

User = get_user_model()
Role = Membership.Role

# The changes that close sockets in a room, with the close code and reason: a ban or a removal
# the member's (not those with staff powers), an archive everyone's. The hub closes a socket
# whose event was lost the same way (chat.hub.Hub._catch_up_changes).
ROOM_CLOSES = {
    audit.Event.MEMBER_BANNED: (CLOSE_FORBIDDEN, "banned"),
    audit.Event.MEMBER_REMOVED: (CLOSE_FORBIDDEN, "removed"),
    audit.Event.ROOM_ARCHIVED: (CLOSE_ROOM_GONE, "room archived"),
}


class ServiceError(Exception):
    """A refused action. `code` is what clients see; the HTTP status is the caller's choice."""

    code = "invalid"

    def __init__(self, detail: str, code: str | None = None):
        super().__init__(detail)
        self.detail = detail
        if code:
            self.code = code


class Invalid(ServiceError):
    code = "invalid"


class Forbidden(ServiceError):
    code = "forbidden"


class NotFound(ServiceError):
    code = "not_found"


class Conflict(ServiceError):
    code = "conflict"


# --- validation ----------------------------------------------------------------------------------

# C0 and C1 controls other than tab and newline (a CR only in CRLF, normalised below), and the
# bidirectional embedding/override/isolate controls that make text display differently from what
# it says ("Trojan Source"). The marks LRM and RLM (U+200E/F) stay allowed.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch only ($ admits a final \n)


def clean_body(body: Any) -> str:
    """A message body as stored: a non-blank string within the length limit, valid Unicode."""
    if not isinstance(body, str):
        raise Invalid("body must be a string", code="invalid_frame")
    # A line break is one character however the client's platform writes it, as the page's
    # counter shows it.
    body = body.replace("\r\n", "\n")
    if len(body) > settings.CHAT_MAX_MESSAGE_LENGTH:
        raise Invalid(
            f"body is longer than {settings.CHAT_MAX_MESSAGE_LENGTH} characters", code="too_long"
        )
    if not body.strip():
        raise Invalid("body is empty", code="invalid_frame")
    if _CONTROL.search(body):
        raise Invalid("body contains control characters", code="invalid_frame")
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid("body is not valid Unicode", code="invalid_frame") from None
    return body


def clean_client_id(client_id: Any) -> str:
    if not isinstance(client_id, str) or not CLIENT_ID_RE.fullmatch(client_id):
        raise Invalid("client_id must be 1-64 characters of A-Z a-z 0-9 _ -", code="invalid_frame")
    return client_id


# --- messages ------------------------------------------------------------------------------------


@dataclass(slots=True)
class SendItem:
    room: Room
    author: Any
    body: str
    client_id: str
    connection_id: UUID | None = None
    ip: str | None = None


@dataclass(slots=True)
class SendResult:
    seq: int | None = None
    duplicate: bool = False
    error: str | None = None
    detail: str = ""


def message_send(
    *,
    room: Room,
    author,
    body: str,
    client_id: str,
    connection_id: UUID | None = None,
    ip: str | None = None,
) -> SendResult:
    return message_send_many([SendItem(room, author, body, client_id, connection_id, ip)])[0]


Publication = tuple[str, dict[str, Any]]
# What the room policy and the frames read of a room and a membership.
ROOM_FIELDS = ["slug", "title", "visibility", "archived_at", "last_seq"]
MEMBERSHIP_FIELDS = ["room", "user", "role", "muted_until", "banned_at"]


def message_send_many(items: list[SendItem]) -> list[SendResult]:
    """Store a batch of messages (message_store_many) and broadcast them once committed."""
    results, publications = message_store_many(items)
    for group, event in publications:
        broadcast.publish(group, event)
    return results


def message_store_many(items: list[SendItem]) -> tuple[list[SendResult], list[Publication]]:
    """Store a batch of messages in one transaction, in order; each gets its own result.

    Returns the results and the room events to publish; the caller publishes them (the socket
    writer does so after answering each sender, so a sender sees its ack before the broadcast).
    Bodies and client ids must already be clean. Permissions are checked again here, under the
    lock of the rooms' rows, which every membership change takes too (_lock_room): a ban
    committed a moment ago stops the next message even if the sender's socket has not heard of
    it yet, and one committing meanwhile waits for the batch. A client_id the author already
    used returns the stored message's seq and creates nothing.
    """
    for attempt in range(3):
        try:
            return _store_batch(items)
        except IntegrityError:
            # Another process stored one of these client_ids between our check and our insert.
            # Everything rolled back (seq counters included); the re-check will find it.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


# The user fields a socket's rights rest on (permissions: staff powers; an active account).
AUTHOR_FIELDS = ["is_active", "is_staff", "is_superuser"]


def _account_changed(opened_as, now) -> bool:
    """Whether the author's account, as read now (None: deleted), is no longer the one their
    socket opened with: deactivated, deleted, or its staff or superuser flag changed."""
    if now is None or not now.is_active:
        return True
    return (now.is_staff, now.is_superuser) != (opened_as.is_staff, opened_as.is_superuser)


def _store_batch(items: list[SendItem]) -> tuple[list[SendResult], list[Publication]]:
    now = timezone.now()
    results = [SendResult() for _ in items]
    # (room id, author id) of each item, read once: `.pk` is a property, asked a dozen times.
    keys = [(i.room.pk, i.author.pk) for i in items]
    room_ids = sorted({room_id for room_id, _ in keys})
    published: dict[int, list[tuple[int, str]]] = {}
    with transaction.atomic():
        # Lock rooms in id order (no deadlock between batches); also gives their fresh state.
        # (sql.select_in: the ORM's query compiler cost more than these queries.)
        rooms = {
            r.pk: r
            for r in sql.select_in(Room, ROOM_FIELDS, pk=room_ids, for_update=True, order_by="id")
        }
        # The authors as they are now, locked after the rooms: a deactivation or a change of
        # the staff flags commits before this batch reads them (and it sees it) or waits for
        # it. The sockets' user objects are as they were when each socket opened.
        authors = {
            u.pk: u
            for u in sql.select_in(
                User, AUTHOR_FIELDS, pk=sorted({a for _, a in keys}), for_update=True, order_by="id"
            )
        }
        memberships = {
            (m.room_id, m.user_id): m
            for m in sql.select_pairs(Membership, MEMBERSHIP_FIELDS, ("room", "user"), keys)
        }
        existing = {
            (m.author_id, m.client_id): m
            for m in sql.select_pairs(
                Message,
                ["author", "client_id", "room", "seq"],
                ("author", "client_id"),
                ((author_id, i.client_id) for (_, author_id), i in zip(keys, items, strict=True)),
            )
        }
        new_messages: list[Message] = []
        logs = []
        for item, result, (room_id, author_id) in zip(items, results, keys, strict=True):
            room = rooms.get(room_id)
            previous = existing.get((author_id, item.client_id))
            if previous is not None:
                if room is not None and previous.room_id == room.pk:
                    result.seq, result.duplicate = previous.seq, True
                else:
                    result.error, result.detail = (
                        "invalid_frame",
                        "client_id was used in another room",
                    )
                continue
            membership = memberships.get((room_id, author_id))
            if room is None or room.archived_at is not None:
                result.error, result.detail = "not_found", "room not found"
            elif _account_changed(item.author, authors.get(author_id)):
                # Its socket is closing with 4401 (the change's revocation is on its way).
                result.error, result.detail = "forbidden", "your account changed; sign in again"
            elif refusal := permissions.post_refusal(item.author, room, membership, now):
                result.error, result.detail = refusal
            if result.error:
                logs.append(_rejected_log(item, room, result.error))
                continue
            room.last_seq += 1
            message = sql.build(
                Message,
                room_id=room_id,
                seq=room.last_seq,
                author_id=author_id,
                body=item.body,
                client_id=item.client_id,
                created_at=now,
            )
            new_messages.append(message)
            existing[(author_id, item.client_id)] = message
            result.seq = message.seq
            logs.append(
                audit.message_log(
                    event=audit.MessageEvent.SENT,
                    user=item.author,
                    room=room,
                    seq=message.seq,
                    connection_id=item.connection_id,
                    ip=item.ip,
                    at=now,
                )
            )
            data = frames.message_data(
                message, room_slug=room.slug, author_name=item.author.username
            )
            published.setdefault(room.pk, []).append((message.seq, frames.message(data)))
        if new_messages:
            sql.insert_many(new_messages)
            sql.update_many(
                Room, ["last_seq"], ((room_id, [rooms[room_id].last_seq]) for room_id in published)
            )
        audit.append(logs)
    publications = [
        (broadcast.room_group(room_id), broadcast.messages_event(room_id, room_items))
        for room_id, room_items in published.items()
    ]
    return results, publications


def _rejected_log(item: SendItem, room: Room | None, reason: str):
    return audit.message_log(
        event=audit.MessageEvent.REJECTED,
        reason=reason,
        user=item.author,
        room=room or item.room,
        connection_id=item.connection_id,
        ip=item.ip,
    )


def message_delete(
    *, actor, room: Room, seq: int, connection_id: UUID | None = None, ip: str | None = None
) -> Message:
    with transaction.atomic():
        _lock_room(room.pk)  # the actor's right to delete is read under it
        message = Message.objects.select_for_update().filter(room=room, seq=seq).first()
        if message is None or message.deleted_at is not None:
            raise NotFound("no such message")
        membership = _membership(room, actor)
        if not permissions.can_delete(actor, room, membership, message):
            raise Forbidden("you may not delete this message")
        message.deleted_at, message.deleted_by = timezone.now(), actor
        message.save(update_fields=["deleted_at", "deleted_by"])
        log = audit.message_log(
            event=audit.MessageEvent.DELETED,
            user=actor,
            room=room,
            seq=seq,
            connection_id=connection_id,
            ip=ip,
        )
        audit.append([log])
        _publish_frame(room, frames.deleted(room.slug, seq), seq=seq, version=log.chain_seq)
    return message


def message_restore(*, actor, message: Message) -> Message:
    """Undo a soft delete (moderators and staff, e.g. from the admin)."""
    with transaction.atomic():
        _lock_room(message.room_id)  # the actor's right to restore is read under it
        message = (
            # of=self: the author join is an outer join, which PostgreSQL will not lock.
            Message.objects.select_for_update(of=("self",))
            .select_related("room", "author")
            .get(pk=message.pk)
        )
        room = message.room
        if message.deleted_at is None:
            return message
        if not permissions.is_moderator(actor, room, _membership(room, actor)):
            raise Forbidden("you may not restore messages in this room")
        message.deleted_at, message.deleted_by = None, None
        message.save(update_fields=["deleted_at", "deleted_by"])
        log = audit.message_log(
            event=audit.MessageEvent.RESTORED, user=actor, room=room, seq=message.seq
        )
        audit.append([log])
        author = message.author.username if message.author else None
        _publish_frame(
            room,
            frames.restored(frames.message_data(message, room_slug=room.slug, author_name=author)),
            seq=message.seq,
            version=log.chain_seq,
        )
    return message


# --- rooms ---------------------------------------------------------------------------------------


def room_create(*, actor, slug: str, title: str, visibility: str = Room.Visibility.PUBLIC) -> Room:
    if not permissions.can_create_room(actor):
        raise Forbidden("you may not create rooms")
    if visibility not in Room.Visibility.values:
        raise Invalid(f"visibility must be one of {', '.join(Room.Visibility.values)}")
    with transaction.atomic():
        if Room.objects.filter(slug=slug).exists():
            raise Conflict("a room with this slug already exists")
        room = Room.objects.create(slug=slug, title=title, visibility=visibility, created_by=actor)
        Membership.objects.create(room=room, user=actor, role=Role.OWNER)
        audit.security_event(
            event=audit.Event.ROOM_CREATED,
            actor=actor,
            room=room,
            details={"visibility": visibility},
        )
    return room


def room_update(
    *, actor, room: Room, title: str | None = None, visibility: str | None = None
) -> Room:
    with transaction.atomic():
        room = Room.objects.select_for_update().get(pk=room.pk)
        if not permissions.can_manage_room(actor, room, _membership(room, actor)):
            raise Forbidden("only owners may change the room")
        changes: dict[str, Any] = {}
        if title is not None and title != room.title:
            changes["title"] = [room.title, title]
            room.title = title
        if visibility is not None and visibility != room.visibility:
            if visibility not in Room.Visibility.values:
                raise Invalid(f"visibility must be one of {', '.join(Room.Visibility.values)}")
            changes["visibility"] = [room.visibility, visibility]
            room.visibility = visibility
        if not changes:
            return room
        room.save(update_fields=["title", "visibility"])
        record = audit.security_event(
            event=audit.Event.ROOM_UPDATED, actor=actor, room=room, details=changes
        )
        # Sockets re-check access against the new visibility (private: non-members are closed)
        # and pass the change on; the frame is framed here once for each answer to can_post.
        texts = [
            frames.room(room.slug, title=room.title, visibility=room.visibility, can_post=allowed)
            for allowed in (False, True)
        ]
        broadcast.publish(
            broadcast.room_group(room.pk),
            broadcast.room_state_event(room.pk, room_state(room), texts, version=record.chain_seq),
        )
    return room


def room_archive(*, actor, room: Room, reason: str = "") -> Room:
    with transaction.atomic():
        room = Room.objects.select_for_update().get(pk=room.pk)
        if room.archived_at is not None:
            return room
        if not permissions.can_manage_room(actor, room, _membership(room, actor)):
            raise Forbidden("only owners may archive the room")
        room.archived_at = timezone.now()
        room.save(update_fields=["archived_at"])
        audit.security_event(event=audit.Event.ROOM_ARCHIVED, actor=actor, room=room, reason=reason)
        code, why = ROOM_CLOSES[audit.Event.ROOM_ARCHIVED]
        broadcast.publish(
            broadcast.room_group(room.pk),
            broadcast.revoke_event(room_id=room.pk, code=code, reason=why),
        )
    return room


def room_state(room: Room) -> dict[str, Any]:
    return {
        "visibility": room.visibility,
        "title": room.title,
        "archived_at": frames.iso(room.archived_at),
    }


def room_mark_read(*, user, room: Room, seq: int) -> None:
    """Move the member's read marker forward to `seq` (never past the room's last message)."""
    last_seq = Room.objects.filter(pk=room.pk).values("last_seq")
    Membership.objects.filter(room=room, user=user, last_read_seq__lt=seq).update(
        last_read_seq=Least(Value(seq), Subquery(last_seq))
    )


# --- memberships ---------------------------------------------------------------------------------


def room_join(*, user, room: Room) -> Membership:
    with transaction.atomic():
        _lock_room(room.pk)
        membership = _membership(room, user, lock=True)
        if membership is not None and membership.banned_at is None:
            return membership
        if not permissions.can_join(user, room, membership):
            raise Forbidden("you may not join this room")
        membership = Membership.objects.create(room=room, user=user, role=Role.MEMBER)
        record = audit.security_event(
            event=audit.Event.MEMBER_ADDED,
            actor=user,
            target=user,
            room=room,
            details={"role": "member"},
        )
        # A visitor's open sockets in a public or read-only room learn the role they now have.
        _publish_membership(room, user, membership, version=record.chain_seq)
    return membership


def membership_add(*, actor, room: Room, user, role: str = Role.MEMBER) -> Membership:
    with transaction.atomic():
        _lock_room(room.pk)
        if not permissions.can_add_member(actor, room, _membership(room, actor), role):
            raise Forbidden("you may not add members with this role")
        if not user.is_active:
            raise Invalid("this user is inactive")
        membership = _membership(room, user, lock=True)
        if membership is not None:
            raise Conflict(
                "this user is already a member"
                if not membership.banned_at
                else "this user is banned"
            )
        membership = Membership.objects.create(room=room, user=user, role=role)
        record = audit.security_event(
            event=audit.Event.MEMBER_ADDED,
            actor=actor,
            target=user,
            room=room,
            details={"role": role},
        )
        # Takes effect live, as a promotion does: a visitor's open sockets in a public or
        # read-only room (a moderator added there may post at once).
        _publish_membership(room, user, membership, version=record.chain_seq)
    return membership


def membership_set_role(*, actor, room: Room, user, role: str) -> Membership:
    with transaction.atomic():
        _lock_room(room.pk)
        target = _existing_membership(room, user)
        if not permissions.can_set_role(actor, room, _membership(room, actor), user, target, role):
            raise Forbidden("you may not give this role to this member")
        old = target.role
        if old == role:
            return target
        target.role = role
        target.save(update_fields=["role"])
        record = audit.security_event(
            event=audit.Event.ROLE_CHANGED,
            actor=actor,
            target=user,
            room=room,
            details={"from": old, "to": role},
        )
        demoted = permissions.is_demotion(old, role)
        # A demotion ends the sockets opened under the old role: the client reconnects with a new
        # ticket and a fresh hello. A promotion takes effect live.
        close = (CLOSE_UNAUTHORIZED, "role changed") if demoted else None
        _publish_membership(room, user, target, close=close, version=record.chain_seq)
    return target


def member_mute(*, actor, room: Room, user, until: datetime | None, reason: str = "") -> Membership:
    """Mute `user` until `until` (None: unmute). A mute creates a membership in public rooms."""
    with transaction.atomic():
        _lock_room(room.pk)
        target = _membership(room, user, lock=True)
        if not permissions.can_moderate(actor, room, _membership(room, actor), user, target):
            raise Forbidden("you may not mute this user")
        if until is not None and until <= timezone.now():
            raise Invalid("a mute must end in the future")
        if target is None:
            if until is None or room.visibility == Room.Visibility.PRIVATE:
                # Nothing to unmute; and in a private room a row would let them in.
                raise NotFound("not a member of this room")
            target = Membership(room=room, user=user, role=Role.MEMBER)
        target.muted_until = until
        target.save()
        record = audit.security_event(
            event=audit.Event.MEMBER_MUTED if until else audit.Event.MEMBER_UNMUTED,
            actor=actor,
            target=user,
            room=room,
            reason=reason,
            details={"until": frames.iso(until)} if until else {},
        )
        _publish_membership(room, user, target, version=record.chain_seq)
    return target


def member_ban(*, actor, room: Room, user, reason: str = "") -> Membership:
    with transaction.atomic():
        _lock_room(room.pk)
        target = _membership(room, user, lock=True)
        if not permissions.can_moderate(actor, room, _membership(room, actor), user, target):
            raise Forbidden("you may not ban this user")
        if target is None:
            # An outsider: a row to hold the ban, and no membership (joined_at empty).
            target = Membership(room=room, user=user, role=Role.MEMBER, joined_at=None)
        if target.banned_at is not None:
            return target
        target.banned_at, target.banned_by, target.ban_reason = timezone.now(), actor, reason[:200]
        target.save()
        record = audit.security_event(
            event=audit.Event.MEMBER_BANNED, actor=actor, target=user, room=room, reason=reason
        )
        close = ROOM_CLOSES[audit.Event.MEMBER_BANNED]
        _publish_membership(room, user, target, close=close, version=record.chain_seq)
    return target


def member_unban(*, actor, room: Room, user) -> Membership | None:
    """Lift `user`'s ban. The membership left, or None when the ban was of someone who never
    joined: its row goes with it."""
    with transaction.atomic():
        _lock_room(room.pk)
        target = _existing_membership(room, user)
        if not permissions.can_moderate(actor, room, _membership(room, actor), user, target):
            raise Forbidden("you may not unban this user")
        if target.banned_at is None:
            return target
        target.banned_at, target.banned_by, target.ban_reason = None, None, ""
        if target.joined_at is None and (
            room.visibility == Room.Visibility.PRIVATE or not permissions.is_muted(target)
        ):
            # The row only held the ban of someone who never joined: lifting the ban must not
            # make them a member (of a private room above all). A mute in force in a public room
            # keeps it, as muting an outsider there would have made it.
            target.delete()
            target = None
        else:
            target.joined_at = target.joined_at or timezone.now()
            target.save()
        audit.security_event(event=audit.Event.MEMBER_UNBANNED, actor=actor, target=user, room=room)
    return target


def member_remove(*, actor, room: Room, user, reason: str = "") -> None:
    """Remove (kick) `user`: their membership goes and their open sockets in the room close 4403.

    Members may remove themselves (leave). In a public room a kicked user may come back; ban to
    keep them out. A sanction lives on the membership, so removing one must not lift it: a
    banned or muted member cannot leave, a ban stays until lifted, and a muted member is not
    removed (ban them, or lift the mute first).
    """
    with transaction.atomic():
        _lock_room(room.pk)
        target = _existing_membership(room, user)
        leaving = actor.pk == user.pk and target.role != Role.OWNER
        sanctioned = target.banned_at is not None or permissions.is_muted(target)
        if leaving and sanctioned and not permissions.has_staff_powers(actor):
            raise Forbidden("you cannot leave this room while you are banned or muted in it")
        if not leaving and not permissions.can_moderate(
            actor, room, _membership(room, actor), user, target
        ):
            raise Forbidden("you may not remove this member")
        if target.banned_at is not None:
            raise Invalid("this user is banned from the room; the ban stays until it is lifted")
        if not leaving and permissions.is_muted(target):
            # Deleted, the row would take the mute with it (the user added again, or joining a
            # public room, would post unmuted); kept, it would stay a membership (one that
            # reads a private room, or a room made private later).
            raise Invalid(
                "this member is muted, which removing them would lift: ban them to keep them "
                "out, or lift the mute first"
            )
        role = target.role
        target.delete()
        record = audit.security_event(
            event=audit.Event.MEMBER_REMOVED,
            actor=actor,
            target=user,
            room=room,
            reason=reason,
            details={"role": role, "left": leaving},
        )
        close = ROOM_CLOSES[audit.Event.MEMBER_REMOVED]
        _publish_membership(room, user, None, close=close, version=record.chain_seq)


# --- users ---------------------------------------------------------------------------------------

# The account changes that close the user's sockets (user_sockets_close), with the reason each
# closes them with: the hub closes a socket whose revocation never reached it with the same
# (chat.hub.Hub._catch_up_changes). A logout closes only the sockets of its login.
USER_CLOSE_REASONS = {
    audit.Event.PASSWORD_CHANGED: "password changed",
    audit.Event.USER_DEACTIVATED: "account deactivated",
    audit.Event.PRIVILEGES_CHANGED: "privileges changed",
    audit.Event.SECOND_FACTOR_REMOVED: "second factor removed",  # with CHAT_ADMIN_REQUIRE_OTP
    audit.Event.USER_DELETED: "account deleted",
    audit.Event.LOGOUT: "logged out",  # that login's sockets only (details["credential"])
    audit.Event.REFRESH_REUSED: "login ended",  # likewise
}
# The privileges whose change closes the user's sockets (user_credentials_changed): a socket acts
# with the flags it opened with. Groups and permissions are audited under the same event
# (accounts.signals) and close nothing: the chat's powers rest on these flags alone.
SOCKET_PRIVILEGES = frozenset({"is_staff", "is_superuser"})


def user_deactivate(*, actor, user, reason: str = "") -> None:
    """Deactivate an account: it can no longer sign in, and its open sockets close (4401)."""
    with transaction.atomic():
        updated = User.objects.filter(pk=user.pk, is_active=True).update(is_active=False)
        if not updated:
            return
        user.is_active = False
        # A queryset update sends no signal: record it the way every other path does.
        user_credentials_changed(
            user=user, password_changed=False, deactivated=True, actor=actor, reason=reason
        )


def user_credentials_changed(
    *,
    user,
    password_changed: bool,
    deactivated: bool,
    privileges: dict[str, list[bool]] | None = None,
    actor=None,
    reason: str = "",
) -> None:
    """A user's password, activation or privileges (`privileges`: is_staff/is_superuser, each
    [before, after]) changed by any path (admin form, `changepassword`, shell): audit it and
    close every socket the user has open (4401). A socket acts with the user it opened with,
    and its `hello` told the client what that user may do: a staff flag lost must not keep its
    powers, nor one gained stay unseen. `actor`: who did it, when known (the admin); else the
    user for a password change."""
    with transaction.atomic():
        if password_changed:
            audit.security_event(
                event=audit.Event.PASSWORD_CHANGED, actor=actor or user, target=user
            )
        if deactivated:
            audit.security_event(
                event=audit.Event.USER_DEACTIVATED, actor=actor, target=user, reason=reason
            )
        if privileges:
            audit.security_event(
                event=audit.Event.PRIVILEGES_CHANGED, actor=actor, target=user, details=privileges
            )
        if deactivated:
            event = audit.Event.USER_DEACTIVATED
        elif password_changed:
            event = audit.Event.PASSWORD_CHANGED
        else:
            event = audit.Event.PRIVILEGES_CHANGED
        user_sockets_close(user_id=user.pk, reason=USER_CLOSE_REASONS[event])


def second_factor_changed(*, user, device, added: bool, actor=None) -> None:
    """A device that verifies `user`'s sign-ins (accounts.second_factor) became theirs and
    confirmed (`added`), or stopped being so (deleted, unconfirmed, moved to another account).

    Audited either way, with the device's kind and name, never its key or codes. A removal
    closes the user's sockets: their staff powers may rest on it (accounts.signals).
    """
    with transaction.atomic():
        audit.security_event(
            event=audit.Event.SECOND_FACTOR_ADDED if added else audit.Event.SECOND_FACTOR_REMOVED,
            actor=actor,
            target=user,
            details={"device": device._meta.model_name, "name": device.name[:64]},
        )
        if not added and settings.CHAT_ADMIN_REQUIRE_OTP:  # else staff powers never needed it
            user_sockets_close(
                user_id=user.pk, reason=USER_CLOSE_REASONS[audit.Event.SECOND_FACTOR_REMOVED]
            )


def user_deleted(*, user, actor=None) -> None:
    """A user was deleted (the admin, the shell; `post_delete`, so `user` keeps its key): audit
    it and close the sockets they still have open (4401). Their memberships went with the row,
    but an open socket keeps its room's feed until something closes it."""
    with transaction.atomic():
        # The audit rows keep the id and the name: their user columns have no constraint.
        audit.security_event(
            event=audit.Event.USER_DELETED,
            actor=actor,
            target=user,
            details={"username": user.get_username()},
        )
        user_sockets_close(user_id=user.pk, reason=USER_CLOSE_REASONS[audit.Event.USER_DELETED])


def user_reactivate(*, actor, user) -> None:
    with transaction.atomic():
        if User.objects.filter(pk=user.pk, is_active=False).update(is_active=True):
            user.is_active = True
            audit.security_event(event=audit.Event.USER_REACTIVATED, actor=actor, target=user)


def user_logged_out(
    *, user, credential: str, method: str, ip: str | None, rotated: bool = False
) -> None:
    """One login ended (session logout, or JWT logout with its refresh token blacklisted):
    audit it, refuse that login's remaining access tokens (JWT), close its sockets (4401).
    `rotated`: the JWT logout presented a refresh token already rotated, so the login's newest
    one, which someone else holds, is refused too (accounts.services.login_end).

    The row names the login (`credential`: a digest of the session key, or the JWT family id,
    neither of which signs anyone in), so that a socket whose revocation was lost can be closed
    by the hub without closing the user's other logins' (chat.hub.Hub._catch_up_changes)."""
    with transaction.atomic():
        details = {"method": method, **({"rotated_token": True} if rotated else {})}
        if credential:
            details["credential"] = credential
        audit.security_event(
            event=audit.Event.LOGOUT, actor=user, target=user, ip=ip, details=details
        )
        if not credential:
            return
        login_end(user=user, credential=credential, jwt=method == "jwt", refresh=rotated)
        user_sockets_close(
            user_id=user.pk, credential=credential, reason=USER_CLOSE_REASONS[audit.Event.LOGOUT]
        )


def jwt_logout(*, token: str, ip: str | None) -> None:
    """Log out with refresh token `token`: blacklist it and end its login (user_logged_out).
    One already rotated still ends its login: its owner, whose token a thief rotated first, must
    be able to end the thief's access too. TokenError for any other refused token."""
    try:
        refresh = RefreshToken(token)
    except TokenError:
        rotated = rotated_refresh(token)
        if rotated is None or rotated.family is None:
            raise
        user_id, family, refresh = rotated.user_id, rotated.family, None
    else:
        user_id, family = refresh.get("user_id"), refresh.get(FAMILY_CLAIM)
    user = selectors.user_by_id(user_id)
    with transaction.atomic():
        if refresh is not None:
            refresh.blacklist()
        if user is not None:
            user_logged_out(
                user=user,
                credential=credential_for_jwt(family) if family else "",
                method="jwt",
                ip=ip,
                rotated=refresh is None,
            )


def refresh_token_refused(*, token: str, ip: str | None) -> None:
    """A refresh request was refused: if `token` is a genuine refresh token blacklisted more than
    accounts.services.REFRESH_REUSE_GRACE ago (a reuse, not a race with its rotation), its login
    ends (refresh_token_reused), once."""
    rotated = rotated_refresh(token)
    if rotated is None or not rotated.reused or rotated.family is None:
        return
    credential = credential_for_jwt(rotated.family)
    user = selectors.user_by_id(rotated.user_id)
    if user is None or login_has_ended(credential):
        return  # ended already: one audit row, not one a request
    refresh_token_reused(user=user, credential=credential, ip=ip)


def refresh_token_reused(*, user, credential: str, ip: str | None) -> None:
    """A refresh token was presented again after its rotation (accounts.services
    .REFRESH_REUSE_GRACE): two holders of one login, one of them not its owner, and nothing
    tells which. The login ends for both, as a logout would, its newest refresh token included;
    its owner signs in again."""
    with transaction.atomic():
        audit.security_event(
            event=audit.Event.REFRESH_REUSED,
            target=user,
            ip=ip,
            details={"method": "jwt", "credential": credential},  # as a logout's row names it
        )
        login_end(user=user, credential=credential, jwt=True, refresh=True)
        user_sockets_close(
            user_id=user.pk,
            credential=credential,
            reason=USER_CLOSE_REASONS[audit.Event.REFRESH_REUSED],
        )


def user_sockets_close(*, user_id: int, reason: str, credential: str | None = None) -> None:
    """Close the user's sockets everywhere (only those opened with `credential`, if given), 4401.

    The tickets of that login are revoked too, so none of them opens a socket afterwards.
    """
    tickets_revoke_for_login(user_id=user_id, credential=credential)
    broadcast.publish(
        broadcast.user_group(user_id),
        broadcast.revoke_event(
            user_id=user_id, credential=credential, code=CLOSE_UNAUTHORIZED, reason=reason
        ),
    )


# --- helpers -------------------------------------------------------------------------------------


def membership_state(membership: Membership | None) -> dict[str, Any] | None:
    if membership is None:
        return None
    return {
        "role": membership.role,
        "muted_until": frames.iso(membership.muted_until),
        "banned_at": frames.iso(membership.banned_at),
    }


def _lock_room(room_id: int) -> None:
    """Lock the room's row for the rest of the transaction, as message_store_many does while it
    checks its senders' memberships and writes: a membership change then commits wholly before
    or after each batch of messages, and each deletion or restoration, which read the actor's
    membership under it. Locking the membership row alone would not do: a sender with no row
    (an outsider in a public room) has none to lock, and the others read rows without locking
    them. Taken first, before any membership or message row, in the store's order."""
    sql.select_in(Room, [], pk=[room_id], for_update=True)


def _membership(room: Room, user, *, lock: bool = False) -> Membership | None:
    qs = Membership.objects.filter(room=room, user=user)
    if lock:
        qs = qs.select_for_update()
    return qs.first()


def _existing_membership(room: Room, user) -> Membership:
    membership = _membership(room, user, lock=True)
    if membership is None:
        raise NotFound("this user is not a member of the room")
    return membership


def _publish_frame(
    room: Room, text: str, *, seq: int | None = None, version: int | None = None
) -> None:
    broadcast.publish(
        broadcast.room_group(room.pk),
        broadcast.frame_event(room.pk, text, seq=seq, version=version),
    )


def _publish_membership(
    room: Room,
    user,
    membership: Membership | None,
    close: tuple[int, str] | None = None,
    *,
    version: int,
) -> None:
    """`version`: the chain position of the change's audit row (a later change of the user's
    membership, under the room's lock, has a higher one)."""
    text = None
    if membership is not None and close is None:
        text = frames.membership(
            room.slug, role=membership.role, muted_until=membership.muted_until
        )
    broadcast.publish(
        broadcast.room_group(room.pk),
        broadcast.membership_event(
            room.pk, user.pk, membership_state(membership), text, close, version=version
        ),
    )
