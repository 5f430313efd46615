"""Ticket issue and redemption: the only code that creates or consumes Ticket rows."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from rest_framework_simplejwt.exceptions import ExpiredTokenError, TokenBackendError, TokenError
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.state import token_backend
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken
from rest_framework_simplejwt.utils import datetime_from_epoch, get_md5_hash_password

from accounts import second_factor
from accounts.models import EndedLogin, Ticket
from accounts.tokens import FAMILY_CLAIM, WebSocketTicket, claimed_user_id
from chat import audit, sql
from chat.models import Room

User = get_user_model()
Reason = audit.Reason

# A socket joins its room moments after its ticket is redeemed (the redemption and the join are
# one handshake). Revoking a login also revokes the tickets it redeemed this recently, so a
# socket that was still joining when the revocation was broadcast finds out as it joins.
JOINING_GRACE = timedelta(minutes=1)


class TicketRefused(Exception):
    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class IssuedTicket:
    token: str
    row: Ticket


@dataclass(frozen=True, slots=True)
class Grant:
    """What a redeemed ticket lets a socket do. Not the row: a socket keeps this while it lives."""

    jti: str
    room_id: int
    credential: str


@dataclass(frozen=True, slots=True)
class Redemption:
    """What presenting a ticket came to: a user and their grant, or the precise reason it failed."""

    user: object | None = None
    grant: Grant | None = None
    error: str = ""
    jti: str = ""


def credential_for_session(session_key: str) -> str:
    return "session:" + hashlib.sha256(session_key.encode()).hexdigest()[:32]


def credential_for_jwt(family_id: str) -> str:
    return f"jwt:{family_id}"


def ticket_issue(
    *, user, room, ip: str, user_agent: str = "", credential: str = ""
) -> IssuedTicket:
    """Issue a ticket for `user` to open one socket to `room` from `ip`.

    Whether the user may view the room is the caller's check (chat.permissions). The ticket
    names the device that verified `user`'s credential, if one did, for the socket's staff
    powers (checked again at redemption).
    """
    if not user.is_active:
        raise TicketRefused("inactive users get no tickets")
    token = WebSocketTicket()
    token[jwt_settings.USER_ID_CLAIM] = str(user.pk)
    token["room"] = room.slug
    token["ip"] = ip
    # The password the request was authenticated under, as in access tokens: a password change
    # committed after that check revoked the user's tickets before this one's row existed, and
    # still refuses it at redemption.
    token[jwt_settings.REVOKE_TOKEN_CLAIM] = get_md5_hash_password(user.password)
    device = second_factor.verified_device(user)
    if device is not None:
        token[second_factor.OTP_CLAIM] = device
    # Through chat.sql: on every handshake, and Ticket has no save signals to skip.
    row = sql.build(
        Ticket,
        jti=token[jwt_settings.JTI_CLAIM],
        user_id=user.pk,
        room_id=room.pk,
        ip=ip,
        user_agent=(user_agent or "")[:256],
        credential=credential,
        issued_at=token.current_time,
        expires_at=datetime_from_epoch(token["exp"]),
    )
    sql.insert(row)
    return IssuedTicket(str(token), row)


def ticket_redeem(*, token: str, room_slug: str, ip: str | None) -> Redemption:
    """Check a presented ticket, in order, and consume it atomically if everything holds.

    Order: signature, type, expiry (no leeway), room, IP, user (active, password unchanged since
    the ticket was asked for), then the single-use UPDATE. Every check before the UPDATE leaves
    the ticket unused, so a stolen ticket presented from elsewhere does not burn the owner's.
    """
    if not token.isascii():
        # A JWT is ASCII by its grammar; a first frame's JSON can carry anything (a lone
        # surrogate made PyJWT raise UnicodeEncodeError, which the middleware took for an outage).
        return Redemption(error=Reason.TICKET_INVALID)
    try:
        ticket = WebSocketTicket(token)
    except ExpiredTokenError:
        return Redemption(error=Reason.TICKET_EXPIRED)
    except TokenError:
        return Redemption(error=Reason.TICKET_INVALID)
    jti = str(ticket.get(jwt_settings.JTI_CLAIM, ""))
    if ticket.get("room") != room_slug:
        return Redemption(error=Reason.ROOM_MISMATCH, jti=jti)
    if ip is None or ticket.get("ip") != ip:
        return Redemption(error=Reason.IP_MISMATCH, jti=jti)
    user_id = claimed_user_id(ticket.get(jwt_settings.USER_ID_CLAIM))
    if user_id is None:
        return Redemption(error=Reason.TICKET_INVALID, jti=jti)
    # The ticket row, its user and its room: three lookups by key in one statement.
    row, user, room = sql.get_each(
        (Ticket, None, {"jti": jti}),
        (User, None, {"pk": user_id}),
        (Room, ["slug"], {"slug": room_slug}),
    )
    if row is None or row.user_id != user_id or user is None:
        return Redemption(error=Reason.TICKET_INVALID, jti=jti)
    if not user.is_active:
        return Redemption(error=Reason.USER_INACTIVE, jti=jti)
    if ticket.get(jwt_settings.REVOKE_TOKEN_CLAIM) != get_md5_hash_password(user.password):
        return Redemption(error=Reason.TICKET_REVOKED, jti=jti)
    if room is None or room.pk != row.room_id:
        return Redemption(error=Reason.TICKET_INVALID, jti=jti)
    if not Ticket.objects.claim(row.pk, now=timezone.now(), ip=ip):
        row.refresh_from_db()
        if row.used_at is not None:
            reason = Reason.TICKET_REUSED
        elif row.revoked_at is not None:
            reason = Reason.TICKET_REVOKED
        else:
            reason = Reason.TICKET_EXPIRED
        return Redemption(error=reason, jti=jti)
    # Checked again here, not trusted from the issue: a device removed between the ticket
    # request's check and its row (after the removal revoked the user's tickets) takes the
    # powers from this socket too. A statement more, for staff tickets only.
    second_factor.mark(user, ticket.get(second_factor.OTP_CLAIM))
    return Redemption(user=user, grant=Grant(jti, row.room_id, row.credential), jti=jti)


def tickets_revoke_for_login(*, user_id: int, credential: str | None = None) -> int:
    """End the tickets of one login (or every login of the user) whose sockets may not be open yet.

    Unused tickets can no longer be redeemed (TICKET_REVOKED); recently redeemed ones make a
    socket that is still joining close with 4401 (chat.consumers). Open sockets are closed by
    the revocation broadcast (chat.services.user_sockets_close), which calls this.
    """
    now = timezone.now()
    usable = Ticket.objects.state_conditions(now)["issued"]
    joining = Q(used_at__gte=now - JOINING_GRACE)
    tickets = Ticket.objects.filter(usable | joining, user_id=user_id, revoked_at__isnull=True)
    if credential is not None:
        tickets = tickets.filter(credential=credential)
    return tickets.update(revoked_at=now)


def login_end(*, user, credential: str, jwt: bool, refresh: bool = False) -> None:
    """Record a logged-out login: a JWT login until its last access token has expired, any
    login until a ticket it obtained can no longer be joining a room (chat.selectors
    .socket_context: a ticket request that passed its checks before the logout writes its row
    after the logout revoked the login's tickets). `refresh`: the login may have a refresh
    token the logout could not blacklist (it ended by an older, rotated one): kept until that
    would have expired, since the refresh refuses a token of an ended login."""
    now = timezone.now()
    kept = settings.CHAT_TICKET_LIFETIME + JOINING_GRACE
    if jwt:
        kept = max(kept, jwt_settings.ACCESS_TOKEN_LIFETIME)
    if refresh:
        kept = max(kept, jwt_settings.REFRESH_TOKEN_LIFETIME)
    EndedLogin.objects.update_or_create(
        credential=credential,
        defaults={"user": user, "ended_at": now, "expires_at": now + kept},
    )


# A refresh token presented again this long after its rotation is a reuse, not two requests that
# raced with it (two tabs refreshing at once): two holders of one login, one of them not its
# owner, and the login is ended (RFC 9700 4.14.2).
REFRESH_REUSE_GRACE = timedelta(seconds=10)


@dataclass(frozen=True)
class RotatedRefresh:
    """A genuine, unexpired refresh token that was blacklisted: rotated, or logged out with."""

    user_id: int | None
    family: str | None
    blacklisted_at: datetime

    @property
    def reused(self) -> bool:
        """Presented past the grace a request racing its rotation could have."""
        return timezone.now() - self.blacklisted_at > REFRESH_REUSE_GRACE


def rotated_refresh(token: str) -> RotatedRefresh | None:
    """What a refresh token refused as blacklisted was; None for any other refused token
    (forged, expired, of another type, never issued here)."""
    try:
        payload = token_backend.decode(token, verify=True)  # signature and expiry
    except TokenBackendError:
        return None
    if payload.get(jwt_settings.TOKEN_TYPE_CLAIM) != "refresh":
        return None
    blacklisted_at = (
        BlacklistedToken.objects.filter(token__jti=payload.get(jwt_settings.JTI_CLAIM))
        .values_list("blacklisted_at", flat=True)
        .first()
    )
    if blacklisted_at is None:
        return None
    return RotatedRefresh(
        user_id=claimed_user_id(payload.get(jwt_settings.USER_ID_CLAIM)),
        family=payload.get(FAMILY_CLAIM) or None,
        blacklisted_at=blacklisted_at,
    )


def login_has_ended(credential: str) -> bool:
    # A lookup by key through chat.sql, not the ORM's compiled EXISTS.
    return bool(sql.select_in(EndedLogin, [], credential=[credential]))


def jwt_user_and_login(*, where: dict, credential: str | None) -> tuple[User | None, bool]:
    """The user an access token names (`where`, as simplejwt looks it up) and whether its login
    (`credential`, if it has one) has ended: on every JWT request, so in one statement."""
    lookups: list[sql.Lookup] = [(User, None, where)]
    if credential is not None:
        lookups.append((EndedLogin, [], {"credential": credential}))
    user, *ended = sql.get_each(*lookups)
    return user, bool(ended) and ended[0] is not None


def tickets_revoke(*, actor, tickets) -> int:
    """Revoke unused tickets (admin action); each revocation is audited."""
    now = timezone.now()
    with transaction.atomic():
        # of=self: the user and room rows come along for the audit rows, unlocked. A plain FOR
        # UPDATE locks every joined row on PostgreSQL, and users and rooms are locked room first
        # everywhere else (chat.services), so locking them here could deadlock.
        rows = list(tickets.select_for_update(of=("self",)).unused().select_related("user", "room"))
        Ticket.objects.filter(pk__in=[row.pk for row in rows]).update(revoked_at=now)
        # One append for all of them: one lock of the chain head, not one per ticket.
        audit.append(
            [
                audit.security_event_row(
                    event=audit.Event.TICKET_REVOKED,
                    actor=actor,
                    target=row.user,
                    room=row.room,
                    details={"jti": row.jti},
                )
                for row in rows
            ]
        )
    return len(rows)


def token_digest(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()
