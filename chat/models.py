"""Rooms, memberships, messages, and the append-only, hash-chained audit trail."""

import uuid

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

SLUG_RE = r"^[a-z0-9](?:[a-z0-9-]{0,48}[a-z0-9])?$"
MAX_SEQ = 2**63 - 1  # seq is a 64-bit column: larger numbers are no seq at all
slug_validator = RegexValidator(
    SLUG_RE,
    "Use 1-50 lowercase letters, digits or hyphens, starting and ending with a letter or digit.",
)


class Room(models.Model):
    """A chat room. Its messages are numbered 1, 2, 3... without gaps; `last_seq` is the highest."""

    class Visibility(models.TextChoices):
        PUBLIC = "public", "Public: every signed-in user reads and posts"
        PRIVATE = "private", "Private: members only"
        READ_ONLY = "read_only", "Read-only: everyone reads, moderators post"

    slug = models.CharField("slug", max_length=50, unique=True, validators=[slug_validator])
    title = models.CharField("title", max_length=120)
    visibility = models.CharField(
        "visibility", max_length=16, choices=Visibility.choices, default=Visibility.PUBLIC
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name="created by",
    )
    created_at = models.DateTimeField("created at", default=timezone.now)
    archived_at = models.DateTimeField("archived at", null=True, blank=True)
    last_seq = models.PositiveBigIntegerField("last message number", default=0)

    class Meta:
        verbose_name = "room"
        verbose_name_plural = "rooms"
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    @property
    def group_name(self) -> str:
        # Channel-layer group names allow only [a-z0-9._-] and 100 characters: build from the id.
        return f"room.{self.pk}"

    @property
    def is_archived(self) -> bool:
        return self.archived_at is not None


class Membership(models.Model):
    """A user's standing in a room: role, mute, ban. A ban keeps a user out even of public rooms."""

    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        MODERATOR = "moderator", "Moderator"
        MEMBER = "member", "Member"

    room = models.ForeignKey(
        Room, on_delete=models.CASCADE, related_name="memberships", verbose_name="room"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="memberships",
        verbose_name="user",
    )
    role = models.CharField("role", max_length=16, choices=Role.choices, default=Role.MEMBER)
    # Empty for a user who never joined: a ban of an outsider keeps them out with a row of its
    # own, which lifting the ban removes (chat.services.member_unban).
    joined_at = models.DateTimeField("joined at", default=timezone.now, null=True, blank=True)
    muted_until = models.DateTimeField("muted until", null=True, blank=True)
    banned_at = models.DateTimeField("banned at", null=True, blank=True)
    banned_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name="banned by",
    )
    ban_reason = models.CharField("ban reason", max_length=200, blank=True)
    # Highest seq this member has read, for unread counts.
    last_read_seq = models.PositiveBigIntegerField("last read message", default=0)

    class Meta:
        verbose_name = "membership"
        verbose_name_plural = "memberships"
        constraints = [
            models.UniqueConstraint(fields=["room", "user"], name="membership_unique_room_user")
        ]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.room_id} as {self.role}"

    @property
    def is_banned(self) -> bool:
        return self.banned_at is not None


class Message(models.Model):
    """One message in a room, numbered by `seq`. A deleted message stays as a tombstone."""

    # No index of their own on room and author: the unique constraints below lead with them,
    # and every index is one more B-tree insert for every message stored.
    room = models.ForeignKey(
        Room,
        on_delete=models.CASCADE,
        related_name="messages",
        verbose_name="room",
        db_index=False,
    )
    seq = models.PositiveBigIntegerField("number in room")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        related_name="messages",
        verbose_name="author",
        db_index=False,
    )
    body = models.TextField("body")
    # Chosen by the sending client; a re-send with the same id is the same message.
    client_id = models.CharField("client message id", max_length=64)
    created_at = models.DateTimeField("created at", default=timezone.now)
    deleted_at = models.DateTimeField("deleted at", null=True, blank=True)
    deleted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name="deleted by",
        db_index=False,  # indexed below, only where set
    )

    class Meta:
        verbose_name = "message"
        verbose_name_plural = "messages"
        ordering = ["room", "seq"]
        indexes = [
            # For SET_NULL when a user is deleted; nearly every message has no deleter, and a
            # partial index costs an insert nothing then.
            models.Index(
                fields=["deleted_by"],
                name="message_deleted_by",
                condition=models.Q(deleted_by__isnull=False),
            ),
        ]
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="message_unique_room_seq"),
            models.UniqueConstraint(
                fields=["author", "client_id"], name="message_unique_author_client_id"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.room_id}#{self.seq}"

    @property
    def is_deleted(self) -> bool:
        return self.deleted_at is not None


# -------------------------------------------------------------------------------------------------
# Audit trail
#
# Every audit row is a link in ONE hash chain shared by the three tables below: `chain_seq` numbers
# the links 1, 2, 3... and `row_hash` = HMAC(key, previous link's hash, seq, kind, content). A
# ConnectionLog row is two links: its opening (written when the attempt is decided) and its close
# (written once, when the socket ends). chat/audit.py is the only writer; verify_audit_log walks it.
# Foreign keys here never cascade or constrain: a deleted user or room must not rewrite history,
# so each keeps its id and a snapshot (username, room slug) that the chain covers.
# -------------------------------------------------------------------------------------------------


def _audit_fk(model, verbose_name: str, **kwargs):
    return models.ForeignKey(
        model,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=verbose_name,
        **kwargs,
    )


class ChainedRow(models.Model):
    chain_seq = models.PositiveBigIntegerField("chain position", unique=True, editable=False)
    prev_hash = models.CharField("previous link hash", max_length=64, editable=False)
    row_hash = models.CharField("link hash", max_length=64, editable=False)

    class Meta:
        abstract = True


class ConnectionLog(ChainedRow):
    """One WebSocket connection attempt: who, from where, how it was decided, and how it ended."""

    class Transport(models.TextChoices):
        SUBPROTOCOL = "subprotocol", "Sec-WebSocket-Protocol"
        QUERY = "query", "Query string"
        FIRST_FRAME = "first_frame", "First frame"
        NONE = "none", "None"

    class Outcome(models.TextChoices):
        ACCEPTED = "accepted", "Accepted"
        REJECTED = "rejected", "Rejected"

    class Reason(models.TextChoices):
        ORIGIN_DENIED = "origin_denied", "Origin not allowed"
        TICKET_MISSING = "ticket_missing", "No ticket"
        TICKET_INVALID = "ticket_invalid", "Invalid ticket"
        TICKET_EXPIRED = "ticket_expired", "Expired ticket"
        TICKET_REUSED = "ticket_reused", "Ticket already used"
        TICKET_REVOKED = "ticket_revoked", "Ticket revoked"
        IP_MISMATCH = "ip_mismatch", "IP differs from the ticket's"
        ROOM_MISMATCH = "room_mismatch", "Ticket is for another room"
        USER_INACTIVE = "user_inactive", "User inactive or gone"
        FORBIDDEN = "forbidden", "No access to the room"
        NOT_FOUND = "not_found", "Room unknown or archived"
        AUTH_TIMEOUT = "auth_timeout", "No ticket within the time limit"
        TOO_MANY_CONNECTIONS = "too_many_connections", "Too many connections"
        UNAVAILABLE = "unavailable", "A backing service was unavailable"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    jti = models.CharField("ticket id (jti)", max_length=64, blank=True, db_index=True)
    user = _audit_fk(settings.AUTH_USER_MODEL, "user")
    username = models.CharField("username", max_length=150, blank=True, db_index=True)
    room = _audit_fk(Room, "room")
    room_slug = models.CharField("room slug", max_length=50, blank=True)
    ip = models.GenericIPAddressField("client IP", null=True, blank=True, db_index=True)
    origin = models.CharField("Origin header", max_length=255, blank=True)
    user_agent = models.CharField("User-Agent", max_length=256, blank=True)
    transport = models.CharField(
        "ticket transport", max_length=16, choices=Transport.choices, default=Transport.NONE
    )
    outcome = models.CharField("outcome", max_length=16, choices=Outcome.choices)
    reason = models.CharField("reason", max_length=32, choices=Reason.choices, blank=True)
    opened_at = models.DateTimeField("opened at", db_index=True)
    instance = models.CharField("server instance", max_length=100, blank=True)
    # Written once, at close, and sealed by a second chain link.
    closed_at = models.DateTimeField("closed at", null=True, blank=True)
    close_code = models.PositiveIntegerField("close code", null=True, blank=True)
    messages_received = models.PositiveIntegerField("frames received", default=0)
    messages_sent = models.PositiveIntegerField("frames sent", default=0)
    close_chain_seq = models.PositiveBigIntegerField(
        "close chain position", unique=True, null=True, blank=True, editable=False
    )
    close_prev_hash = models.CharField(
        "close previous hash", max_length=64, blank=True, editable=False
    )
    close_hash = models.CharField("close link hash", max_length=64, blank=True, editable=False)

    CHAIN_FIELDS = (
        "id",
        "jti",
        "user_id",
        "username",
        "room_id",
        "room_slug",
        "ip",
        "origin",
        "user_agent",
        "transport",
        "outcome",
        "reason",
        "opened_at",
        "instance",
    )
    CLOSE_CHAIN_FIELDS = ("id", "closed_at", "close_code", "messages_received", "messages_sent")

    class Meta:
        verbose_name = "connection log"
        verbose_name_plural = "connection logs"
        ordering = ["-opened_at"]
        indexes = [
            models.Index(fields=["outcome", "reason", "opened_at"], name="connlog_outcome_idx")
        ]

    def __str__(self) -> str:
        who = self.username or "anonymous"
        return f"{self.outcome} {who} {self.room_slug or '-'} {self.opened_at:%Y-%m-%d %H:%M:%S}"


class MessageLog(ChainedRow):
    """One message event: sent, deleted, restored, or a rejected frame. Never the message body."""

    class Event(models.TextChoices):
        SENT = "sent", "Sent"
        DELETED = "deleted", "Deleted"
        RESTORED = "restored", "Restored"
        REJECTED = "rejected", "Rejected"

    class Reason(models.TextChoices):
        TOO_LONG = "too_long", "Too long"
        INVALID_FRAME = "invalid_frame", "Invalid frame"
        UNKNOWN_TYPE = "unknown_type", "Unknown frame type"
        FORBIDDEN = "forbidden", "Forbidden"
        NOT_FOUND = "not_found", "No such message"
        MUTED = "muted", "Muted"
        RATE_LIMITED = "rate_limited", "Rate limited"

    event = models.CharField("event", max_length=16, choices=Event.choices)
    reason = models.CharField("reason", max_length=32, choices=Reason.choices, blank=True)
    # The actor: the sender, the deleter, or whoever sent the rejected frame.
    user = _audit_fk(settings.AUTH_USER_MODEL, "user")
    username = models.CharField("username", max_length=150, blank=True, db_index=True)
    room = _audit_fk(Room, "room")
    room_slug = models.CharField("room slug", max_length=50, blank=True)
    seq = models.PositiveBigIntegerField("message number", null=True, blank=True)
    connection = _audit_fk(ConnectionLog, "connection")
    ip = models.GenericIPAddressField("client IP", null=True, blank=True)
    created_at = models.DateTimeField("at", db_index=True)

    CHAIN_FIELDS = (
        "event",
        "reason",
        "user_id",
        "username",
        "room_id",
        "room_slug",
        "seq",
        "connection_id",
        "ip",
        "created_at",
    )

    class Meta:
        verbose_name = "message log"
        verbose_name_plural = "message logs"
        ordering = ["-created_at", "-chain_seq"]

    def __str__(self) -> str:
        return f"{self.event} {self.room_slug}#{self.seq or '-'} by {self.username or '-'}"


class SecurityEvent(ChainedRow):
    """A moderation or account event that matters for security: who did what to whom, and why."""

    class Event(models.TextChoices):
        ROOM_CREATED = "room_created", "Room created"
        ROOM_UPDATED = "room_updated", "Room updated"
        ROOM_ARCHIVED = "room_archived", "Room archived"
        MEMBER_ADDED = "member_added", "Member added"
        ROLE_CHANGED = "role_changed", "Role changed"
        MEMBER_MUTED = "member_muted", "Member muted"
        MEMBER_UNMUTED = "member_unmuted", "Member unmuted"
        MEMBER_BANNED = "member_banned", "Member banned"
        MEMBER_UNBANNED = "member_unbanned", "Member unbanned"
        MEMBER_REMOVED = "member_removed", "Member removed"
        TICKET_REFUSED = "ticket_refused", "Ticket refused"
        TICKET_REVOKED = "ticket_revoked", "Ticket revoked"
        LOGIN_SUCCEEDED = "login_succeeded", "Login succeeded"
        LOGIN_FAILED = "login_failed", "Login failed"
        LOGIN_THROTTLED = "login_throttled", "Sign-ins throttled (first refusal of a window)"
        LOGOUT = "logout", "Logout"
        REFRESH_REUSED = "refresh_reused", "Refresh token reused: its login ended"
        PASSWORD_CHANGED = "password_changed", "Password changed"
        USER_DEACTIVATED = "user_deactivated", "User deactivated"
        USER_REACTIVATED = "user_reactivated", "User reactivated"
        PRIVILEGES_CHANGED = "privileges_changed", "Privileges changed (staff, groups, permissions)"
        SECOND_FACTOR_ADDED = "second_factor_added", "Second factor added (a confirmed device)"
        SECOND_FACTOR_REMOVED = "second_factor_removed", "Second factor removed"
        USER_DELETED = "user_deleted", "User deleted"
        RATE_LIMITED = "rate_limited", "Rate limit closed a socket"
        ALERT = "alert", "Alert threshold crossed"
        AUDIT_PRUNED = "audit_pruned", "Audit rows pruned"
        AUDIT_EXPORTED = "audit_exported", "Audit rows exported"
        AUDIT_SPOOLED = "audit_spooled", "Audit rows written late, from the spool"
        AUDIT_SPOOL_REJECTED = "audit_spool_rejected", "Audit spool file rejected"

    event = models.CharField("event", max_length=32, choices=Event.choices, db_index=True)
    actor = _audit_fk(settings.AUTH_USER_MODEL, "actor")
    actor_name = models.CharField("actor username", max_length=150, blank=True, db_index=True)
    target = _audit_fk(settings.AUTH_USER_MODEL, "target user")
    target_name = models.CharField("target username", max_length=150, blank=True, db_index=True)
    room = _audit_fk(Room, "room")
    room_slug = models.CharField("room slug", max_length=50, blank=True)
    ip = models.GenericIPAddressField("client IP", null=True, blank=True, db_index=True)
    reason = models.CharField("reason", max_length=200, blank=True)
    # Small, secret-free facts (old and new role, mute end, counts). Never tokens or bodies.
    details = models.JSONField("details", default=dict, blank=True)
    created_at = models.DateTimeField("at", db_index=True)

    CHAIN_FIELDS = (
        "event",
        "actor_id",
        "actor_name",
        "target_id",
        "target_name",
        "room_id",
        "room_slug",
        "ip",
        "reason",
        "details",
        "created_at",
    )

    class Meta:
        verbose_name = "security event"
        verbose_name_plural = "security events"
        ordering = ["-created_at", "-chain_seq"]

    def __str__(self) -> str:
        target = self.target_name or self.room_slug or "-"
        return f"{self.event} by {self.actor_name or '-'} on {target}"


class AuditChainHead(models.Model):
    """The chain's newest link (a single row, id=1). Writers lock it to append in order."""

    last_seq = models.PositiveBigIntegerField("last chain position", default=0)
    last_hash = models.CharField("last link hash", max_length=64)

    class Meta:
        verbose_name = "audit chain head"

    def __str__(self) -> str:
        return f"audit chain at {self.last_seq}"


class AuditCheckpoint(models.Model):
    """A signed statement: links up to `seq` were pruned; the last of them hashed `row_hash`."""

    seq = models.PositiveBigIntegerField("last pruned chain position", unique=True)
    row_hash = models.CharField("hash of that link", max_length=64)
    created_at = models.DateTimeField("created at", default=timezone.now)
    rows_pruned = models.PositiveIntegerField("rows pruned", default=0)
    signature = models.CharField("HMAC signature", max_length=64)

    class Meta:
        verbose_name = "audit checkpoint"
        verbose_name_plural = "audit checkpoints"
        ordering = ["-seq"]

    def __str__(self) -> str:
        return f"checkpoint at {self.seq}"
