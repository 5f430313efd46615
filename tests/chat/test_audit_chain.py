"""The audit chain: each tampering is caught for the right reason, and pruning keeps it sound."""

import hashlib
import hmac
import itertools
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from uuid import UUID

import pytest
import time_machine
from django.db import connection, transaction
from django.db.models import F
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from chat import audit
from chat.models import (
    AuditChainHead,
    AuditCheckpoint,
    ConnectionLog,
    MessageLog,
    SecurityEvent,
)
from tests.chat.audit_rows import build_chain, log_close, log_connection

pytestmark = pytest.mark.django_db

LINKS = 9  # build_chain()'s links


def head() -> AuditChainHead:
    return AuditChainHead.objects.get(pk=1)


def test_untouched_chain_verifies():
    build_chain()

    result = audit.verify_chain()

    assert result.ok, result.problem
    assert result.links_checked == LINKS == head().last_seq


# --- tampering: each attack, and the position and problem it must be reported with --------------


def edit_connection_opening(chain):
    ConnectionLog.objects.filter(pk=chain.connection.pk).update(ip="203.0.113.66")
    return chain.connection.chain_seq, "(opening) was altered"


def edit_message_event(chain):
    row = MessageLog.objects.get(event=MessageLog.Event.SENT, seq=2)
    MessageLog.objects.filter(pk=row.pk).update(username="mallory")
    return row.chain_seq, "was altered"


def edit_security_event(chain):
    row = SecurityEvent.objects.get(event=SecurityEvent.Event.MEMBER_ADDED)
    SecurityEvent.objects.filter(pk=row.pk).update(details={"role": "owner"})
    return row.chain_seq, "was altered"


def edit_connection_close(chain):
    ConnectionLog.objects.filter(pk=chain.connection.pk).update(close_code=4403)
    return chain.connection.close_chain_seq, "(close) was altered"


def delete_middle_row(chain):
    row = MessageLog.objects.get(event=MessageLog.Event.DELETED)
    row.delete()
    return row.chain_seq, f"link {row.chain_seq} is missing"


def insert_forged_row(chain):
    # A plausible login at the end of the chain, with the head moved to match; the attacker
    # lacks the HMAC key, so guesses one.
    tip = head()
    forged = SecurityEvent(
        event=SecurityEvent.Event.LOGIN_SUCCEEDED,
        actor_id=chain.alice.pk,
        actor_name="alice",
        ip="198.51.100.10",
        created_at=timezone.now(),
        chain_seq=tip.last_seq + 1,
        prev_hash=tip.last_hash,
    )
    with override_settings(CHAT_AUDIT_HMAC_KEY="a-guessed-key"):
        forged.row_hash = audit.link_hash(
            tip.last_hash, forged.chain_seq, audit.KIND_SECURITY, audit.row_content(forged)
        )
    forged.save()
    AuditChainHead.objects.filter(pk=1).update(last_seq=forged.chain_seq, last_hash=forged.row_hash)
    return forged.chain_seq, "was altered"


def reorder_rows(chain):
    first = SecurityEvent.objects.get(event=SecurityEvent.Event.ROOM_CREATED)
    second = SecurityEvent.objects.get(event=SecurityEvent.Event.MEMBER_ADDED)
    SecurityEvent.objects.filter(pk=first.pk).update(chain_seq=10**9)
    SecurityEvent.objects.filter(pk=second.pk).update(chain_seq=first.chain_seq)
    SecurityEvent.objects.filter(pk=first.pk).update(chain_seq=second.chain_seq)
    return first.chain_seq, "does not follow the previous link"


def truncate_tail(chain):
    SecurityEvent.objects.filter(event=SecurityEvent.Event.LOGIN_FAILED).delete()
    ConnectionLog.objects.filter(pk=chain.rejected.pk).delete()
    return LINKS - 1, "links were removed from the end"


def checkpoint_with_a_guessed_key(*, seq, row_hash, created_at, rows_pruned):
    with override_settings(CHAT_AUDIT_HMAC_KEY="a-guessed-key"):
        signature = audit.checkpoint_signature(seq, row_hash, created_at, rows_pruned)
    AuditCheckpoint.objects.create(
        seq=seq,
        row_hash=row_hash,
        created_at=created_at,
        rows_pruned=rows_pruned,
        signature=signature,
    )


def forge_checkpoint(chain):
    # Hide the first three links behind a checkpoint signed with a guessed key.
    third = ConnectionLog.objects.get(pk=chain.connection.pk)
    SecurityEvent.objects.filter(chain_seq__lt=third.chain_seq).delete()
    checkpoint_with_a_guessed_key(
        seq=third.chain_seq, row_hash=third.row_hash, created_at=timezone.now(), rows_pruned=2
    )
    return third.chain_seq, "checkpoint signature is invalid"


def delete_the_head(chain):
    AuditChainHead.objects.all().delete()
    return 1, "the chain head is missing"


def move_the_head_back_and_edit_what_follows(chain):
    AuditChainHead.objects.filter(pk=1).update(last_seq=3, last_hash=audit.stored_link_hash(3))
    MessageLog.objects.filter(chain_seq__gt=3).update(username="mallory")
    return 4, "the head was moved back"


def forge_rows_at_position_zero(chain):
    # Below where the walk starts: never read unless looked for.
    forged = SecurityEvent.objects.create(
        event=SecurityEvent.Event.LOGIN_SUCCEEDED,
        actor_name="mallory",
        created_at=timezone.now(),
        chain_seq=0,
        prev_hash="x",
        row_hash="forged",
    )
    return 0, f"SecurityEvent {forged.pk} sits below the chain"


def close_an_open_connection_by_hand(chain):
    opened = log_connection(ip="192.0.2.5")  # no close link yet
    ConnectionLog.objects.filter(pk=opened.pk).update(
        closed_at=timezone.now(), close_code=1000, messages_sent=99
    )
    return opened.chain_seq, "has close data but no close link"


def hide_a_close_below_the_chain(chain):
    # With a close position set, the writer would skip the real close later.
    opened = log_connection(ip="192.0.2.5")
    ConnectionLog.objects.filter(pk=opened.pk).update(close_chain_seq=0, close_code=1000)
    return opened.chain_seq, "sits below the chain"


@pytest.mark.parametrize(
    "tamper",
    [
        delete_the_head,
        move_the_head_back_and_edit_what_follows,
        forge_rows_at_position_zero,
        close_an_open_connection_by_hand,
        hide_a_close_below_the_chain,
        edit_connection_opening,
        edit_message_event,
        edit_security_event,
        edit_connection_close,
        delete_middle_row,
        insert_forged_row,
        reorder_rows,
        truncate_tail,
        forge_checkpoint,
    ],
)
def test_tampering_is_caught_at_its_position(tamper):
    chain = build_chain()
    position, problem = tamper(chain)

    result = audit.verify_chain()

    assert not result.ok
    assert result.first_bad_seq == position
    assert problem in result.problem


# --- pruning -------------------------------------------------------------------------------------


def long_ago(days: int = 40):
    return time_machine.travel(timezone.now() - timedelta(days=days), tick=False)


def cutoff(days: int = 30):
    return timezone.now() - timedelta(days=days)


def test_prune_deletes_old_prefix_and_chain_still_verifies():
    with long_ago():
        build_chain("old-")
    recent = build_chain("new-")

    result = audit.prune_before(cutoff=cutoff())

    assert result.seq == LINKS
    # Nine links, one of them a close: eight rows.
    assert result.rows == {"connection logs": 2, "message logs": 3, "security events": 3}
    assert not SecurityEvent.objects.filter(room_slug="old-lobby").exists()
    assert ConnectionLog.objects.filter(pk=recent.connection.pk).exists()
    checkpoint = AuditCheckpoint.objects.get()
    assert (checkpoint.seq, checkpoint.rows_pruned) == (LINKS, 8)
    pruned_event = SecurityEvent.objects.get(event=SecurityEvent.Event.AUDIT_PRUNED)
    assert pruned_event.details["seq"] == LINKS
    verified = audit.verify_chain()
    assert verified.ok, verified.problem
    # The recent chain and the audit_pruned event, nothing before the checkpoint.
    assert verified.links_checked == LINKS + 1


def test_prune_keeps_a_connection_whose_close_is_recent():
    with long_ago():
        never_closed = log_connection()  # its process died: no close will ever come
        closed_later = log_connection()
        closed_then = log_connection()
        log_close(closed_then)
    log_close(closed_later)

    result = audit.prune_before(cutoff=cutoff())

    # The prefix ends before closed_later's close (link 5); never_closed and closed_then go.
    assert result.seq == 4
    assert list(ConnectionLog.objects.values_list("pk", flat=True)) == [closed_later.pk]
    assert {never_closed.pk, closed_then.pk}.isdisjoint(
        ConnectionLog.objects.values_list("pk", flat=True)
    )
    verified = audit.verify_chain()
    assert verified.ok, verified.problem


def test_an_edited_opening_kept_below_the_checkpoint_is_caught():
    with long_ago():
        kept = log_connection()  # closes after the cutoff: kept, its opening below the checkpoint
        log_close(log_connection())
    log_close(kept)
    assert audit.prune_before(cutoff=cutoff()).seq is not None
    assert audit.verify_chain().ok
    ConnectionLog.objects.filter(pk=kept.pk).update(username="mallory")
    verified = audit.verify_chain()
    assert not verified.ok
    assert verified.problem == f"ConnectionLog {kept.pk} (opening) was altered"


def test_prune_keeps_a_connection_that_may_still_be_open():
    live = log_connection()
    audit.security_event(event=audit.Event.LOGIN_FAILED, ip="192.0.2.1")

    result = audit.prune_before(cutoff=timezone.now() + timedelta(seconds=1))

    assert result.seq == 2
    assert result.rows == {"connection logs": 0, "message logs": 0, "security events": 1}
    still_open = audit.verify_chain()  # kept below the checkpoint, not yet closed: legitimate
    assert still_open.ok, still_open.problem
    audit.prune_before(cutoff=timezone.now(), dry_run=True)  # a prune is not refused for it
    log_close(live)
    live.refresh_from_db()
    assert live.close_chain_seq == 4  # after the audit_pruned event
    verified = audit.verify_chain()
    assert verified.ok, verified.problem


def test_prune_dry_run_changes_nothing():
    with long_ago():
        build_chain("old-")
    before = head().last_seq

    result = audit.prune_before(cutoff=cutoff(), dry_run=True)

    assert result.dry_run
    assert (result.seq, result.rows_pruned) == (LINKS, 8)
    assert head().last_seq == before
    assert not AuditCheckpoint.objects.exists()
    assert ConnectionLog.objects.count() + MessageLog.objects.count() == 5


@pytest.mark.django_db(transaction=True)
def test_a_dry_run_prune_holds_up_no_writer():
    """It only counts: no transaction (on SQLite one takes the write lock at its start, which
    every message sent waits for) and no row lock, however long the prefix it counts."""
    with long_ago():
        build_chain("old-")
    with CaptureQueriesContext(connection) as queries:
        result = audit.prune_before(cutoff=cutoff(), dry_run=True)
    assert (result.seq, result.rows_pruned) == (LINKS, 8)
    statements = [query["sql"].upper() for query in queries.captured_queries]
    assert statements
    assert not [s for s in statements if "FOR UPDATE" in s or s.startswith(("BEGIN", "SAVEPOINT"))]


def test_prune_without_old_rows_does_nothing():
    build_chain()

    result = audit.prune_before(cutoff=cutoff())

    assert result.seq is None
    assert not AuditCheckpoint.objects.exists()
    assert head().last_seq == LINKS


def test_prune_refuses_a_broken_chain_and_keeps_every_row():
    with long_ago():
        chain = build_chain("old-")
    ConnectionLog.objects.filter(pk=chain.connection.pk).update(username="nobody")

    with pytest.raises(audit.AuditChainBroken, match="was altered"):
        audit.prune_before(cutoff=cutoff())

    assert not AuditCheckpoint.objects.exists()
    assert SecurityEvent.objects.count() == 3


def test_second_prune_resumes_from_the_first_checkpoint():
    with long_ago(60):
        build_chain("oldest-")
    with long_ago(40):
        build_chain("old-")
    audit.prune_before(cutoff=cutoff(50))

    result = audit.prune_before(cutoff=cutoff(30))

    # Links 1-9 went first, then 10-18; the first prune's audit_pruned event (19) is recent.
    assert result.seq == 2 * LINKS
    assert list(AuditCheckpoint.objects.values_list("seq", flat=True)) == [18, 9]
    verified = audit.verify_chain()
    assert verified.ok, verified.problem
    assert verified.links_checked == 2  # the two audit_pruned events


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_a_prune_in_small_steps_prunes_what_one_step_would(batch):
    """Each step is a transaction with its own checkpoint; together they delete what one step
    would, and the chain verifies from the last checkpoint. A step over positions whose links
    are all kept (closes of connections opened before the checkpoint) widens rather than sign
    a checkpoint over nothing."""
    with long_ago():
        never_closed = log_connection()  # its process died
        closed_then = log_connection()
        build_chain("old-")
        log_close(closed_then)
    kept = build_chain("new-")

    result = audit.prune_before(cutoff=cutoff(), batch=batch)

    old_links = 2 + LINKS + 1
    assert result.seq == old_links
    assert result.rows == {"connection logs": 4, "message logs": 3, "security events": 3}
    checkpoints = list(AuditCheckpoint.objects.order_by("seq"))
    assert result.steps == len(checkpoints) > 1
    assert result.checkpoint == checkpoints[-1]
    assert checkpoints[-1].seq == old_links
    assert sum(c.rows_pruned for c in checkpoints) == result.rows_pruned == 10
    assert all(
        later.seq - earlier.seq <= batch or later.rows_pruned > 0
        for earlier, later in itertools.pairwise(checkpoints)
    )
    events = SecurityEvent.objects.filter(event=SecurityEvent.Event.AUDIT_PRUNED)
    assert sorted(e.details["seq"] for e in events) == [c.seq for c in checkpoints]
    assert not ConnectionLog.objects.filter(pk__in=[never_closed.pk, closed_then.pk]).exists()
    assert ConnectionLog.objects.filter(pk=kept.connection.pk).exists()
    verified = audit.verify_chain()
    assert verified.ok, verified.problem
    assert verified.links_checked == LINKS + len(checkpoints)  # the recent chain, the events


@pytest.mark.django_db(transaction=True)
def test_writers_wait_for_one_step_of_a_prune_at_most(monkeypatch):
    """Every message sent appends to the chain under its head's lock: a prune of a day's rows
    must not hold it for all of them. Between two steps no transaction is open, and what is
    appended then is kept and verifies."""
    with long_ago():
        for n in range(3):
            build_chain(f"old{n}-")
    step = audit._prune_step
    between: list[bool] = []

    def step_then_a_writer(*args, **kwargs):
        outcome = step(*args, **kwargs)
        between.append(transaction.get_connection().in_atomic_block)
        audit.security_event(event=audit.Event.LOGIN_FAILED, ip="192.0.2.7")
        return outcome

    monkeypatch.setattr(audit, "_prune_step", step_then_a_writer)

    result = audit.prune_before(cutoff=cutoff(), batch=LINKS)

    assert result.steps == 3
    assert between == [False] * 3
    assert SecurityEvent.objects.filter(ip="192.0.2.7").count() == 3
    verified = audit.verify_chain()
    assert verified.ok, verified.problem


def test_a_prune_stopped_midway_leaves_a_verifiable_chain_and_the_next_goes_on(monkeypatch):
    with long_ago():
        build_chain("old-")
        build_chain("older-")
    step, calls = audit._prune_step, []

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise audit.AuditChainBroken(audit.VerifyResult(False, 0, 0, "stopped"))
        return step(*args, **kwargs)

    monkeypatch.setattr(audit, "_prune_step", fails_second)
    with pytest.raises(audit.AuditChainBroken):
        audit.prune_before(cutoff=cutoff(), batch=LINKS)
    assert list(AuditCheckpoint.objects.values_list("seq", flat=True)) == [LINKS]
    assert audit.verify_chain().ok

    monkeypatch.setattr(audit, "_prune_step", step)
    result = audit.prune_before(cutoff=cutoff(), batch=LINKS)

    # The rest of the old rows; the first step's audit_pruned event (19) is recent.
    assert (result.seq, result.steps) == (2 * LINKS, 1)
    assert list(AuditCheckpoint.objects.values_list("seq", flat=True)) == [2 * LINKS, LINKS]
    assert audit.verify_chain().ok


def test_a_prune_refuses_an_empty_step():
    with pytest.raises(ValueError, match="at least 1"):
        audit.prune_before(cutoff=cutoff(), batch=0)


# --- tampering after a prune ---------------------------------------------------------------------


def edit_kept_row(checkpoint):
    row = SecurityEvent.objects.get(event=SecurityEvent.Event.ROOM_CREATED)
    SecurityEvent.objects.filter(pk=row.pk).update(actor_name="someone-else")
    return row.chain_seq, "was altered"


def delete_first_kept_row(checkpoint):
    SecurityEvent.objects.filter(chain_seq=checkpoint.seq + 1).delete()
    return checkpoint.seq + 1, f"link {checkpoint.seq + 1} is missing"


def forge_checkpoint_signature(checkpoint):
    AuditCheckpoint.objects.filter(pk=checkpoint.pk).update(signature="0" * 64)
    return checkpoint.seq, "checkpoint signature is invalid"


def move_checkpoint_forward(checkpoint):
    # Hide the next link too, keeping the signature: the signature covers the position.
    hidden = SecurityEvent.objects.get(chain_seq=checkpoint.seq + 1)
    hidden.delete()
    AuditCheckpoint.objects.filter(pk=checkpoint.pk).update(
        seq=F("seq") + 1, row_hash=hidden.row_hash
    )
    return checkpoint.seq + 1, "checkpoint signature is invalid"


def delete_checkpoint(checkpoint):
    AuditCheckpoint.objects.all().delete()
    return 1, "link 1 is missing"


def forge_row_below_the_checkpoint(checkpoint):
    forged = SecurityEvent.objects.create(
        event=SecurityEvent.Event.LOGIN_SUCCEEDED,
        actor_name="mallory",
        created_at=timezone.now(),
        chain_seq=1,
        prev_hash="x",
        row_hash="y",
    )
    return 1, f"SecurityEvent {forged.pk} sits below the chain"


@pytest.mark.parametrize(
    "tamper",
    [
        forge_row_below_the_checkpoint,
        edit_kept_row,
        delete_first_kept_row,
        forge_checkpoint_signature,
        move_checkpoint_forward,
        delete_checkpoint,
    ],
)
def test_tampering_after_a_prune_is_caught(tamper):
    with long_ago():
        build_chain("old-")
    build_chain("new-")
    checkpoint = audit.prune_before(cutoff=cutoff()).checkpoint
    position, problem = tamper(checkpoint)

    result = audit.verify_chain()

    assert not result.ok
    assert result.first_bad_seq == position
    assert problem in result.problem


def edit_older_checkpoint_count(older):
    AuditCheckpoint.objects.filter(pk=older.pk).update(rows_pruned=F("rows_pruned") + 100)


def edit_older_checkpoint_time(older):
    AuditCheckpoint.objects.filter(pk=older.pk).update(created_at=F("created_at") - timedelta(1))


def forge_older_checkpoint_signature(older):
    AuditCheckpoint.objects.filter(pk=older.pk).update(signature="0" * 64)


def forge_an_older_checkpoint(older):
    AuditCheckpoint.objects.filter(pk=older.pk).delete()
    checkpoint_with_a_guessed_key(
        seq=older.seq,
        row_hash=older.row_hash,
        created_at=timezone.now() - timedelta(days=365),
        rows_pruned=1,
    )


@pytest.mark.parametrize(
    "tamper",
    [
        edit_older_checkpoint_count,
        edit_older_checkpoint_time,
        forge_older_checkpoint_signature,
        forge_an_older_checkpoint,
    ],
)
def test_tampering_with_an_older_checkpoint_is_caught(tamper):
    """A prune writes a checkpoint per step and verification resumes at the newest: the older
    ones, the signed record of what was pruned when, were never checked, so editing one went
    unseen (found by review)."""
    with long_ago():
        build_chain("old-")
    build_chain("new-")
    audit.prune_before(cutoff=cutoff(), batch=2)
    older, newest = AuditCheckpoint.objects.order_by("seq")[:2]
    assert older.seq < newest.seq
    tamper(older)

    result = audit.verify_chain()

    assert not result.ok
    assert result.first_bad_seq == older.seq
    assert "checkpoint signature is invalid" in result.problem


def test_rows_appended_while_verifying_are_left_for_the_next_verification(monkeypatch):
    """Writers keep appending under live traffic: a verification must not call that tampering
    (nor refuse a prune for it)."""
    build_chain()
    walk = audit.iter_links

    def walk_while_a_writer_appends(*args, **kwargs):
        links = walk(*args, **kwargs)
        yield next(links)
        audit.security_event(event=SecurityEvent.Event.LOGIN_FAILED, reason="meanwhile")
        yield from links

    monkeypatch.setattr(audit, "iter_links", walk_while_a_writer_appends)
    result = audit.verify_chain()
    assert result.ok, result.problem
    assert result.links_checked == LINKS
    monkeypatch.setattr(audit, "iter_links", walk)
    assert audit.verify_chain().links_checked == LINKS + 1


@pytest.mark.parametrize("when", ["before the walk", "during the walk"])
@pytest.mark.parametrize("tampered", [False, True], ids=["sound", "tampered"])
def test_a_prune_committing_while_verifying_is_not_called_tampering(monkeypatch, when, tampered):
    """The nightly prune (another process) deletes rows the walk was about to read: the walk
    is made again from its checkpoint, where a real break is still found."""
    with long_ago():
        build_chain("old-")
    recent = build_chain("new-")
    name = "_rows_outside_the_walk" if when == "before the walk" else "iter_links"
    original = getattr(audit, name)

    def prune_meanwhile(*args, **kwargs):
        monkeypatch.setattr(audit, name, original)  # once
        assert audit.prune_before(cutoff=cutoff()).checkpoint
        if tampered:  # and someone edits a row kept, as well
            ConnectionLog.objects.filter(pk=recent.connection.pk).update(user_agent="curl")
        return original(*args, **kwargs)

    monkeypatch.setattr(audit, name, prune_meanwhile)
    result = audit.verify_chain()
    assert AuditCheckpoint.objects.count() == 1
    if tampered:
        expected = f"ConnectionLog {recent.connection.pk} (opening) was altered"
        assert (result.ok, result.problem) == (False, expected)
    else:
        assert result.ok, result.problem
        assert result.links_checked == LINKS + 1  # from the checkpoint: the recent chain, the prune


def test_a_batched_prune_committing_steps_while_verifying_is_not_called_tampering(monkeypatch):
    """A batched prune commits a checkpoint every step: a long walk sees several. Each walk that
    failed because a newer checkpoint appeared is made again, not only the first."""
    with long_ago():
        for n in range(3):
            build_chain(f"old{n}-")
    build_chain("new-")
    walk, steps = audit.iter_links, []

    def a_step_commits_meanwhile(*args, **kwargs):
        if len(steps) < 2:  # one step of another process's prune during each of two walks
            steps.append(audit._prune_step(cutoff(), 3 * LINKS, batch=LINKS, dry_run=False))
        return walk(*args, **kwargs)

    monkeypatch.setattr(audit, "iter_links", a_step_commits_meanwhile)
    result = audit.verify_chain()

    assert AuditCheckpoint.objects.count() == 2
    assert result.ok, result.problem


def test_a_pruned_connection_restored_from_a_backup_is_caught():
    """Its hashes are genuine, but it belongs below the checkpoint, where nothing may be."""
    with long_ago():
        old = build_chain("old-")
    build_chain("new-")
    backup = ConnectionLog.objects.get(pk=old.connection.pk)
    fields = {f.attname: getattr(backup, f.attname) for f in ConnectionLog._meta.concrete_fields}
    assert audit.prune_before(cutoff=cutoff()).checkpoint is not None
    assert audit.verify_chain().ok
    ConnectionLog.objects.create(**fields)

    result = audit.verify_chain()

    assert not result.ok
    assert (result.first_bad_seq, result.problem) == (
        backup.chain_seq,
        f"ConnectionLog {backup.id} sits below the chain",
    )


@pytest.mark.django_db(transaction=True)
async def test_a_row_the_database_refuses_does_not_hold_back_the_others():
    """A duplicate in a batch is dropped (and logged); every other row of the batch is written."""
    import uuid

    from channels.db import database_sync_to_async
    from django.utils import timezone

    from chat import audit
    from chat.models import ConnectionLog

    buffer = audit.AuditBuffer()
    first, second = uuid.uuid4(), uuid.uuid4()

    def row(pk):
        return ConnectionLog(id=pk, outcome="accepted", username="x", opened_at=timezone.now())

    buffer.add(row(first))
    await buffer.flush()
    buffer.add(row(first))  # the same connection again: refused
    buffer.add(row(second))
    buffer.add(audit.ConnectionClose(second, timezone.now(), 1000, 1, 1))
    await buffer.flush()
    assert buffer.pending == 0
    stored = await database_sync_to_async(
        lambda: {r.id: r.close_code for r in ConnectionLog.objects.all()}
    )()
    assert stored == {first: None, second: 1000}
    assert (await database_sync_to_async(audit.verify_chain)()).ok


@pytest.mark.django_db(transaction=True)
async def test_a_database_failure_while_writing_one_by_one_keeps_the_rest(monkeypatch):
    """After a refused row the batch is written one by one; if the database then fails, what
    is left is kept for the retry, not dropped."""
    from channels.db import database_sync_to_async
    from django.db import IntegrityError, OperationalError

    buffer = audit.AuditBuffer()
    rows = [audit.security_event_row(event="login_failed", reason=f"r{i}") for i in range(3)]
    append, calls = audit.append, []

    def failing(items):
        calls.append(len(items))
        if len(items) > 1:
            raise IntegrityError("a duplicate somewhere")
        if len(calls) == 3:  # the second row on its own: the database goes away
            raise OperationalError("server closed the connection")
        return append(items)

    monkeypatch.setattr(audit, "append", failing)
    for row in rows:
        buffer.add(row)
    await buffer.flush()
    assert buffer.pending == 2  # rows 2 and 3, in order
    monkeypatch.setattr(audit, "append", append)
    await buffer.flush()
    reasons = await database_sync_to_async(
        lambda: list(SecurityEvent.objects.order_by("chain_seq").values_list("reason", flat=True))
    )()
    assert reasons == ["r0", "r1", "r2"]


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("fe80::1%eth0", "fe80::1"),
        ("::ffff:1.2.3.4", "::ffff:1.2.3.4"),
        ("2001:DB8::1", "2001:db8::1"),
        ("2001:db8:0:0:0:0:0:1", "2001:db8::1"),
        ("198.51.100.7", "198.51.100.7"),
    ],
)
def test_every_address_hashes_as_the_database_stores_it(given, stored):
    """A form Django stores differently from Python's would break the chain for good."""
    audit.security_event(event=SecurityEvent.Event.LOGIN_FAILED, ip=given)
    log_connection(ip=given)
    assert set(SecurityEvent.objects.values_list("ip", flat=True)) == {stored}
    assert audit.verify_chain().ok


# --- the link format (docs/audit.md): rows hashed by an earlier version must still verify -------

GOLDEN_KEY = "golden-test-key-not-a-secret-0123456789"


@override_settings(CHAT_AUDIT_HMAC_KEY=GOLDEN_KEY)
def test_link_format_is_the_documented_one():
    values = [
        datetime(2026, 12, 6, 7, 8, 9, 123456, tzinfo=dt_timezone(timedelta(hours=2))),
        UUID("12345678-1234-5678-1234-567812345678"),
        'é"x',
        None,
        42,
        {"b": 1, "a": [1, "z"]},
        True,
    ]
    content = audit.canonical_content(values)
    # UTC to the microsecond, ids as strings, no ASCII escaping, no spaces, sorted keys.
    assert content == (
        '["2026-12-06T05:08:09.123456+00:00","12345678-1234-5678-1234-567812345678",'
        '"é\\"x",null,42,{"a":[1,"z"],"b":1},true]'
    )
    prev = "ab" * 32
    expected = hmac.new(
        GOLDEN_KEY.encode(), f"{prev}|7|message|{content}".encode(), hashlib.sha256
    ).hexdigest()
    # What the implementation before this test computed, pinned.
    assert expected == "14b0151ee74722a33231a1feeacb4e3e204f96c84536b91d49ea6b5cfb8df61c"
    assert audit.link_hash(prev, 7, "message", content) == expected
    # Twice in a row, and under another key: nothing is carried over from an earlier call.
    assert audit.link_hash(prev, 7, "message", content) == expected
    with override_settings(CHAT_AUDIT_HMAC_KEY=GOLDEN_KEY + "-other"):
        assert audit.link_hash(prev, 7, "message", content) != expected


def test_a_trail_started_by_another_process_meanwhile_is_appended_to(monkeypatch):
    """On a flushed database two processes' first writes race: one finds no head, the other
    then commits the head with its first rows. The first must append to that chain, not take
    the rows it now sees for a trail whose head was removed (a 500, seen in CI)."""
    AuditChainHead.objects.all().delete()
    audit.security_event(event=audit.Event.LOGIN_FAILED, reason="first process")
    select_in, calls = audit.sql.select_in, []

    def head_not_there_yet(model, *args, **kwargs):
        calls.append(model)
        if model is AuditChainHead and len(calls) == 1:
            return []  # read before the other process committed
        return select_in(model, *args, **kwargs)

    monkeypatch.setattr(audit.sql, "select_in", head_not_there_yet)
    audit.security_event(event=audit.Event.LOGIN_FAILED, reason="second process")
    assert head().last_seq == 2
    assert audit.verify_chain().ok
