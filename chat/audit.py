"""The single writer of audit rows: each row becomes a link in one HMAC chain (chat/models.py)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max, Q
from django.utils import timezone
from django.utils.ipv6 import clean_ipv6_address

from accounts.ip import limit_key
from chat import metrics, sql
from chat.models import (
    AuditChainHead,
    AuditCheckpoint,
    ChainedRow,
    ConnectionLog,
    MessageLog,
    SecurityEvent,
)
from chat.protocol import handshake_header
from chat.state import StateUnavailable
from chatproject.dbthread import database_sync_to_async

logger = logging.getLogger("chat.audit")

GENESIS_HASH = "0" * 64

# Link kinds, part of every link's hash.
KIND_CONNECTION_OPEN = "connection.open"
KIND_CONNECTION_CLOSE = "connection.close"
KIND_MESSAGE = "message"
KIND_SECURITY = "security"

_KIND_BY_MODEL = {
    ConnectionLog: KIND_CONNECTION_OPEN,
    MessageLog: KIND_MESSAGE,
    SecurityEvent: KIND_SECURITY,
}

# Re-exported names, so callers write audit.Reason.TICKET_EXPIRED and never a bare string.
Reason = ConnectionLog.Reason
Outcome = ConnectionLog.Outcome
Transport = ConnectionLog.Transport
MessageEvent = MessageLog.Event
MessageReason = MessageLog.Reason
Event = SecurityEvent.Event


@dataclass(frozen=True, slots=True)
class ConnectionClose:
    """The closing facts of a ConnectionLog row, appended to the chain as its own link."""

    connection_id: UUID
    closed_at: datetime
    close_code: int | None
    messages_received: int
    messages_sent: int


AuditItem = ConnectionLog | MessageLog | SecurityEvent | ConnectionClose


# --- hashing -------------------------------------------------------------------------------------


def canonical_value(value: Any) -> Any:
    """A value as the chain hashes it: times in UTC to the microsecond, UUIDs as strings."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, UUID):
        return str(value)
    return value


# Built once: json.dumps() with options builds an encoder per call, and a link is hashed for
# every audit row. The format is docs/audit.md's (tests/chat/test_audit_chain.py pins it).
_CANONICAL = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def canonical_content(values: Iterable[Any]) -> str:
    return _CANONICAL.encode([canonical_value(v) for v in values])


@functools.lru_cache(maxsize=4)
def _keyed_hmac(key: str) -> hmac.HMAC:
    """The HMAC with the key already absorbed; each link hashes a copy."""
    return hmac.new(key.encode(), digestmod=hashlib.sha256)


def link_hash(prev_hash: str, seq: int, kind: str, content: str) -> str:
    mac = _keyed_hmac(settings.CHAT_AUDIT_HMAC_KEY).copy()
    mac.update(f"{prev_hash}|{seq}|{kind}|{content}".encode())
    return mac.hexdigest()


def row_content(row: ChainedRow | ConnectionLog, *, close: bool = False) -> str:
    fields = row.CLOSE_CHAIN_FIELDS if close else row.CHAIN_FIELDS
    return canonical_content(getattr(row, f) for f in fields)


def checkpoint_signature(seq: int, row_hash: str, created_at: datetime, rows_pruned: int) -> str:
    return link_hash(row_hash, seq, "checkpoint", canonical_content([created_at, rows_pruned]))


def spool_signature(body: str) -> str:
    """A spool file's signature (chat/spool.py), under the chain's key as a checkpoint's is."""
    return link_hash("", 0, "spool", body)


# --- normalising what goes in --------------------------------------------------------------------


def _clean_text(value: str | None, max_length: int) -> str:
    # PostgreSQL refuses NUL in text, and a value must hash the same before and after storage.
    return (value or "").replace("\x00", "")[:max_length]


@functools.lru_cache(maxsize=4096)  # a client sends many rows from one address
def _clean_ip(value: str | None) -> str | None:
    """The address exactly as GenericIPAddressField will store it, so it hashes the same after
    a round trip: no zone (`fe80::1%eth0`), IPv6 in Django's notation (which writes
    IPv4-mapped addresses as ::ffff:a.b.c.d, where Python 3.11 writes ::ffff:xxxx:xxxx)."""
    if not value:
        return None
    try:
        address = ipaddress.ip_address(str(value).split("%", 1)[0])
    except ValueError:
        return None
    return clean_ipv6_address(str(address)) if address.version == 6 else str(address)


@functools.cache
def _cleaning_plan(model) -> tuple[tuple[str, str, int | None], ...]:
    """(attribute, kind, max_length) of the fields to clean before hashing, per model."""
    plan = []
    for field in model._meta.concrete_fields:
        kind = field.get_internal_type()
        if field.name in ("chain_seq", "prev_hash", "row_hash", "close_prev_hash", "close_hash"):
            continue
        if kind in ("GenericIPAddressField", "CharField"):
            plan.append((field.attname, kind, field.max_length))
    return tuple(plan)


def _normalise(row: ChainedRow) -> None:
    for attname, kind, max_length in _cleaning_plan(type(row)):
        value = getattr(row, attname)
        if kind == "GenericIPAddressField":
            setattr(row, attname, _clean_ip(value))
        elif isinstance(value, str):
            setattr(row, attname, _clean_text(value, max_length))
    # Databases keep microseconds; never more.
    for name in ("opened_at", "created_at"):
        if hasattr(row, name) and getattr(row, name) is None:
            setattr(row, name, timezone.now())


# --- the writer ----------------------------------------------------------------------------------


def append(items: list[AuditItem]) -> int:
    """Append `items` to the chain, in order, inside the caller's transaction (or a new one);
    return how many were skipped as already in the chain (see _not_yet_stored).

    This is the only code that inserts or seals audit rows.
    """
    if not items:
        return 0
    with transaction.atomic():
        head = _locked_head()
        given = len(items)
        items = _not_yet_stored(items)
        closes = [i for i in items if isinstance(i, ConnectionClose)]
        open_ids: set[UUID] = set()
        if closes:
            # Seal only rows that exist (stored, or opened earlier in this batch) and are still
            # open: a chain position is never allocated for nothing.
            open_ids = {i.id for i in items if isinstance(i, ConnectionLog)}
            open_ids |= {
                row.pk
                for row in sql.select_in(
                    ConnectionLog, ["close_chain_seq"], pk=[c.connection_id for c in closes]
                )
                if row.close_chain_seq is None
            }
        inserts: dict[type, list[ChainedRow]] = {
            ConnectionLog: [],
            MessageLog: [],
            SecurityEvent: [],
        }
        sealed: list[ConnectionLog] = []
        seq, prev = head.last_seq, head.last_hash
        for item in items:
            if isinstance(item, ConnectionClose):
                if item.connection_id not in open_ids:
                    continue
                open_ids.discard(item.connection_id)
                row = sql.build(  # only what the seal writes; positionally, as below
                    ConnectionLog,
                    id=item.connection_id,
                    closed_at=item.closed_at,
                    close_code=item.close_code,
                    messages_received=item.messages_received,
                    messages_sent=item.messages_sent,
                )
                seq += 1
                row.close_chain_seq, row.close_prev_hash = seq, prev
                row.close_hash = prev = link_hash(
                    prev, seq, KIND_CONNECTION_CLOSE, row_content(row, close=True)
                )
                sealed.append(row)
                continue
            _normalise(item)
            seq += 1
            item.chain_seq, item.prev_hash = seq, prev
            item.row_hash = prev = link_hash(
                prev, seq, _KIND_BY_MODEL[type(item)], row_content(item)
            )
            inserts[type(item)].append(item)
        # Connections first: message rows of the same batch refer to them.
        for rows in inserts.values():
            sql.insert_many(rows)
        if sealed:
            _seal(sealed)
        sql.update_many(AuditChainHead, ["last_seq", "last_hash"], [(1, [seq, prev])])
        if inserts[MessageLog]:
            # Counted once recorded: a batch rolled back and stored again, or a flush retried,
            # is still one event a row.
            transaction.on_commit(functools.partial(_count_message_events, inserts[MessageLog]))
    return given - len(items)


def _count_message_events(rows: list[MessageLog]) -> None:
    for row in rows:
        metrics.MESSAGE_EVENTS.labels(row.event, row.reason).inc()


def _not_yet_stored(items: list[AuditItem]) -> list[AuditItem]:
    """`items` without the rows an earlier append already stored.

    A row an append has tried carries the chain position and hash that append gave it. When the
    COMMIT reached the database but its answer did not reach the process, the row was kept for
    a retry (or spooled) though the chain holds it: looking its position up (a unique index)
    keeps the retry from writing it twice. A row never tried has no hash and costs no lookup.
    Closes need no check: an append seals only connections still open.
    """
    tried = [i for i in items if not isinstance(i, ConnectionClose) and i.row_hash]
    if not tried:
        return items
    stored: set[tuple[type, int, str]] = set()
    for model in (ConnectionLog, MessageLog, SecurityEvent):
        positions = [i.chain_seq for i in tried if type(i) is model]
        if positions:
            found = sql.select_in(model, ["chain_seq", "row_hash"], chain_seq=positions)
            stored |= {(model, row.chain_seq, row.row_hash) for row in found}
    return [
        i
        for i in items
        if isinstance(i, ConnectionClose) or (type(i), i.chain_seq, i.row_hash) not in stored
    ]


class ChainHeadMissing(RuntimeError):
    pass


def lock_chain() -> None:
    """Take the chain's append lock for the rest of the caller's transaction: for a writer that
    must look at the chain before it appends, with no other append in between."""
    _locked_head()


def _locked_head() -> AuditChainHead:
    head = _head_for_update()
    if head is not None:
        return head
    # The migration creates the head; only a trail with no rows at all may start over (a flushed
    # test database). Rows without a head mean someone removed it: refuse to write.
    if any(m.objects.exists() for m in (ConnectionLog, MessageLog, SecurityEvent)):
        # Unless another process started the trail since the read above: its head and its
        # first rows commit together, so rows seen now mean its head is there to be read.
        head = _head_for_update()
        if head is None:
            raise ChainHeadMissing("the audit chain head is missing while audit rows exist")
        return head
    AuditChainHead.objects.get_or_create(pk=1, defaults={"last_seq": 0, "last_hash": GENESIS_HASH})
    head = _head_for_update()
    assert head is not None  # found or made above, in this transaction
    return head


def _head_for_update() -> AuditChainHead | None:
    """The chain's head, locked for the rest of the transaction (SELECT ... FOR UPDATE)."""
    found = sql.select_in(AuditChainHead, ["last_seq", "last_hash"], pk=[1], for_update=True)
    return found[0] if found else None


_SEAL_FIELDS = (
    "closed_at",
    "close_code",
    "messages_received",
    "messages_sent",
    "close_chain_seq",
    "close_prev_hash",
    "close_hash",
)


def _seal(rows: list[ConnectionLog]) -> None:
    """Write the close columns of connection rows (bulk_update would cost more than the rows)."""
    sql.update_many(
        ConnectionLog,
        _SEAL_FIELDS,
        ((row.pk, [getattr(row, f) for f in _SEAL_FIELDS]) for row in rows),
    )


_acting_user: contextvars.ContextVar = contextvars.ContextVar("audit_acting_user", default=None)


@contextlib.contextmanager
def acting_as(user):
    """Who is behind changes recorded by signal handlers meanwhile (e.g. an admin's edit of a
    user), which otherwise have no request to ask."""
    token = _acting_user.set(user)
    try:
        yield
    finally:
        _acting_user.reset(token)


def acting_user():
    return _acting_user.get()


def security_event(**fields) -> SecurityEvent:
    """Record a moderation or account event now, in the caller's transaction.

    Takes the keyword arguments of security_event_row().
    """
    row = security_event_row(**fields)
    append([row])
    return row


def security_event_row(
    *,
    event: str,
    actor=None,
    target=None,
    room=None,
    ip: str | None = None,
    reason: str = "",
    details: dict | None = None,
) -> SecurityEvent:
    """Build (not write) a SecurityEvent row; for AuditBuffer.add() on the socket path."""
    return SecurityEvent(
        event=event,
        actor_id=getattr(actor, "pk", None),
        actor_name=getattr(actor, "username", "") or "",
        target_id=getattr(target, "pk", None),
        target_name=getattr(target, "username", "") or "",
        room_id=getattr(room, "pk", None),
        room_slug=getattr(room, "slug", "") or "",
        ip=ip,
        reason=reason,
        details=details or {},
        created_at=timezone.now(),
    )


def message_log(
    *,
    event: str,
    user=None,
    room=None,
    seq: int | None = None,
    reason: str = "",
    connection_id: UUID | None = None,
    ip: str | None = None,
    at: datetime | None = None,
) -> MessageLog:
    """Build (not write) a MessageLog row; pass it to append() or AuditBuffer.add().

    `at` is when it happened (default: now); a batch of messages passes its one timestamp, the
    messages' own created_at.
    """
    return sql.build(  # not MessageLog(...): one per message, on the hot path
        MessageLog,
        event=event,
        reason=reason,
        user_id=getattr(user, "pk", None),
        username=getattr(user, "username", "") or "",
        room_id=getattr(room, "pk", None),
        room_slug=getattr(room, "slug", "") or "",
        seq=seq,
        connection_id=connection_id,
        ip=ip,
        created_at=at or timezone.now(),
    )


# --- batching for the socket path ----------------------------------------------------------------


# The name of an AuditBuffer's database-write task: finish_event_loop() lets it finish.
WRITE_TASK_NAME = "chat-audit-write"


class AuditBuffer:
    """Collects audit rows from sockets in this process and appends them in batches, in order.

    A row waits at most CHAT_AUDIT_FLUSH_INTERVAL; `flush()` (called on every socket's exit and at
    shutdown) writes everything queued, so a clean shutdown loses nothing.
    """

    def __init__(self) -> None:
        self._items: list[AuditItem] = []
        self._lock = asyncio.Lock()
        self._scheduled: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writing: asyncio.Task[bool] | None = None

    def add(self, item: AuditItem) -> None:
        self._items.append(item)
        if self._scheduled is None:
            loop = asyncio.get_running_loop()
            self._scheduled = loop.call_later(settings.CHAT_AUDIT_FLUSH_INTERVAL, self._flush_soon)

    def _flush_soon(self) -> None:
        self._scheduled = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return len(self._items)

    async def flush(self) -> None:
        """Write everything queued, in order; on a database failure keep the rest for a retry.

        The database write runs in a task of its own (WRITE_TASK_NAME) that cancelling the caller
        does not stop: at shutdown every socket's task is cancelled, possibly mid-flush, and the
        rows in flight must still end up written or kept, never dropped.
        """
        async with self._lock:
            while self._items or self._writing is not None:
                if self._writing is None:
                    items, self._items = self._items, []
                    self._writing = asyncio.get_running_loop().create_task(
                        self._write(items), name=WRITE_TASK_NAME
                    )
                if not await asyncio.shield(self._writing):
                    return  # kept for a retry

    async def _write(self, items: list[AuditItem]) -> bool:
        try:
            await database_sync_to_async(append)(items)
            return True
        except IntegrityError:
            # A row the database refuses (a duplicate) must not hold back the others:
            # write them one by one, and report what could not be written.
            unwritten = await database_sync_to_async(_append_each)(items)
            if unwritten:
                self._keep_for_retry(unwritten)
                return False
            return True
        except Exception:
            logger.exception("audit flush failed")
            self._keep_for_retry(items)
            return False
        finally:
            self._writing = None

    def spool(self) -> None:
        """At shutdown, after the last flush: keep on disk what the database would not take, for
        the next start to append (chat/spool.py). Nothing is queued after a clean flush."""
        items, self._items = self._items, []
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if not items:
            return
        from chat import spool  # spool builds on this module

        try:
            path = spool.save(items)
        except Exception:
            logger.exception("%d audit rows could not be written or spooled: lost", len(items))
            return
        logger.error(
            "%d audit rows could not be written before shutdown; kept in %s for the next start",
            len(items),
            path,
        )

    def _keep_for_retry(self, items: list[AuditItem]) -> None:
        """The database is unavailable: keep the rows, in order, ahead of anything queued
        meanwhile, and retry shortly."""
        self._items[:0] = items
        logger.warning("%d audit rows kept for retry", len(items))
        if self._scheduled is None:
            self._scheduled = asyncio.get_running_loop().call_later(1.0, self._flush_soon)


def _append_each(items: list[AuditItem]) -> list[AuditItem]:
    """Append one by one, dropping (and logging) rows the database refuses; returns the rows not
    written because the database itself failed meanwhile, to be kept for a retry."""
    for index, item in enumerate(items):
        try:
            append([item])
        except IntegrityError:
            logger.error("audit row refused by the database and not written: %r", item)
        except Exception:
            logger.exception("audit flush failed")
            return items[index:]
    return []


# --- reading the chain back ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Link:
    seq: int
    kind: str
    prev_hash: str
    row_hash: str
    content: str
    label: str


def iter_links(after_seq: int = 0, upto_seq: int | None = None) -> Iterator[Link]:
    """Every link after `after_seq` (up to `upto_seq`), in chain order, recomputing content from
    the stored rows."""
    import heapq

    def window(field: str) -> dict[str, int]:
        bounds = {f"{field}__gt": after_seq}
        if upto_seq is not None:
            bounds[f"{field}__lte"] = upto_seq
        return bounds

    def conn_close() -> Iterator[Link]:
        rows = ConnectionLog.objects.filter(**window("close_chain_seq")).order_by("close_chain_seq")
        for r in rows.iterator(chunk_size=2000):
            yield Link(
                r.close_chain_seq,
                KIND_CONNECTION_CLOSE,
                r.close_prev_hash,
                r.close_hash,
                row_content(r, close=True),
                f"ConnectionLog {r.id} (close)",
            )

    def opening(model, kind, suffix: str = "") -> Iterator[Link]:
        rows = model.objects.filter(**window("chain_seq")).order_by("chain_seq")
        for r in rows.iterator(chunk_size=2000):
            yield Link(
                r.chain_seq,
                kind,
                r.prev_hash,
                r.row_hash,
                row_content(r),
                f"{model.__name__} {r.pk}{suffix}",
            )

    yield from heapq.merge(
        opening(ConnectionLog, KIND_CONNECTION_OPEN, " (opening)"),
        conn_close(),
        opening(MessageLog, KIND_MESSAGE),
        opening(SecurityEvent, KIND_SECURITY),
        key=lambda link: link.seq,
    )


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    links_checked: int
    first_bad_seq: int | None = None
    problem: str = ""


def verify_chain() -> VerifyResult:
    """Walk the chain from the newest checkpoint (or the start) and report the first broken link.

    The head is read first and the walk stops there: writers append meanwhile (each append
    moves the head in the same transaction as its rows), and what they add is for the next
    verification. Besides the links themselves, no audit row may sit where the walk does not
    look (at or below its start), and a connection without a close link has no close data.

    A prune that commits during the walk (another process) removes rows the walk was about to
    read: a walk that failed is made again if a newer checkpoint has appeared since it began,
    from that checkpoint, whose signature it checks as any other. A batched prune commits a
    checkpoint per step, so this repeats for as long as the checkpoint moves (each time it has
    moved forward, so a prune's end ends it).
    """
    began_after = _newest_checkpoint_seq()
    result = _verify_walk()
    while not result.ok and (newest := _newest_checkpoint_seq()) != began_after:
        began_after = newest
        result = _verify_walk()
    return result


def _newest_checkpoint_seq() -> int:
    return AuditCheckpoint.objects.order_by("-seq").values_list("seq", flat=True).first() or 0


def _verify_walk() -> VerifyResult:
    head = AuditChainHead.objects.filter(pk=1).first()
    # Every checkpoint, not only the newest the walk starts from: the older ones are the signed
    # record of what each prune took, and when.
    checkpoint = None
    for checkpoint in AuditCheckpoint.objects.order_by("seq").iterator(chunk_size=2000):
        signature = checkpoint_signature(
            checkpoint.seq, checkpoint.row_hash, checkpoint.created_at, checkpoint.rows_pruned
        )
        if not hmac.compare_digest(signature, checkpoint.signature):
            return VerifyResult(False, 0, checkpoint.seq, "checkpoint signature is invalid")
    expected_seq, prev = 0, GENESIS_HASH
    if checkpoint is not None:
        expected_seq, prev = checkpoint.seq, checkpoint.row_hash
        # Connections kept across a prune (their close came later) still hold an opening link
        # below the checkpoint: its neighbours are gone, but its own hash must still match.
        kept = ConnectionLog.objects.filter(chain_seq__lte=checkpoint.seq).order_by("chain_seq")
        for row in kept.iterator(chunk_size=2000):
            content = row_content(row)
            if (
                link_hash(row.prev_hash, row.chain_seq, KIND_CONNECTION_OPEN, content)
                != row.row_hash
            ):
                return VerifyResult(
                    False, 0, row.chain_seq, f"ConnectionLog {row.id} (opening) was altered"
                )
    start = expected_seq
    if stray := _rows_outside_the_walk(start, checkpoint):
        return VerifyResult(False, 0, *stray)
    checked = 0
    for link in iter_links(after_seq=expected_seq, upto_seq=head.last_seq if head else 0):
        expected_seq += 1
        if link.seq != expected_seq:
            if link.seq > expected_seq:
                problem = f"link {expected_seq} is missing (next stored link is {link.label})"
            else:
                problem = f"{link.label} repeats chain position {link.seq}"
            return VerifyResult(False, checked, expected_seq, problem)
        if link.prev_hash != prev:
            return VerifyResult(
                False, checked, link.seq, f"{link.label} does not follow the previous link"
            )
        computed = link_hash(prev, link.seq, link.kind, link.content)
        if not hmac.compare_digest(computed, link.row_hash):
            return VerifyResult(False, checked, link.seq, f"{link.label} was altered")
        prev = link.row_hash
        checked += 1
    if head is None:
        if expected_seq == 0 and _top_stored_link() == 0:
            return VerifyResult(True, 0)
        return VerifyResult(False, checked, expected_seq + 1, "the chain head is missing")
    if head.last_seq != expected_seq or head.last_hash != prev:
        return VerifyResult(
            False,
            checked,
            expected_seq + 1,
            f"the chain ends at {expected_seq} but its head says {head.last_seq}: "
            "links were removed from the end",
        )
    # The walk stopped at the head it read first. Links written since then come with a newer
    # head (rows and head commit together), so anything above the head read *after* the
    # highest stored link is a head moved back to hide what follows it.
    top = _top_stored_link()
    now = AuditChainHead.objects.filter(pk=1).values_list("last_seq", flat=True).first() or 0
    if top > now:
        return VerifyResult(
            False,
            checked,
            now + 1,
            f"links are stored up to {top} but the chain head says {now}: the head was moved back",
        )
    return VerifyResult(True, checked)


# --- one connection's record ---------------------------------------------------------------------

security_logger = logging.getLogger("chat.security")


class ConnectionAudit:
    """The audit record of one WebSocket connection attempt, from its decision to its close."""

    def __init__(self, scope, *, room_slug: str = "") -> None:
        import uuid

        self.id = uuid.uuid4()
        self.ip: str | None = scope.get("client_ip")
        self.origin = handshake_header(scope, b"origin") or ""
        self.user_agent = handshake_header(scope, b"user-agent") or ""
        self.room_slug = room_slug
        self.opened_at = timezone.now()
        self.decided = self.accepted = False
        self.closed = False

    async def decide(
        self,
        runtime,
        *,
        outcome: str,
        reason: str = "",
        user=None,
        room=None,
        jti: str = "",
        transport: str = Transport.NONE,
    ) -> None:
        if self.decided:  # one row per attempt: a later failure shows in the close code
            return
        self.decided = True
        self.accepted = outcome == Outcome.ACCEPTED
        metrics.CONNECTION_ATTEMPTS.labels(outcome, reason).inc()
        if outcome == Outcome.ACCEPTED:
            metrics.CONNECTIONS_OPEN.inc()
        runtime.audit.add(
            sql.build(  # not ConnectionLog(...): one per handshake
                ConnectionLog,
                id=self.id,
                jti=jti,
                user_id=getattr(user, "pk", None),
                username=getattr(user, "username", "") or "",
                room_id=getattr(room, "pk", None),
                room_slug=getattr(room, "slug", None) or self.room_slug,
                ip=self.ip,
                origin=self.origin,
                user_agent=self.user_agent,
                transport=transport,
                outcome=outcome,
                reason=reason,
                opened_at=self.opened_at,
                instance=settings.CHAT_INSTANCE_NAME,
            )
        )
        if outcome == Outcome.REJECTED and self.ip:
            await _count_rejection(runtime, self.ip)

    def close(self, runtime, *, code: int | None, received: int = 0, sent: int = 0) -> None:
        if not self.decided or self.closed:
            return
        self.closed = True
        if self.accepted:
            metrics.CONNECTIONS_OPEN.dec()
        runtime.audit.add(
            ConnectionClose(
                connection_id=self.id,
                closed_at=timezone.now(),
                close_code=code,
                messages_received=received,
                messages_sent=sent,
            )
        )


async def _count_rejection(runtime, ip: str) -> None:
    """Warn (log + audit) when one client's rejected attempts cross the threshold within the
    window: one IPv4 address, or one IPv6 /64, as the per-address limits count them
    (accounts.ip.limit_key), else a client rotating through its /64 never raised it.

    Best effort: with the shared state down (Redis) the rejection is still recorded and the
    client still gets its close code; only the alert counter misses this attempt.
    """
    client = limit_key(ip)
    try:
        count = await runtime.state.count_hit(
            f"rejections:{client}", settings.CHAT_SECURITY_ALERT_WINDOW
        )
    except StateUnavailable:
        logger.warning("rejection from %s not counted: shared state unavailable", ip)
        return
    if count == settings.CHAT_SECURITY_ALERT_THRESHOLD:
        security_logger.warning(
            "%s %s had %d rejected WebSocket attempts within %ds",
            "IP" if client == ip else "network",
            client,
            count,
            settings.CHAT_SECURITY_ALERT_WINDOW,
        )
        details = {"count": count, "window_seconds": settings.CHAT_SECURITY_ALERT_WINDOW}
        if client != ip:
            details["network"] = client  # the row's IP is the attempt that crossed it
        runtime.audit.add(
            SecurityEvent(
                event=Event.ALERT,
                ip=ip,
                reason="rejected connection attempts over threshold",
                details=details,
                created_at=timezone.now(),
            )
        )


def _top_stored_link() -> int:
    """The highest chain position any stored row claims (0 if none)."""
    tops = [
        ConnectionLog.objects.aggregate(a=Max("chain_seq"), b=Max("close_chain_seq")).values(),
        [MessageLog.objects.aggregate(a=Max("chain_seq"))["a"]],
        [SecurityEvent.objects.aggregate(a=Max("chain_seq"))["a"]],
    ]
    return max((value or 0 for values in tops for value in values), default=0)


def _rows_outside_the_walk(start: int, checkpoint) -> tuple[int, str] | None:
    """Rows a walk from `start` would never read, and close data no close link covers: the
    position to report and the problem, or None."""
    for model in (MessageLog, SecurityEvent):
        row = model.objects.filter(chain_seq__lte=start).order_by("chain_seq").first()
        if row is not None:
            return row.chain_seq, f"{model.__name__} {row.pk} sits below the chain"
    # Below a checkpoint only openings of connections that were still open when it was made
    # are kept (their hashes are checked above); a closed one, or one the prune would have
    # deleted as dead, was put back.
    below = Q(chain_seq=0) | Q(close_chain_seq__lte=start)
    if checkpoint is not None:
        # The prune's own cut-off was a moment before the checkpoint's time: a minute of slack.
        live_since = checkpoint.created_at - timedelta(
            seconds=settings.CHAT_MAX_CONNECTION_AGE + 60
        )
        below |= Q(chain_seq__lte=start, close_chain_seq__isnull=True, opened_at__lt=live_since)
    stray = ConnectionLog.objects.filter(below).order_by("chain_seq").first()
    if stray is not None:
        return stray.chain_seq, f"ConnectionLog {stray.id} sits below the chain"
    unsealed = (
        ConnectionLog.objects.filter(close_chain_seq__isnull=True)
        .filter(
            Q(closed_at__isnull=False)
            | Q(close_code__isnull=False)
            | ~Q(messages_received=0)
            | ~Q(messages_sent=0)
            | ~Q(close_hash="")
        )
        .order_by("chain_seq")
        .first()
    )
    if unsealed is not None:
        return unsealed.chain_seq, f"ConnectionLog {unsealed.id} has close data but no close link"
    return None


# --- retention -----------------------------------------------------------------------------------


class AuditChainBroken(RuntimeError):
    """Pruning refused: the chain does not verify, and a prune must never launder tampering."""

    def __init__(self, result: VerifyResult) -> None:
        super().__init__(
            f"the audit chain is broken at position {result.first_bad_seq}: {result.problem}"
        )
        self.result = result
        # The last checkpoint the refused prune had written in its earlier batches, if any.
        self.pruned_upto: int | None = None


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What prune_before did (or, on a dry run, would do)."""

    cutoff: datetime
    dry_run: bool
    # Last pruned chain position; None when no row can go.
    seq: int | None = None
    rows: dict[str, int] | None = None
    checkpoint: AuditCheckpoint | None = None  # the last one written
    steps: int = 0  # transactions that pruned, each with its checkpoint

    @property
    def rows_pruned(self) -> int:
        return sum((self.rows or {}).values())


def stored_link_hash(seq: int) -> str | None:
    """The hash stored for chain position `seq`, whichever row holds it (None if none does)."""
    for model in (MessageLog, SecurityEvent, ConnectionLog):
        found = model.objects.filter(chain_seq=seq).values_list("row_hash", flat=True).first()
        if found:
            return found
    return (
        ConnectionLog.objects.filter(close_chain_seq=seq)
        .values_list("close_hash", flat=True)
        .first()
    )


def _first_link_since(cutoff: datetime, *, after_seq: int) -> int | None:
    """The lowest chain position after `after_seq` whose link was written at or after `cutoff`."""
    candidates = [
        ConnectionLog.objects.filter(chain_seq__gt=after_seq, opened_at__gte=cutoff)
        .order_by("chain_seq")
        .values_list("chain_seq", flat=True)
        .first(),
        ConnectionLog.objects.filter(close_chain_seq__gt=after_seq, closed_at__gte=cutoff)
        .order_by("close_chain_seq")
        .values_list("close_chain_seq", flat=True)
        .first(),
        *(
            model.objects.filter(chain_seq__gt=after_seq, created_at__gte=cutoff)
            .order_by("chain_seq")
            .values_list("chain_seq", flat=True)
            .first()
            for model in (MessageLog, SecurityEvent)
        ),
    ]
    found = [c for c in candidates if c is not None]
    return min(found) if found else None


# Chain positions a prune covers per transaction: each holds the chain head's lock, which every
# audit append (every message sent) waits for, only for the deletes of this many links.
PRUNE_BATCH = 10_000


def prune_before(
    *, cutoff: datetime, dry_run: bool = False, batch: int = PRUNE_BATCH
) -> PruneResult:
    """Delete the audit rows of the longest chain prefix older than `cutoff`, under checkpoints.

    The prefix ends at S, the largest position such that every link up to S is older than
    `cutoff`. A row goes when all its links are at or below S: a connection whose close link is
    later stays, and so does one without a close that may still be open (younger than
    CHAT_MAX_CONNECTION_AGE), or its close would find no row to seal.

    The prefix goes in steps of about `batch` positions, one transaction each, so that writers
    wait for one step's deletes at most, not for a day's. Each step writes a signed
    AuditCheckpoint at its last position and an AUDIT_PRUNED event in its transaction, so
    verify_chain() resumes at the newest checkpoint whenever it runs, and a prune stopped midway
    leaves a verifiable chain (the next one goes on from there).

    The chain is verified first, without the head lock, and only the verified part can be
    pruned: a broken chain raises AuditChainBroken and keeps every row, since pruning it would
    sign a checkpoint over the tampering.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    verified_upto = AuditChainHead.objects.filter(pk=1).values_list("last_seq", flat=True).first()
    verified = verify_chain()
    if not verified.ok:
        raise AuditChainBroken(verified)
    if dry_run:
        return _prune_step(cutoff, verified_upto or 0, batch=None, dry_run=True)[0]
    seq, rows, checkpoint, steps = None, None, None, 0
    while True:
        try:
            step, last = _prune_step(cutoff, verified_upto or 0, batch=batch, dry_run=False)
        except AuditChainBroken as exc:
            exc.pruned_upto = seq  # the batches before this one have committed
            raise
        if step.rows is not None:
            rows = {name: (rows or {}).get(name, 0) + n for name, n in step.rows.items()}
        if step.checkpoint is None:
            break
        seq, checkpoint, steps = step.seq, step.checkpoint, steps + 1
        if last:
            break
    return PruneResult(
        cutoff=cutoff, dry_run=False, seq=seq, rows=rows, checkpoint=checkpoint, steps=steps
    )


def _prune_step(
    cutoff: datetime, verified_upto: int, *, batch: int | None, dry_run: bool
) -> tuple[PruneResult, bool]:
    """One transaction of prune_before: up to `batch` positions past the newest checkpoint (all
    of the prefix when None), fewer when the prefix ends sooner; and whether it reached the
    prefix's end."""
    # A dry run only counts: no transaction, so no writer waits for it (on SQLite a transaction
    # takes the write lock at its start; on PostgreSQL the head's row lock would).
    with contextlib.nullcontext() if dry_run else transaction.atomic():
        if dry_run:
            last_seq = AuditChainHead.objects.filter(pk=1).values_list("last_seq", flat=True)
            last_seq = last_seq.first() or 0
        else:
            last_seq = _locked_head().last_seq
        previous = AuditCheckpoint.objects.order_by("-seq").first()
        start = previous.seq if previous is not None else 0
        first_recent = _first_link_since(cutoff, after_seq=start)
        end = last_seq if first_recent is None else first_recent - 1
        end = min(end, verified_upto)
        if end <= start:
            return PruneResult(cutoff=cutoff, dry_run=dry_run), True
        live_since = timezone.now() - timedelta(seconds=settings.CHAT_MAX_CONNECTION_AGE)
        span = end - start if batch is None else batch
        while True:
            seq = min(end, start + span)
            closed = Q(close_chain_seq__lte=seq)
            dead = Q(close_chain_seq__isnull=True, opened_at__lt=live_since)
            doomed = {
                "connection logs": ConnectionLog.objects.filter(closed | dead, chain_seq__lte=seq),
                "message logs": MessageLog.objects.filter(chain_seq__lte=seq),
                "security events": SecurityEvent.objects.filter(chain_seq__lte=seq),
            }
            if dry_run:
                rows = {name: qs.count() for name, qs in doomed.items()}
                would = seq if sum(rows.values()) else None
                return PruneResult(cutoff=cutoff, dry_run=True, seq=would, rows=rows), True
            row_hash = stored_link_hash(seq)
            if row_hash is None:  # removed since it was verified a moment ago
                raise AuditChainBroken(VerifyResult(False, 0, seq, f"link {seq} is missing"))
            rows = {name: qs.delete()[0] for name, qs in doomed.items()}
            total = sum(rows.values())
            if total or seq == end:
                break
            # Positions whose links are all kept (closes of connections below the checkpoint,
            # still-open connections): a wider step, rather than a checkpoint over no row.
            span *= 2
        if not total:
            # Only connections still open (or closed after the cutoff) reach back that far.
            return PruneResult(cutoff=cutoff, dry_run=False, rows=rows), True
        created_at = timezone.now()
        checkpoint = AuditCheckpoint.objects.create(
            seq=seq,
            row_hash=row_hash,
            created_at=created_at,
            rows_pruned=total,
            signature=checkpoint_signature(seq, row_hash, created_at, total),
        )
        security_event(
            event=Event.AUDIT_PRUNED,
            reason=f"audit rows up to chain position {seq} older than the cutoff",
            details={"seq": seq, "cutoff": canonical_value(cutoff), "rows": rows},
        )
    result = PruneResult(cutoff=cutoff, dry_run=False, seq=seq, rows=rows, checkpoint=checkpoint)
    return result, seq == end


@dataclass(frozen=True, slots=True)
class ChainState:
    """Where the chain stands: its head (to anchor outside the database) and newest checkpoint."""

    head_seq: int
    head_hash: str
    checkpoint: AuditCheckpoint | None


def chain_state() -> ChainState:
    head = AuditChainHead.objects.filter(pk=1).first()
    return ChainState(
        head_seq=head.last_seq if head else 0,
        head_hash=head.last_hash if head else GENESIS_HASH,
        checkpoint=AuditCheckpoint.objects.order_by("-seq").first(),
    )
