"""Every read used by views, the API, the admin and the sockets."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import (
    BooleanField,
    Case,
    Count,
    ExpressionWrapper,
    F,
    IntegerField,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Value,
    When,
)
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from accounts.models import EndedLogin, Ticket
from chat import frames, permissions, sql
from chat.models import AuditChainHead, ConnectionLog, Membership, Message, Room, SecurityEvent

User = get_user_model()


# The reads of every ticket request and socket handshake go through chat.sql: the ORM's query
# compiler cost several times what SQLite took to answer them.


def room_get(*, slug: str) -> Room | None:
    """The room by slug, if it exists and is not archived: everywhere a user names a room
    (pages, API, tickets), an archived room is an unknown one (404)."""
    return _unarchived(sql.get(Room, slug=slug))


def _unarchived(room: Room | None) -> Room | None:
    return room if room is not None and room.archived_at is None else None


def room_and_membership(*, slug: str, user) -> tuple[Room | None, Membership | None]:
    """The room by slug as room_get finds it, and the user's membership of it: in one statement
    (a ticket request's, a room page's)."""
    if not getattr(user, "is_authenticated", False):
        return room_get(slug=slug), None
    room, membership = sql.get_each(
        (Room, None, {"slug": slug}),
        (Membership, None, {"room": sql.Found(0), "user": user.pk}),
    )
    room = _unarchived(room)
    return room, membership if room is not None else None


@dataclass(slots=True)
class SocketContext:
    room: Room | None
    membership: Membership | None
    user_active: bool
    ticket_revoked: bool = False
    # The audit chain's last position as read: every deletion or restoration at or before it
    # is in what the socket reads from here on (chat.hub: older change frames are dropped).
    audit_seq: int = 0


def socket_context(
    *, room_id: int, user_id: int, jti: str = "", credential: str = ""
) -> SocketContext:
    """Fresh state for a socket that has just subscribed to its room's events: up to six
    lookups by key in one statement (chat.sql.get_each).

    `ticket_revoked`: the login that obtained ticket `jti` (`credential`) ended while the socket
    was joining, after its revocation broadcast went out: its tickets were revoked
    (accounts.services.tickets_revoke_for_login), or it is recorded as ended (a ticket whose
    row was written after that revocation, by a request that had passed its check before).
    """
    lookups: list[sql.Lookup] = [
        (Room, None, {"pk": room_id}),
        (Membership, None, {"room": room_id, "user": user_id}),
        (User, ["is_active"], {"pk": user_id}),
        (AuditChainHead, ["last_seq"], {"pk": 1}),
    ]
    if jti:
        lookups.append((Ticket, ["revoked_at"], {"jti": jti}))
    if credential:
        lookups.append((EndedLogin, [], {"credential": credential}))
    room, membership, user, head, *login = sql.get_each(*lookups)
    if room is None:
        return SocketContext(None, None, False)
    ticket = login.pop(0) if jti else None
    ended = bool(login) and login[0] is not None
    return SocketContext(
        room,
        membership,
        user is not None and user.is_active,
        (ticket is not None and ticket.revoked_at is not None) or ended,
        head.last_seq if head is not None else 0,
    )


def rooms_visible(*, user, after: str | None = None) -> QuerySet[Room]:
    """Rooms the user can see, with their role (`my_role`) and `unread` count, by slug; those
    after the slug `after` if given (a page: see `page_after`)."""
    mine = Membership.objects.filter(room=OuterRef("pk"), user=user)
    qs = Room.objects.filter(archived_at__isnull=True)
    if after is not None:
        qs = qs.filter(slug__gt=after)
    qs = qs.annotate(
        my_role=Subquery(mine.values("role")[:1]),
        my_banned=Subquery(mine.values("banned_at")[:1]),
        my_last_read=Subquery(mine.values("last_read_seq")[:1]),
    )
    if not permissions.has_staff_powers(user):
        # Every membership has a role: my_role says "member" without a join and GROUP BY.
        qs = qs.filter(my_banned__isnull=True).filter(
            ~Q(visibility=Room.Visibility.PRIVATE) | Q(my_role__isnull=False)
        )
    # Unread counts belong to members: a visitor of a public room has read nothing, and is
    # told nothing (None) rather than "every message is unread".
    unread = Greatest(
        F("last_seq") - Coalesce("my_last_read", Value(0), output_field=IntegerField()),
        Value(0),
        output_field=IntegerField(),
    )
    return qs.annotate(
        unread=Case(When(my_role__isnull=False, then=unread), default=Value(None))
    ).order_by("slug")


def rooms_visible_page(*, user, after: str | None, limit: int) -> tuple[list[Room], str | None]:
    """A page of `rooms_visible` (the API's and the room list page's), and the slug the next
    starts after, if any."""
    return page_after(rooms_visible(user=user, after=after), limit=limit, key=attrgetter("slug"))


def room_members(
    *,
    room: Room,
    include_banned: bool = True,
    after: str | None = None,
    usernames: Collection[str] | None = None,
    starting: str | None = None,
) -> QuerySet[Membership]:
    """The room's members by username; those after the username `after`, those among
    `usernames`, and those whose username starts with `starting` (in any case), if given."""
    members = Membership.objects.filter(room=room).select_related("user")
    if not include_banned:
        members = members.filter(banned_at__isnull=True)
    if after is not None:
        members = members.filter(user__username__gt=after)
    if usernames is not None:
        members = members.filter(user__username__in=usernames)
    if starting:
        members = members.filter(user__username__istartswith=starting)
    return members.order_by("user__username")


def page_after(rows: QuerySet, *, limit: int, key: Callable[[Any], Any]) -> tuple[list, Any]:
    """The first `limit` rows of an ordered list, and the key of the last one if more follow
    (else None): the `after` of the next page. Pages by key (the slug, the username, the seq),
    not by offset, so a row added or removed meanwhile neither repeats nor skips another."""
    page = list(rows[: limit + 1])
    if len(page) <= limit:
        return page, None
    page = page[:limit]
    return page, key(page[-1])


_seq = attrgetter("seq")


def messages_page(
    *, room: Room, before: int | None = None, after: int | None = None, limit: int = 50
) -> tuple[list[Message], bool]:
    """Up to `limit` messages before or after a seq (the newest ones if neither), oldest first."""
    qs = Message.objects.filter(room=room).select_related("author")
    if after is not None:
        page, more = page_after(qs.filter(seq__gt=after).order_by("seq"), limit=limit, key=_seq)
        return page, more is not None
    if before is not None:
        qs = qs.filter(seq__lt=before)
    page, more = page_after(qs.order_by("-seq"), limit=limit, key=_seq)
    return page[::-1], more is not None


def message_payloads(messages: list[Message], *, room: Room) -> list[dict]:
    return [
        frames.message_data(
            m, room_slug=room.slug, author_name=m.author.username if m.author else None
        )
        for m in messages
    ]


def changes_between(
    *, room: Room, first: int, last: int, shown_deleted: set[int], most_restored: int
) -> tuple[list[int], list[dict], int]:
    """What changed for a client showing messages first..last, `shown_deleted` of them as
    deleted: the seqs deleted now that it does not show so, and the messages it shows deleted
    that are not deleted now (at most `most_restored`, oldest first), with the seq up to which
    the answer is complete (`last`, or less when restored messages were left for later)."""
    in_range = Message.objects.filter(room=room, seq__gte=first, seq__lte=last)
    deleted_now = set(in_range.filter(deleted_at__isnull=False).values_list("seq", flat=True))
    candidates = sorted(shown_deleted - deleted_now)
    if len(candidates) > most_restored:
        last = candidates[most_restored] - 1
        candidates = candidates[:most_restored]
    restored = (
        list(
            in_range.filter(seq__in=candidates, deleted_at__isnull=True)
            .select_related("author")
            .order_by("seq")
        )
        if candidates
        else []
    )
    deleted = sorted(seq for seq in deleted_now - shown_deleted if seq <= last)
    return deleted, message_payloads(restored, room=room), last


def message_seq_of(*, room_id: int, author_id: int, client_id: str) -> int | None:
    """The seq of the message `author_id` stored in the room under `client_id`, if any."""
    found = sql.select_in(Message, ["room", "seq"], author=[author_id], client_id=[client_id])
    return next((m.seq for m in found if m.room_id == room_id), None)


def message_frames_between(room_id: int, after: int, upto: int) -> list[tuple[int, str]]:
    """Message frames with after < seq <= upto, in order (the hub's gap filling)."""
    rows = list(
        Message.objects.filter(room_id=room_id, seq__gt=after, seq__lte=upto)
        .select_related("author", "room")
        .order_by("seq")
    )
    if not rows:
        return []
    payloads = message_payloads(rows, room=rows[0].room)
    return [(data["seq"], frames.message(data)) for data in payloads]


def rooms_last_seq(room_ids: list[int]) -> dict[int, int]:
    """Each room's last stored seq (the hub's catch-up), by room id."""
    return {room.pk: room.last_seq for room in sql.select_in(Room, ["last_seq"], pk=room_ids)}


@dataclass(frozen=True, slots=True)
class SocketChange:
    """An audited change that reaches open sockets as a hub event (chat.services)."""

    seq: int  # its audit row's chain position: the version its hub event carried
    event: str
    user_id: int | None
    room_id: int | None
    credential: str = ""  # a logout's login
    details: dict[str, Any] = field(default_factory=dict)  # its audit row's


def socket_changes_after(
    *,
    after: int,
    room_ids: Collection[int],
    user_ids: Collection[int],
    room_events: Collection[str],
    user_events: Collection[str],
    limit: int,
) -> tuple[list[SocketChange], int]:
    """The changes audited after chain position `after` that concern the given rooms and users
    (the hub's, chat.hub.Hub._catch_up_changes): `room_events` in the rooms, `user_events` of
    the users; the first `limit`, in chain order. With the position they are complete up to:
    the last one's when `limit` cut them short, else the last security event's (the chain may
    have more rows, of the other audit models).

    One statement, a range scan of the chain_seq index from `after`: the last security event
    comes along as a row of its own, so a quiet stretch still moves the position on."""
    change = Q(event__in=room_events, room_id__in=room_ids) | Q(
        event__in=user_events, target_id__in=user_ids
    )
    newest = SecurityEvent.objects.order_by("-chain_seq").values("chain_seq")[:1]
    rows = list(
        SecurityEvent.objects.filter(change | Q(chain_seq=Subquery(newest)), chain_seq__gt=after)
        .annotate(change=ExpressionWrapper(change, output_field=BooleanField()))
        .order_by("chain_seq")
        .values_list("chain_seq", "event", "target_id", "room_id", "details", "change")[:limit]
    )
    changes = [
        SocketChange(seq, event, user_id, room_id, details.get("credential", ""), details)
        for seq, event, user_id, room_id, details, matched in rows
        if matched
    ]
    return changes, rows[-1][0] if rows else after


def user_get(*, username: str):
    return User.objects.filter(username=username).first()


def user_by_id(user_id) -> object | None:
    if user_id in (None, ""):
        return None
    return User.objects.filter(pk=user_id).first()


# --- security overview (admin) -------------------------------------------------------------------


def connections_live(*, now: datetime) -> QuerySet[ConnectionLog]:
    """Accepted connections not closed yet, opened within CHAT_MAX_CONNECTION_AGE.

    The server ends every socket at that age, so an older row without a close is a process that
    died before writing it, not a live socket.
    """
    oldest = now - timedelta(seconds=settings.CHAT_MAX_CONNECTION_AGE)
    return ConnectionLog.objects.filter(
        outcome=ConnectionLog.Outcome.ACCEPTED, closed_at__isnull=True, opened_at__gte=oldest
    ).order_by("-opened_at")


@dataclass(frozen=True, slots=True)
class ReasonCount:
    reason: str
    label: str
    count: int


def rejections_by_reason(*, since: datetime) -> list[ReasonCount]:
    rows = (
        ConnectionLog.objects.filter(outcome=ConnectionLog.Outcome.REJECTED, opened_at__gte=since)
        .values("reason")
        .annotate(count=Count("pk"))
        .order_by("-count", "reason")
    )
    labels = dict(ConnectionLog.Reason.choices)
    return [
        ReasonCount(r["reason"], labels.get(r["reason"], r["reason"]), r["count"]) for r in rows
    ]


@dataclass(frozen=True, slots=True)
class IpRejections:
    ip: str
    count: int
    # The condition chat.audit._count_rejection logs to chat.security and records as an ALERT.
    over_threshold: bool


def rejections_top_ips(*, since: datetime, limit: int = 10) -> list[IpRejections]:
    rows = (
        ConnectionLog.objects.filter(
            outcome=ConnectionLog.Outcome.REJECTED, opened_at__gte=since, ip__isnull=False
        )
        .values("ip")
        .annotate(count=Count("pk"))
        .order_by("-count", "ip")[:limit]
    )
    threshold = settings.CHAT_SECURITY_ALERT_THRESHOLD
    return [IpRejections(r["ip"], r["count"], r["count"] >= threshold) for r in rows]


def security_alerts_recent(*, limit: int = 20) -> QuerySet[SecurityEvent]:
    return SecurityEvent.objects.filter(event=SecurityEvent.Event.ALERT).order_by("-chain_seq")[
        :limit
    ]


@dataclass(frozen=True, slots=True)
class SecurityOverview:
    now: datetime
    live_count: int
    live: list[ConnectionLog]
    rejections_last_hour: list[ReasonCount]
    alert_window: int
    alert_threshold: int
    top_ips: list[IpRejections]
    alerts: list[SecurityEvent]

    @property
    def rejected_last_hour(self) -> int:
        return sum(r.count for r in self.rejections_last_hour)


def security_overview(*, now: datetime | None = None, rows: int = 100) -> SecurityOverview:
    """What the admin's security overview shows, as of `now`."""
    now = now or timezone.now()
    live = connections_live(now=now)
    window = settings.CHAT_SECURITY_ALERT_WINDOW
    return SecurityOverview(
        now=now,
        live_count=live.count(),
        live=list(live[:rows]),
        rejections_last_hour=rejections_by_reason(since=now - timedelta(hours=1)),
        alert_window=window,
        alert_threshold=settings.CHAT_SECURITY_ALERT_THRESHOLD,
        top_ips=rejections_top_ips(since=now - timedelta(seconds=window)),
        alerts=list(security_alerts_recent()),
    )
