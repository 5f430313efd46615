"""Audit rows the database would not take at shutdown are kept on disk and appended at the next
start (chat/spool.py): nothing lost, nothing twice, and a spool file that was tampered with is
never appended."""

import asyncio
import fcntl
import json
import os
import stat
import time
import uuid

import pytest
from channels.db import database_sync_to_async
from django.core.management import CommandError, call_command
from django.db import OperationalError
from django.utils import timezone

from chat import audit, spool
from chat.models import ConnectionLog, MessageLog, SecurityEvent

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def spool_dir(settings, tmp_path):
    settings.CHAT_AUDIT_SPOOL_DIR = tmp_path / "audit-spool"
    return settings.CHAT_AUDIT_SPOOL_DIR


def _rows():
    """One of each kind the socket path queues: an open, a message event, a close, an event."""
    connection = uuid.uuid4()
    return [
        ConnectionLog(
            id=connection,
            outcome=audit.Outcome.ACCEPTED,
            username="alice",
            ip="203.0.113.7",
            opened_at=timezone.now(),
        ),
        audit.message_log(event=audit.MessageEvent.SENT, user=None, connection_id=connection),
        audit.ConnectionClose(connection, timezone.now(), 1001, 3, 4),
        audit.security_event_row(event=audit.Event.RATE_LIMITED, reason="frames", ip="::1"),
    ]


def _trail() -> list[tuple[str, str]]:
    """Every link of the chain in order, as (kind, what)."""
    links = []
    for row in ConnectionLog.objects.all():
        links.append((row.chain_seq, ("open", str(row.id))))
        if row.close_chain_seq:
            links.append((row.close_chain_seq, ("close", str(row.close_code))))
    links += [(r.chain_seq, ("message", r.event)) for r in MessageLog.objects.all()]
    links += [(r.chain_seq, ("security", r.event)) for r in SecurityEvent.objects.all()]
    return [what for _, what in sorted(links)]


async def _spool_at_a_shutdown_without_database(monkeypatch, rows):
    buffer = audit.AuditBuffer()
    append = audit.append

    def database_down(items):
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(audit, "append", database_down)
    for row in rows:
        buffer.add(row)
    await buffer.flush()  # as Runtime.shutdown() does: the rows are kept for a retry...
    assert buffer.pending == len(rows)
    buffer.spool()  # ...and, the process ending, go to disk
    monkeypatch.setattr(audit, "append", append)
    assert buffer.pending == 0


async def test_rows_kept_at_shutdown_are_appended_at_the_next_start(monkeypatch, spool_dir):
    rows = _rows()
    await _spool_at_a_shutdown_without_database(monkeypatch, rows)
    [path] = spool_dir.glob("*.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kept = path.read_text()
    assert await database_sync_to_async(_trail)() == []

    result = await database_sync_to_async(spool.replay)()

    assert (result.files, result.rows, result.rejected_files) == (1, 4, 0)
    assert not list(spool_dir.iterdir())
    trail = await database_sync_to_async(_trail)()
    assert trail == [
        ("open", str(rows[0].id)),
        ("message", "sent"),
        ("close", "1001"),
        ("security", "rate_limited"),
        ("security", "audit_spooled"),  # says where they came from, after them
    ]
    event = await SecurityEvent.objects.aget(event=audit.Event.AUDIT_SPOOLED)
    assert event.details == {
        "spool": json.loads(json.loads(kept)["body"])["spool"],
        "file": path.name,
        "rows": 4,
        "already_stored": 0,
    }
    assert (await database_sync_to_async(audit.verify_chain)()).ok
    # The original times are kept: the chain says when they were written, the rows when.
    stored = await ConnectionLog.objects.aget(id=rows[0].id)
    assert stored.opened_at == rows[0].opened_at


async def test_a_connection_already_stored_is_not_written_twice(monkeypatch):
    rows = _rows()
    # The open was committed, but the answer was lost: the process kept it for a retry.
    await database_sync_to_async(audit.append)([rows[0]])
    await _spool_at_a_shutdown_without_database(monkeypatch, rows)
    result = await database_sync_to_async(spool.replay)()
    assert (result.rows, result.already_stored) == (3, 1)
    assert await ConnectionLog.objects.acount() == 1
    assert (await ConnectionLog.objects.aget()).close_code == 1001
    assert (await database_sync_to_async(audit.verify_chain)()).ok


def _edit(path, change):
    envelope = json.loads(path.read_text())
    change(envelope)
    path.write_text(json.dumps(envelope))


def _edit_rows(change):
    def edit(envelope):
        body = json.loads(envelope["body"])
        change(body["rows"])
        envelope["body"] = json.dumps(body)

    return lambda path: _edit(path, edit)


TAMPERING = {
    "a row edited": _edit_rows(lambda rows: rows[3]["fields"].update(reason="nothing")),
    "a row removed": _edit_rows(lambda rows: rows.pop(1)),
    "rows reordered": _edit_rows(lambda rows: rows.reverse()),
    "signature replaced": lambda path: _edit(path, lambda e: e.update(mac="0" * 64)),
    "signature removed": lambda path: _edit(path, lambda e: e.pop("mac")),
    "spool id changed": lambda path: _edit(
        path, lambda e: e.update(body=e["body"].replace('"spool":"', '"spool":"0'))
    ),
    "not JSON": lambda path: path.write_text("{"),
    "unknown format": lambda path: _edit(path, lambda e: e.update(format=2)),
}


async def _set_aside_and_reported(result, spool_dir, path) -> str:
    """Nothing appended, the file renamed *.rejected, one event naming it; returns its reason."""
    assert (result.files, result.rows, result.rejected_files) == (0, 0, 1)
    assert [p.name for p in spool_dir.iterdir()] == [path.with_suffix(".rejected").name]
    assert await database_sync_to_async(_trail)() == [("security", "audit_spool_rejected")]
    event = await SecurityEvent.objects.aget()
    assert event.details == {"file": path.name}
    return event.reason


@pytest.mark.parametrize("tamper", TAMPERING.values(), ids=TAMPERING.keys())
async def test_a_tampered_spool_file_is_set_aside_and_reported(monkeypatch, spool_dir, tamper):
    await _spool_at_a_shutdown_without_database(monkeypatch, _rows())
    [path] = spool_dir.glob("*.json")
    tamper(path)

    result = await database_sync_to_async(spool.replay)()

    reason = await _set_aside_and_reported(result, spool_dir, path)
    assert reason


async def test_a_file_signed_with_another_audit_key_is_rejected(monkeypatch, spool_dir, settings):
    await _spool_at_a_shutdown_without_database(monkeypatch, _rows())
    settings.CHAT_AUDIT_HMAC_KEY = "another-audit-key-" + "z" * 40
    result = await database_sync_to_async(spool.replay)()
    assert result.rejected_files == 1
    assert "signature" in (await SecurityEvent.objects.aget()).reason


async def test_a_replay_the_database_fails_puts_the_file_back(monkeypatch, spool_dir):
    await _spool_at_a_shutdown_without_database(monkeypatch, _rows())
    [path] = spool_dir.glob("*.json")
    append = audit.append

    def database_down(items):
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(audit, "append", database_down)
    with pytest.raises(OperationalError):
        await database_sync_to_async(spool.replay)()
    assert list(spool_dir.iterdir()) == [path]  # back where it was, for the next start
    monkeypatch.setattr(audit, "append", append)
    assert (await database_sync_to_async(spool.replay)()).rows == 4


async def test_a_file_that_outlived_its_replay_is_not_appended_again(monkeypatch, spool_dir):
    # The process stopped between the commit and deleting the file.
    await _spool_at_a_shutdown_without_database(monkeypatch, _rows())
    [path] = spool_dir.glob("*.json")
    kept = path.read_bytes()
    assert (await database_sync_to_async(spool.replay)()).rows == 4
    path.write_bytes(kept)
    again = await database_sync_to_async(spool.replay)()
    assert (again.files, again.rows, again.already_stored) == (1, 0, 4)
    assert not path.exists()
    assert await MessageLog.objects.acount() == 1
    assert await SecurityEvent.objects.filter(event=audit.Event.AUDIT_SPOOLED).acount() == 1


async def test_a_copy_of_a_replayed_file_under_another_name_is_not_appended(monkeypatch, spool_dir):
    await _spool_at_a_shutdown_without_database(monkeypatch, _rows())
    [path] = spool_dir.glob("*.json")
    copy = path.with_name("0" + path.name)  # sorts first, so it is replayed first
    copy.write_bytes(path.read_bytes())
    result = await database_sync_to_async(spool.replay)()
    assert (result.files, result.rows, result.already_stored) == (2, 4, 4)
    assert await MessageLog.objects.acount() == 1
    assert not list(spool_dir.iterdir())


async def test_a_file_another_process_is_replaying_is_left_to_it(monkeypatch, spool_dir):
    await _spool_at_a_shutdown_without_database(monkeypatch, _rows())
    [path] = spool_dir.glob("*.json")
    with path.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a process that is replaying it holds it
        result = await database_sync_to_async(spool.replay)()
    assert (result.files, result.rows) == (0, 0)
    assert path.exists()
    assert await database_sync_to_async(_trail)() == []


async def test_files_replay_oldest_first(monkeypatch):
    first, second = _rows(), _rows()
    await _spool_at_a_shutdown_without_database(monkeypatch, first)
    await _spool_at_a_shutdown_without_database(monkeypatch, second)
    assert (await database_sync_to_async(spool.replay)()).files == 2
    opens = [what for kind, what in await database_sync_to_async(_trail)() if kind == "open"]
    assert opens == [str(first[0].id), str(second[0].id)]


def test_the_command_replays_and_fails_on_a_rejected_file(spool_dir, capsys):
    spool.save(_rows())
    call_command("replay_audit_spool")
    assert "1 spool file(s) replayed: 4 audit rows appended" in capsys.readouterr().out
    path = spool.save(_rows())
    path.write_text("{}")
    with pytest.raises(CommandError, match="rejected spool files"):
        call_command("replay_audit_spool")
    assert path.with_suffix(".rejected").exists()


def test_nothing_queued_writes_no_file(spool_dir):
    audit.AuditBuffer().spool()
    assert spool.save([]) is None
    assert not spool_dir.exists()


# --- the live buffer: a write in flight is never dropped, a stored row never written twice ----


def _slow(outcome):
    """audit.append as a database that answers after a moment: stores the rows, or fails."""
    append = audit.append

    def slow(items):
        time.sleep(0.3)
        if outcome == "fails":
            raise OperationalError("could not connect to server")
        return append(items)

    return slow


@pytest.mark.parametrize("outcome", ["fails", "stores"])
async def test_a_flush_cancelled_mid_write_loses_nothing_and_writes_nothing_twice(
    monkeypatch, spool_dir, outcome
):
    # At shutdown every socket's task is cancelled, possibly while its flush waits on the database.
    buffer = audit.AuditBuffer()
    for row in _rows():
        buffer.add(row)
    monkeypatch.setattr(audit, "append", _slow(outcome))
    flushing = asyncio.ensure_future(buffer.flush())
    await asyncio.sleep(0.1)  # the write is in flight
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    await buffer.flush()  # as Runtime.shutdown(): waits for the write in flight
    buffer.spool()
    monkeypatch.undo()
    if outcome == "fails":
        assert len(list(spool_dir.glob("*.json"))) == 1
        assert (await database_sync_to_async(spool.replay)()).rows == 4
    else:
        assert not spool_dir.exists()
    assert [kind for kind, _ in await database_sync_to_async(_trail)()][:4] == [
        "open",
        "message",
        "close",
        "security",
    ]
    assert await MessageLog.objects.acount() == 1
    assert (await database_sync_to_async(audit.verify_chain)()).ok


async def test_rows_whose_commit_answer_was_lost_are_not_written_again(monkeypatch):
    # The COMMIT reached the database, the error reached the process: the buffer keeps the rows
    # for a retry, and the retry must find them stored.
    buffer = audit.AuditBuffer()
    append = audit.append

    def commit_then_lose_the_answer(items):
        append(items)
        raise OperationalError("server closed the connection unexpectedly")

    for row in _rows():
        buffer.add(row)
    monkeypatch.setattr(audit, "append", commit_then_lose_the_answer)
    await buffer.flush()
    assert buffer.pending == 4
    monkeypatch.setattr(audit, "append", append)
    buffer.add(audit.security_event_row(event=audit.Event.ALERT, reason="after"))
    await buffer.flush()
    assert buffer.pending == 0
    trail = await database_sync_to_async(_trail)()
    assert [kind for kind, _ in trail] == ["open", "message", "close", "security", "security"]
    assert (await database_sync_to_async(audit.verify_chain)()).ok


# --- a process that stopped while writing a spool file ----------------------------------------


def _unfinished(path, *, age: float, cut: int | None = None):
    """The spool file as its writer left it before the rename: a hidden temporary, `age` seconds
    old, whole or cut to `cut` bytes."""
    temporary = path.with_name(f".{path.name}.tmp")
    text = path.read_bytes()
    path.unlink()
    temporary.write_bytes(text if cut is None else text[:cut])
    old = time.time() - age
    os.utime(temporary, (old, old))
    return temporary


@pytest.mark.parametrize("age", [1, spool.UNFINISHED_AFTER + 5], ids=["new", "old"])
async def test_a_complete_file_its_writer_did_not_rename_is_replayed(monkeypatch, spool_dir, age):
    # Complete and unlocked: its writer, which holds it until the rename, has stopped.
    rows = _rows()
    await _spool_at_a_shutdown_without_database(monkeypatch, rows)
    [path] = spool_dir.glob("*.json")
    _unfinished(path, age=age)

    result = await database_sync_to_async(spool.replay)()

    assert (result.files, result.rows, result.rejected_files) == (1, 4, 0)
    assert not list(spool_dir.iterdir())
    assert ("open", str(rows[0].id)) in await database_sync_to_async(_trail)()
    event = await SecurityEvent.objects.aget(event=audit.Event.AUDIT_SPOOLED)
    assert event.details["file"] == path.name
    assert (await database_sync_to_async(audit.verify_chain)()).ok


async def test_a_file_cut_short_while_written_is_set_aside_and_reported(monkeypatch, spool_dir):
    await _spool_at_a_shutdown_without_database(monkeypatch, _rows())
    [path] = spool_dir.glob("*.json")
    _unfinished(path, age=spool.UNFINISHED_AFTER + 5, cut=100)

    result = await database_sync_to_async(spool.replay)()

    reason = await _set_aside_and_reported(result, spool_dir, path)
    assert reason.startswith("unfinished spool file")


def test_the_writer_holds_its_file_locked_until_it_is_renamed(monkeypatch, spool_dir):
    replace = os.replace
    seen = []

    def rename(source, target):
        # As a replay starting meanwhile opens it:
        with open(source, "rb") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(target)
        replace(source, target)

    monkeypatch.setattr(os, "replace", rename)
    path = spool.save(_rows())
    assert seen == [path]
    assert [p.name for p in spool_dir.iterdir()] == [path.name]


@pytest.mark.parametrize("why", ["locked by its writer", "cut short a moment ago"])
async def test_a_temporary_file_that_may_still_be_written_is_left_alone(
    monkeypatch, spool_dir, why
):
    await _spool_at_a_shutdown_without_database(monkeypatch, _rows())
    [path] = spool_dir.glob("*.json")
    locked = why == "locked by its writer"  # (a complete one would be replayed if unlocked)
    temporary = _unfinished(path, age=spool.UNFINISHED_AFTER + 5 if locked else 1, cut=100)
    with temporary.open("rb") as held:
        if locked:
            fcntl.flock(held, fcntl.LOCK_EX)  # as spool.save() holds it until the rename
        result = await database_sync_to_async(spool.replay)()
    assert (result.files, result.rows, result.rejected_files) == (0, 0, 0)
    assert list(spool_dir.iterdir()) == [temporary]
    assert await database_sync_to_async(_trail)() == []
