"""Audit rows the database would not take at shutdown: kept on disk, appended at the next start.

The socket path queues its audit rows (chat.audit.AuditBuffer) and a clean shutdown writes them
all. If the database is down for the whole shutdown, those rows would die with the process: so
they are written to a spool file instead (CHAT_AUDIT_SPOOL_DIR, one file per shutdown, mode 0600,
signed with the audit key), and `manage.py serve` appends them to the chain when it next starts
(`manage.py replay_audit_spool` does it by hand), each file at most once. A replayed batch is
followed by a security event saying where the rows came from, since their chain position is
later than their time. A file whose signature does not match is not replayed: it is set aside
and reported as an event. A temporary file left by a process that stopped while writing one is
looked at once nobody holds it: complete and signed, it is replayed like the others; cut short
(and a minute old, so not a file being created), it is set aside and reported, its rows lost.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from uuid import UUID

from django.conf import settings
from django.core import serializers
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils.dateparse import parse_datetime

from chat import audit
from chat.models import SecurityEvent

logger = logging.getLogger("chat.audit")

FORMAT = 1
_TEMPORARY = ".tmp"
# An unlocked temporary file this old and still incomplete has no writer any more (a younger
# one may be between its creation and its writer's lock).
UNFINISHED_AFTER = 60.0
_CLOSE = "connection.close"  # ConnectionClose is not a model: its own tag in the file


@dataclass(frozen=True)
class Replayed:
    files: int = 0
    rows: int = 0
    already_stored: int = 0
    rejected_files: int = 0


def spool_dir() -> Path:
    return Path(settings.CHAT_AUDIT_SPOOL_DIR)


def save(items: list[audit.AuditItem]) -> Path | None:
    """Write `items` to a new spool file, atomically; return its path (None if nothing to keep)."""
    if not items:
        return None
    rows = [_dump(item) for item in items]
    # The id, inside what is signed, is what makes a replay happen once: a copy of the file under
    # another name is the same spool.
    body = json.dumps(
        {"spool": secrets.token_hex(16), "rows": rows},
        cls=_Encoder,
        sort_keys=True,
        separators=(",", ":"),
    )
    text = json.dumps({"format": FORMAT, "body": body, "mac": audit.spool_signature(body)})
    directory = spool_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Names sort by time, so files replay in the order they were written.
    name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.json"
    temporary = directory / f".{name}{_TEMPORARY}"
    path = directory / name
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        # Held until renamed: a replay meanwhile leaves the file to us (_recover_unfinished).
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
        os.replace(temporary, path)
    _sync_directory(directory)  # the new name survives a power cut too
    return path


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replay() -> Replayed:
    """Append every spooled file's rows to the chain, oldest file first; delete what was written.

    A file is locked while it is replayed (another process starting meanwhile skips it), and
    appended at most once: its rows and the event naming it commit together, and a file whose
    event is already in the chain (the process stopped before deleting it) is only deleted.
    Raises if the database fails; the file then stays for the next start.
    """
    directory = spool_dir()
    if not directory.is_dir():
        return Replayed()
    files = rows = already_stored = rejected = 0
    for path in sorted(directory.glob(f".*.json{_TEMPORARY}")):
        rejected += _recover_unfinished(path)
    for path in sorted(directory.glob("*.json")):
        try:
            handle = open(path, "rb")  # noqa: SIM115 (held across the branches below)
        except FileNotFoundError:
            continue  # replayed and deleted by another process meanwhile
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another process is replaying it
            if not path.exists():
                continue  # it finished with it while we opened it
            try:
                spool_id, items = _load(handle.read())
            except SpoolRejected as error:
                _reject(path, path.name, str(error))
                rejected += 1
                continue
            written, stored = _append(items, spool_id, path.name)
            path.unlink()
        files, rows, already_stored = files + 1, rows + written, already_stored + stored
        logger.warning("%d audit rows replayed from the spool file %s", written, path.name)
    return Replayed(files=files, rows=rows, already_stored=already_stored, rejected_files=rejected)


def _recover_unfinished(path: Path) -> bool:
    """A temporary file its writer never renamed: it stopped between creating and renaming it.

    Left alone while locked: its writer holds it from before the first byte until the rename.
    Complete and signed, it gets its spool name and is replayed with the others. Otherwise it
    is rejected (returns True), its rows cut short or untrustworthy; unless it is younger than
    UNFINISHED_AFTER, when it may be a file created a moment ago whose writer has not locked
    it yet: it waits for the next replay.
    """
    name = path.name.removeprefix(".").removesuffix(_TEMPORARY)
    try:
        handle = open(path, "rb")  # noqa: SIM115 (held across the branches below)
    except FileNotFoundError:
        return False  # renamed by its writer meanwhile
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # still being written, or another process is looking at it
        if not path.exists():
            return False
        try:
            _load(handle.read())
        except SpoolRejected as error:
            if time.time() - os.fstat(handle.fileno()).st_mtime < UNFINISHED_AFTER:
                logger.warning("audit spool file %s is incomplete; left for the next replay", name)
                return False
            _reject(path, name, f"unfinished spool file (its writer stopped): {error}")
            return True
        os.replace(path, path.with_name(name))
        _sync_directory(path.parent)
        logger.warning("audit spool file %s was complete but not renamed; replaying it", name)
        return False


def _reject(path: Path, name: str, reason: str) -> None:
    """Log, record, then set the file aside: only once recorded (if the database fails
    meanwhile, the file is looked at again next time)."""
    logger.error("audit spool file %s rejected: %s", name, reason)
    audit.security_event(
        event=audit.Event.AUDIT_SPOOL_REJECTED, reason=reason, details={"file": name}
    )
    path.rename(path.with_name(name).with_suffix(".rejected"))


class SpoolRejected(Exception):
    pass


class _Encoder(DjangoJSONEncoder):
    """Django's, with times and UUIDs as the chain writes them: Django's cuts times to the
    millisecond, and an audit row must come back exactly as it was made."""

    def default(self, o):
        value = audit.canonical_value(o)
        return super().default(o) if value is o else value


def _append(items: list[audit.AuditItem], spool_id: str, name: str) -> tuple[int, int]:
    """Append the rows and the event that accounts for them, in one transaction; return (rows
    written, rows already in the chain).

    Rows already in the chain are those whose COMMIT reached the database while the process saw
    an error and kept them: audit.append() skips them by the position and hash it gave them.
    """
    with transaction.atomic():
        audit.lock_chain()
        if SecurityEvent.objects.filter(event=audit.Event.AUDIT_SPOOLED, details__spool=spool_id):
            return 0, len(items)  # appended before, but the file outlived it (or is a copy)
        stored = audit.append(items)
        audit.append(
            [
                audit.security_event_row(
                    event=audit.Event.AUDIT_SPOOLED,
                    reason="kept on disk at a shutdown the database was down for",
                    details={
                        "spool": spool_id,
                        "file": name,
                        "rows": len(items) - stored,
                        "already_stored": stored,
                    },
                )
            ]
        )
    return len(items) - stored, stored


def _dump(item: audit.AuditItem) -> dict:
    if isinstance(item, audit.ConnectionClose):
        return {"model": _CLOSE, "fields": asdict(item)}
    return serializers.serialize("python", [item])[0]


def _load(text: bytes) -> tuple[str, list[audit.AuditItem]]:
    """The spool's id and rows; SpoolRejected for anything but a file this code wrote, signed with
    this key, unchanged."""
    try:
        envelope = json.loads(text)
        if envelope.get("format") != FORMAT:
            raise SpoolRejected(f"unknown format {envelope.get('format')!r}")
        body, mac = envelope["body"], envelope["mac"]
        signed = isinstance(body, str) and isinstance(mac, str)
    except SpoolRejected:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SpoolRejected(f"unreadable: {type(error).__name__}") from None
    if not signed or not hmac.compare_digest(mac, audit.spool_signature(body)):
        raise SpoolRejected("signature does not match (edited, or another audit key)")
    try:
        content = json.loads(body)
        return content["spool"], [_item(row) for row in content["rows"]]
    except Exception as error:  # signed by us, but not readable by this version of the code
        raise SpoolRejected(f"rows unreadable: {type(error).__name__}: {error}") from None


def _item(row: dict) -> audit.AuditItem:
    if row["model"] == _CLOSE:
        fields = row["fields"]
        return audit.ConnectionClose(
            connection_id=UUID(fields["connection_id"]),
            closed_at=parse_datetime(fields["closed_at"]),
            close_code=fields["close_code"],
            messages_received=fields["messages_received"],
            messages_sent=fields["messages_sent"],
        )
    [deserialized] = serializers.deserialize("python", [row])
    return deserialized.object
