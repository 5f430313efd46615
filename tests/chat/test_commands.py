"""The management commands: cleanup_tickets, prune_audit_logs, verify_audit_log."""

from datetime import timedelta
from io import StringIO

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.utils import timezone

from accounts import services as account_services
from accounts.models import Ticket
from chat import audit
from chat.models import AuditChainHead, AuditCheckpoint, ConnectionLog, SecurityEvent
from tests.chat.audit_rows import build_chain
from tests.factories import make_room, make_user

pytestmark = pytest.mark.django_db


def run(name: str, *args: str) -> str:
    out = StringIO()
    call_command(name, *args, stdout=out)
    return out.getvalue()


# --- cleanup_tickets -----------------------------------------------------------------------------


def issue(user, room, *, state: str, days_ago: float) -> str:
    """Issue a ticket `days_ago`, and at that time use or revoke it as `state` says."""
    with time_machine.travel(timezone.now() - timedelta(days=days_ago), tick=False):
        issued = account_services.ticket_issue(user=user, room=room, ip="127.0.0.1")
        if state == "used":
            redeemed = account_services.ticket_redeem(
                token=issued.token, room_slug=room.slug, ip="127.0.0.1"
            )
            assert redeemed.error == ""
        elif state == "revoked":
            account_services.tickets_revoke(
                actor=user, tickets=Ticket.objects.filter(pk=issued.row.pk)
            )
    return issued.row.jti


@pytest.fixture
def tickets(settings):
    """Tickets in every state, old (2 days) and recent (1 hour): (to be deleted, to be kept)."""
    # Long-lived tickets first, so that an old ticket can still be unused and valid: it must stay.
    settings.CHAT_TICKET_LIFETIME = timedelta(days=3)
    user, room = make_user(), make_room()
    hour = 1 / 24
    doomed = {
        issue(user, room, state="used", days_ago=2),
        issue(user, room, state="revoked", days_ago=2),
    }
    kept = {
        issue(user, room, state="used", days_ago=hour),
        issue(user, room, state="revoked", days_ago=hour),
        issue(user, room, state="issued", days_ago=2),
        issue(user, room, state="issued", days_ago=0),
    }
    settings.CHAT_TICKET_LIFETIME = timedelta(seconds=30)
    doomed.add(issue(user, room, state="issued", days_ago=2))  # expired long ago
    kept.add(issue(user, room, state="issued", days_ago=hour))  # expired, but recently
    return doomed, kept


def jtis() -> set[str]:
    return set(Ticket.objects.values_list("jti", flat=True))


def test_cleanup_tickets_deletes_old_spent_tickets_only(tickets):
    _, kept = tickets

    out = run("cleanup_tickets", "--older-than", "1d")

    assert jtis() == kept
    assert "Deleted 3 tickets" in out
    assert "used 1, revoked 1, expired unused 1" in out


def test_cleanup_tickets_dry_run_deletes_nothing(tickets):
    doomed, kept = tickets

    out = run("cleanup_tickets", "--older-than", "1d", "--dry-run")

    assert jtis() == doomed | kept
    assert "Would delete 3 tickets" in out


def test_cleanup_tickets_forgets_ended_logins_once_their_tokens_have_expired(settings):
    user = make_user("alice")
    with time_machine.travel(timezone.now() - timedelta(hours=1)):
        account_services.login_end(user=user, credential="jwt:old", jwt=True)
    # A session's login is kept only while a ticket it obtained could still be joining.
    joining = settings.CHAT_TICKET_LIFETIME + account_services.JOINING_GRACE
    with time_machine.travel(timezone.now() - joining - timedelta(seconds=1)):
        account_services.login_end(user=user, credential="session:old", jwt=False)
        account_services.login_end(user=user, credential="jwt:recent", jwt=True)
    account_services.login_end(user=user, credential="session:recent", jwt=False)

    assert "Would delete 2 ended logins" in run("cleanup_tickets", "--dry-run")
    assert account_services.login_has_ended("jwt:old")
    assert "Deleted 2 ended logins" in run("cleanup_tickets")
    assert not account_services.login_has_ended("jwt:old")
    assert not account_services.login_has_ended("session:old")
    assert account_services.login_has_ended("jwt:recent")  # its access tokens still live
    assert account_services.login_has_ended("session:recent")


@pytest.mark.parametrize("older_than", ["86400s", "1440m", "24h", "1d"])
def test_cleanup_tickets_reads_every_duration_unit(tickets, older_than):
    _, kept = tickets

    run("cleanup_tickets", "--older-than", older_than)

    assert jtis() == kept


def test_cleanup_tickets_works_in_batches(tickets):
    _, kept = tickets

    out = run("cleanup_tickets", "--batch-size", "1")

    assert jtis() == kept
    assert "in 3 batches of at most 1" in out


# --- prune_audit_logs and verify_audit_log -------------------------------------------------------


@pytest.fixture
def old_and_new_chain():
    with time_machine.travel(timezone.now() - timedelta(days=40), tick=False):
        build_chain("old-")
    return build_chain("new-")


def test_prune_audit_logs_prunes_and_the_chain_still_verifies(old_and_new_chain):
    out = run("prune_audit_logs", "--days", "30")

    assert "Pruned 8 audit rows" in out
    assert "up to chain position 9" in out
    checkpoint = AuditCheckpoint.objects.get()
    assert checkpoint.seq == 9
    assert SecurityEvent.objects.filter(event=SecurityEvent.Event.AUDIT_PRUNED).exists()
    verified = run("verify_audit_log")
    assert "from checkpoint at 9" in verified
    assert "Audit chain OK" in verified


def test_prune_audit_logs_in_batches_checkpoints_each(old_and_new_chain):
    out = run("prune_audit_logs", "--days", "30", "--batch-size", "4")

    assert "Pruned 8 audit rows" in out
    steps = AuditCheckpoint.objects.count()
    assert steps > 1
    assert f"Checkpoint at position 9 (the last of {steps})" in out
    assert "Audit chain OK" in run("verify_audit_log")


def test_prune_audit_logs_stopped_midway_says_what_it_pruned(old_and_new_chain, monkeypatch):
    """A batch that finds the chain broken stops the prune, but the batches before it have
    committed: "nothing pruned" would send the investigator looking at the wrong chain."""
    step, calls = audit._prune_step, []

    def broken_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise audit.AuditChainBroken(audit.VerifyResult(False, 0, 7, "link 7 is missing"))
        return step(*args, **kwargs)

    monkeypatch.setattr(audit, "_prune_step", broken_at_the_second)
    with pytest.raises(CommandError) as refused:
        run("prune_audit_logs", "--days", "30", "--batch-size", "4")

    checkpoint = AuditCheckpoint.objects.get()
    assert "nothing pruned" not in str(refused.value)
    assert f"pruned up to chain position {checkpoint.seq}" in str(refused.value)
    assert "link 7 is missing" in str(refused.value)


def test_prune_audit_logs_refuses_an_empty_batch(old_and_new_chain):
    with pytest.raises(CommandError, match="--batch-size must be at least 1"):
        run("prune_audit_logs", "--days", "30", "--batch-size", "0")
    assert not AuditCheckpoint.objects.exists()


def test_prune_audit_logs_dry_run_deletes_nothing(old_and_new_chain):
    links = AuditChainHead.objects.get().last_seq

    out = run("prune_audit_logs", "--days", "30", "--dry-run")

    assert "Would prune 8 audit rows" in out
    assert not AuditCheckpoint.objects.exists()
    assert AuditChainHead.objects.get().last_seq == links
    assert ConnectionLog.objects.count() == 4


def test_prune_audit_logs_with_nothing_old_says_so():
    build_chain()

    out = run("prune_audit_logs", "--days", "30")

    assert "Nothing to prune" in out
    assert not AuditCheckpoint.objects.exists()


def test_prune_audit_logs_refuses_a_tampered_chain(old_and_new_chain):
    SecurityEvent.objects.filter(chain_seq=1).update(reason="edited")

    with pytest.raises(CommandError, match=r"nothing pruned: .* broken at position 1"):
        run("prune_audit_logs", "--days", "30")

    assert not AuditCheckpoint.objects.exists()


def test_verify_audit_log_prints_links_checked_and_head():
    build_chain()
    head = AuditChainHead.objects.get()

    out = run("verify_audit_log")

    assert "Links checked: 9, from the start." in out
    assert f"Head: 9:{head.last_hash}" in out


def test_verify_audit_log_fails_with_the_first_broken_position():
    build_chain()
    ConnectionLog.objects.filter(chain_seq=3).update(user_agent="curl")

    with pytest.raises(CommandError, match=r"broken at position 3: .*\(opening\) was altered"):
        run("verify_audit_log")


def test_verify_audit_log_accepts_its_own_anchor_later():
    build_chain()
    head = AuditChainHead.objects.get()
    anchor = f"{head.last_seq}:{head.last_hash}"
    audit.security_event(event=audit.Event.LOGIN_FAILED, ip="192.0.2.1")

    out = run("verify_audit_log", "--anchor", anchor)

    assert "Anchor 9 matches." in out


def test_verify_audit_log_accepts_the_head_it_printed_for_an_empty_chain():
    out = run("verify_audit_log")
    [anchor] = [line.removeprefix("Head: ") for line in out.splitlines() if "Head: " in line]
    assert anchor == "0:" + audit.GENESIS_HASH
    build_chain()

    assert "Anchor 0 matches" in run("verify_audit_log", "--anchor", anchor)
    with pytest.raises(CommandError, match="anchor 0 does not match"):
        run("verify_audit_log", "--anchor", "0:" + "1" * 64)


def rewind_head_after_truncation():
    # Without the key one can still cut the tail and point the head at the new last link.
    SecurityEvent.objects.filter(chain_seq=9).delete()
    survivor = ConnectionLog.objects.get(chain_seq=8)
    AuditChainHead.objects.filter(pk=1).update(last_seq=8, last_hash=survivor.row_hash)
    return "no longer in the chain"


def rewrite_with_the_key():
    # An insider with the key can rewrite a link validly; only the outside anchor disagrees.
    row = SecurityEvent.objects.get(chain_seq=9)
    row.reason = "nothing happened"
    row.row_hash = audit.link_hash(row.prev_hash, 9, audit.KIND_SECURITY, audit.row_content(row))
    row.save()
    AuditChainHead.objects.filter(pk=1).update(last_hash=row.row_hash)
    return "does not match"


@pytest.mark.parametrize("attack", [rewind_head_after_truncation, rewrite_with_the_key])
def test_verify_audit_log_anchor_catches_what_the_chain_cannot(attack):
    build_chain()
    head = AuditChainHead.objects.get()
    anchor = f"{head.last_seq}:{head.last_hash}"
    problem = attack()
    assert "Audit chain OK" in run("verify_audit_log")  # the chain alone is fooled

    with pytest.raises(CommandError, match=problem):
        run("verify_audit_log", "--anchor", anchor)


# --- bad arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("cleanup_tickets", ["--older-than=-1d"], "not a duration"),
        ("cleanup_tickets", ["--older-than", "1x"], "not a duration"),
        ("cleanup_tickets", ["--older-than", "1.5h"], "not a duration"),
        ("cleanup_tickets", ["--older-than", "soon"], "not a duration"),
        ("cleanup_tickets", ["--older-than", ""], "not a duration"),
        ("cleanup_tickets", ["--older-than", "99999999999999d"], "too long"),
        # Tickets used within the joining grace are still read (found by review).
        ("cleanup_tickets", ["--older-than", "0s"], "too short: at least 90s"),
        ("cleanup_tickets", ["--older-than", "89s"], "too short: at least 90s"),
        ("cleanup_tickets", ["--batch-size", "0"], "between 1 and"),
        ("cleanup_tickets", ["--batch-size", "-5"], "between 1 and"),
        ("cleanup_tickets", ["--batch-size", "1000000"], "between 1 and"),
        ("cleanup_tickets", ["--batch-size", "many"], "invalid int value"),
        ("prune_audit_logs", [], "--days"),
        ("prune_audit_logs", ["--days", "-1"], "at least 1"),
        ("prune_audit_logs", ["--days", "0"], "at least 1"),
        ("prune_audit_logs", ["--days", "ninety"], "invalid int value"),
        ("prune_audit_logs", ["--days", "999999999"], "before year 1"),
        ("verify_audit_log", ["--anchor", "latest"], "SEQ:HASH"),
        ("verify_audit_log", ["--anchor", "9:not-a-hash"], "SEQ:HASH"),
    ],
)
def test_bad_arguments_fail_clearly(command, args, message):
    with pytest.raises(CommandError, match=message):
        run(command, *args)
