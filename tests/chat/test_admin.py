"""The admin: read-only audit trail, CSV export, links, security overview, moderation (services)."""

import csv
import io
import re
from datetime import timedelta

import pytest
import time_machine
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth.models import Permission
from django.db import connection
from django.db.models import F
from django.http import StreamingHttpResponse
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from accounts import services as account_services
from accounts.models import Ticket
from chat import audit, services
from chat.admin import ConnectionLogAdmin, EstimatedCountPaginator, SecurityEventAdmin
from chat.models import (
    AuditCheckpoint,
    ConnectionLog,
    Membership,
    Message,
    MessageLog,
    Room,
    SecurityEvent,
)
from tests.chat.audit_rows import build_chain, log_close, log_connection
from tests.factories import make_member, make_room, make_ticket, make_user

pytestmark = pytest.mark.django_db

AUDIT_MODELS = [ConnectionLog, MessageLog, SecurityEvent, AuditCheckpoint]
OVERVIEW = "admin:chat_security_overview"


def admin_url(model, view: str, *args) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def grant(user, *codenames: str) -> None:
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))


def offered_actions(response) -> list[str]:
    form = response.context["action_form"]  # None when the user may run no action
    return [] if form is None else [name for name, _ in form.fields["action"].choices if name]


def results(response) -> list:
    assert response.status_code == 200
    return list(response.context["cl"].result_list)


@pytest.fixture
def admin_user():
    """pytest-django's admin_client signs in as this superuser (made without a fresh hash)."""
    return make_user("admin", is_staff=True, is_superuser=True)


@pytest.fixture
def trail() -> dict:
    """One row of each audit model: an old chain pruned behind a checkpoint, then a new chain.

    Ask for it before admin_client: a login is an audit link, and a recent one first in the chain
    would leave no old prefix to prune.
    """
    with time_machine.travel(timezone.now() - timedelta(days=40), tick=False):
        build_chain("old-")
    checkpoint = audit.prune_before(cutoff=timezone.now() - timedelta(days=30)).checkpoint
    assert checkpoint is not None
    chain = build_chain()
    return {
        ConnectionLog: chain.connection,
        MessageLog: MessageLog.objects.filter(connection_id=chain.connection.pk).first(),
        SecurityEvent: SecurityEvent.objects.filter(event=SecurityEvent.Event.LOGIN_FAILED).get(),
        AuditCheckpoint: checkpoint,
    }


# --- who may see the audit trail -----------------------------------------------------------------


AUDIT_PAGES = [
    *(
        pytest.param(f"admin:chat_{m._meta.model_name}_changelist", id=m._meta.model_name)
        for m in AUDIT_MODELS
    ),
    pytest.param(OVERVIEW, id="overview"),
]


@pytest.mark.parametrize("page", AUDIT_PAGES)
def test_audit_pages_send_non_staff_to_login(client, page):
    client.force_login(make_user("plain"))

    response = client.get(reverse(page))

    assert response.status_code == 302
    assert response.url.startswith(reverse("admin:login"))


@pytest.mark.parametrize("page", AUDIT_PAGES)
def test_audit_pages_refuse_staff_without_view_permission(client, page):
    staff = make_user("staffer", is_staff=True)
    # Every permission on the rest of the site, none to view the audit trail.
    grant(staff, "view_message", "view_room", "view_ticket", "view_user")
    client.force_login(staff)

    assert client.get(reverse(page)).status_code == 403


@pytest.mark.parametrize("model", AUDIT_MODELS, ids=lambda m: m._meta.model_name)
def test_audit_lists_show_rows_to_staff_with_view_permission(trail, client, model):
    staff = make_user("auditor", is_staff=True)
    grant(staff, f"view_{model._meta.model_name}")
    client.force_login(staff)

    rows = results(client.get(admin_url(model, "changelist")))

    assert trail[model] in rows


@pytest.mark.django_db(transaction=True)  # ANALYZE sees committed rows
@pytest.mark.parametrize("filtered", [False, True], ids=["whole table", "filtered"])
def test_a_large_audit_list_is_not_counted_row_by_row(admin_client, monkeypatch, filtered):
    """PostgreSQL: an unfiltered list of a large table shows the planner's estimate instead of
    a COUNT(*) of every row on every page. Filtered lists, and SQLite, count exactly."""
    build_chain()
    monkeypatch.setattr(EstimatedCountPaginator, "exact_below", 2)  # "large", for this test
    table = SecurityEvent._meta.db_table
    postgresql = connection.vendor == "postgresql"
    if postgresql:
        with connection.cursor() as cursor:
            cursor.execute(f'ANALYZE "{table}"')
            cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE relname = %s", [table])
            estimate = cursor.fetchone()[0]
        assert estimate >= 2
    query = "?event__exact=login_failed" if filtered else ""
    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(admin_url(SecurityEvent, "changelist") + query)
    rows = results(response)
    whole = [
        q["sql"]
        for q in queries
        if "COUNT(" in q["sql"].upper() and table in q["sql"] and "WHERE" not in q["sql"].upper()
    ]
    exact = SecurityEvent.objects.filter(event="login_failed" if filtered else F("event"))
    if postgresql and not filtered:
        assert (whole, response.context["cl"].result_count) == ([], estimate)
    else:
        assert response.context["cl"].result_count == len(rows) == exact.count()
        assert len(whole) == (0 if filtered else 1)


@pytest.mark.django_db(transaction=True)
def test_rows_past_a_stale_estimate_can_still_be_paged_to(admin_client, monkeypatch):
    """Rows added since the last ANALYZE are past the estimate's last page: still served."""
    build_chain()
    monkeypatch.setattr(EstimatedCountPaginator, "exact_below", 2)
    monkeypatch.setattr(SecurityEventAdmin, "list_per_page", 1)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f'ANALYZE "{SecurityEvent._meta.db_table}"')
    for n in range(3):
        audit.security_event(event=audit.Event.LOGIN_FAILED, reason=f"later {n}")
    total = SecurityEvent.objects.count()
    oldest = SecurityEvent.objects.order_by("created_at", "chain_seq").first()
    response = admin_client.get(admin_url(SecurityEvent, "changelist"), {"p": total})
    assert results(response) == [oldest]
    past = admin_client.get(admin_url(SecurityEvent, "changelist"), {"p": total + 1})
    if connection.vendor == "postgresql":
        assert results(past) == []  # estimated: an empty page, not an error
    else:
        assert past.status_code == 302  # counted: Django's "out of range" redirect


def test_overview_is_linked_from_the_index_for_those_who_may_see_it(client):
    staff = make_user("auditor", is_staff=True)
    client.force_login(staff)
    assert reverse(OVERVIEW) not in client.get(reverse("admin:index")).content.decode()

    grant(staff, "view_connectionlog", "view_securityevent")

    assert reverse(OVERVIEW) in client.get(reverse("admin:index")).content.decode()
    assert client.get(reverse(OVERVIEW)).status_code == 200


# --- nobody writes to the audit trail through the admin ------------------------------------------


def row_values(row) -> dict:
    return type(row).objects.filter(pk=row.pk).values().get()


@pytest.mark.parametrize("model", AUDIT_MODELS, ids=lambda m: m._meta.model_name)
@pytest.mark.parametrize(
    ("view", "data"),
    [
        ("change", {"username": "mallory", "reason": "edited", "rows_pruned": "0"}),
        ("delete", {"post": "yes"}),
    ],
    ids=["change", "delete"],
)
def test_forged_post_to_an_audit_row_is_refused_for_a_superuser(
    trail, admin_client, model, view, data
):
    row = trail[model]
    before = row_values(row)

    response = admin_client.post(admin_url(model, view, row.pk), data)

    assert response.status_code == 403
    assert row_values(row) == before
    assert audit.verify_chain().ok


@pytest.mark.parametrize("model", AUDIT_MODELS, ids=lambda m: m._meta.model_name)
def test_forged_add_of_an_audit_row_is_refused_for_a_superuser(trail, admin_client, model):
    count = model.objects.count()

    response = admin_client.post(admin_url(model, "add"), {"event": "login_succeeded"})

    assert response.status_code == 403
    assert model.objects.count() == count


@pytest.mark.parametrize("model", AUDIT_MODELS, ids=lambda m: m._meta.model_name)
def test_audit_admins_offer_no_bulk_delete(trail, admin_client, model):
    url = admin_url(model, "changelist")
    page = admin_client.get(url)
    offered = offered_actions(page)
    assert "delete_selected" not in offered
    assert "export_csv" in offered

    response = admin_client.post(
        url, {"action": "delete_selected", "_selected_action": [trail[model].pk], "post": "yes"}
    )

    assert response.status_code == 302  # "no action selected": the choice is not on offer
    assert model.objects.filter(pk=trail[model].pk).exists()


@pytest.mark.parametrize("model", AUDIT_MODELS, ids=lambda m: m._meta.model_name)
def test_audit_detail_page_is_read_only(trail, admin_client, model):
    row = trail[model]

    response = admin_client.get(admin_url(model, "change", row.pk))

    assert response.status_code == 200
    content = response.content.decode()
    assert 'name="_save"' not in content
    assert admin_url(model, "delete", row.pk) not in content
    assert row.row_hash in content


# --- CSV export ----------------------------------------------------------------------------------


def export(client, model, rows):
    return client.post(
        admin_url(model, "changelist"),
        {"action": "export_csv", "_selected_action": [r.pk for r in rows]},
    )


def parse_csv(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode())))


def test_csv_export_streams_a_header_and_the_selected_rows(admin_client):
    chain = build_chain()

    response = export(admin_client, ConnectionLog, [chain.connection, chain.rejected])

    assert isinstance(response, StreamingHttpResponse)
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="connectionlog-')
    header, *lines = parse_csv(b"".join(response.streaming_content))
    assert header == list(ConnectionLogAdmin.csv_fields)
    by_id = {line[header.index("id")]: dict(zip(header, line, strict=True)) for line in lines}
    assert set(by_id) == {str(chain.connection.pk), str(chain.rejected.pk)}
    opened = by_id[str(chain.connection.pk)]
    assert opened["username"] == "alice"
    assert opened["ip"] == "198.51.100.10"
    assert opened["row_hash"] == chain.connection.row_hash
    assert opened["close_code"] == "1000"
    assert by_id[str(chain.rejected.pk)]["reason"] == "ticket_expired"


def test_csv_export_defuses_spreadsheet_formulas(admin_client):
    row = log_connection(user_agent='=HYPERLINK("http://evil.example","x")')

    response = export(admin_client, ConnectionLog, [row])

    header, line = parse_csv(b"".join(response.streaming_content))
    assert line[header.index("user_agent")] == '\'=HYPERLINK("http://evil.example","x")'


@pytest.mark.parametrize("separator", [";", "\t", ","])
def test_csv_export_quotes_every_cell_so_no_separator_starts_a_formula(admin_client, separator):
    agent = f"Mozilla/5.0{separator}=cmd|' /C calc'!A0"
    row = log_connection(user_agent=agent)

    body = b"".join(export(admin_client, ConnectionLog, [row]).streaming_content).decode()

    assert f'"{agent}"' in body
    header, line = body.splitlines()[:2]
    assert header.startswith('"')
    assert (line[0], line[-1]) == ('"', '"')


@pytest.mark.django_db(transaction=True)
async def test_csv_export_streams_asynchronously_under_asgi(async_client):
    def setup():
        build_chain()
        events = list(SecurityEvent.objects.all())
        return make_user("root", is_staff=True, is_superuser=True), events

    superuser, events = await sync_to_async(setup)()
    await async_client.aforce_login(superuser)

    response = await export(async_client, SecurityEvent, events)

    # An async iterator: ASGI sends it as it is read, instead of buffering the whole export.
    assert response.is_async
    body = b"".join([chunk async for chunk in response.streaming_content])
    header, *lines = parse_csv(body)
    assert header[:3] == ["chain_seq", "created_at", "event"]
    assert sorted(line[2] for line in lines) == ["login_failed", "member_added", "room_created"]


# --- search, filters and links between rows ------------------------------------------------------


@pytest.fixture
def connections():
    alice, room = make_user("alice"), make_room("lobby")
    return {
        "alice": log_connection(user=alice, room=room, ip="198.51.100.10", jti="jti-aaa"),
        "near-ip": log_connection(ip="198.51.100.100", jti="jti-bbb"),
        "rejected": log_connection(
            outcome=audit.Outcome.REJECTED, reason=audit.Reason.ORIGIN_DENIED, ip="192.0.2.5"
        ),
    }


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("alic", {"alice"}),
        ("198.51.100.10", {"alice"}),  # exact: not 198.51.100.100
        ("jti-bbb", {"near-ip"}),
        ("lobby", {"alice"}),
    ],
)
def test_connection_search_by_username_ip_jti_and_room(admin_client, connections, query, expected):
    rows = results(admin_client.get(admin_url(ConnectionLog, "changelist"), {"q": query}))

    assert {r.pk for r in rows} == {connections[name].pk for name in expected}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"outcome__exact": "rejected"}, {"rejected"}),
        ({"reason__exact": "origin_denied"}, {"rejected"}),
        ({"outcome__exact": "accepted"}, {"alice", "near-ip"}),
    ],
)
def test_connection_filters(admin_client, connections, filters, expected):
    rows = results(admin_client.get(admin_url(ConnectionLog, "changelist"), filters))

    assert {r.pk for r in rows} == {connections[name].pk for name in expected}


def test_connection_filters_by_room_and_date(admin_client, connections):
    with time_machine.travel(timezone.now() - timedelta(days=400), tick=False):
        log_connection(room=Room.objects.get(slug="lobby"))
    room = Room.objects.get(slug="lobby")
    year = timezone.now().year

    rows = results(
        admin_client.get(
            admin_url(ConnectionLog, "changelist"),
            {"room__id__exact": room.pk, "opened_at__year": year},
        )
    )

    assert [r.pk for r in rows] == [connections["alice"].pk]


@pytest.mark.parametrize(
    ("page", "query"),
    [
        ("admin:chat_connectionlog_changelist", {"jti": "jti-aaa\x00"}),  # the ticket's link
        ("admin:chat_connectionlog_changelist", {"reason__exact": "origin_denied\x00"}),
        ("admin:chat_messagelog_changelist", {"event__exact": "\x00"}),
        ("admin:chat_securityevent_changelist", {"event__exact": "\x00"}),
        ("admin:accounts_ticket_changelist", {"jti": "\x00"}),
        ("admin:auth_group_changelist", {"name": "\x00"}),
        (
            "admin:autocomplete",
            {"app_label": "chat", "model_name": "messagelog", "field_name": "room", "term": "\x00"},
        ),
    ],
)
def test_a_nul_byte_in_an_admin_query_is_a_bad_request_not_an_error(
    admin_client, connections, page, query
):
    """PostgreSQL refuses NUL in text: a filter or autocomplete term carrying one (the search box
    alone is checked by Django) failed its query with a 500 (found by review)."""
    assert admin_client.get(reverse(page), query).status_code == 400


DATE_HIERARCHIES = [
    pytest.param(model, field, id=model._meta.model_name)
    for model, field in [
        (ConnectionLog, "opened_at"),
        (MessageLog, "created_at"),
        (SecurityEvent, "created_at"),
        (AuditCheckpoint, "created_at"),
        (Message, "created_at"),
        (Ticket, "issued_at"),
    ]
]


@pytest.mark.parametrize(("model", "field"), DATE_HIERARCHIES)
@pytest.mark.parametrize(
    "date",
    [
        {"year": "9999"},
        {"year": "9999", "month": "12"},
        {"year": "9999", "month": "12", "day": "31"},
        {"year": "2026", "month": "99999999999999999999"},
    ],
    ids=["last year", "last month", "last day", "huge month"],
)
def test_a_date_hierarchy_link_edited_past_year_9999_is_a_bad_filter(
    admin_client, model, field, date
):
    """Django checks the first day of the hierarchy's range for a ValueError only: the day after
    the last (year 10000) or a month too large for C overflowed with a 500 (found by review)."""
    query = {f"{field}__{part}": value for part, value in date.items()}

    response = admin_client.get(admin_url(model, "changelist"), query)

    assert response.status_code == 302
    assert response.url.endswith("?e=1")


def test_security_event_search_finds_a_ticket_id(admin_client):
    alice, room = make_user("alice"), make_room()
    issued = account_services.ticket_issue(user=alice, room=room, ip="127.0.0.1")
    account_services.tickets_revoke(actor=alice, tickets=Ticket.objects.all())
    audit.security_event(event=audit.Event.LOGIN_FAILED, target=alice)

    rows = results(admin_client.get(admin_url(SecurityEvent, "changelist"), {"q": issued.row.jti}))

    assert [r.event for r in rows] == [SecurityEvent.Event.TICKET_REVOKED]


def test_ticket_links_to_its_connection_rows_by_jti(admin_client, connections):
    alice = make_user("bob")
    issued = account_services.ticket_issue(user=alice, room=make_room(), ip="127.0.0.1")
    mine = log_connection(user=alice, jti=issued.row.jti)

    page = admin_client.get(admin_url(Ticket, "change", issued.row.pk)).content.decode()
    link = re.search(r'href="([^"]*connectionlog/\?jti=[^"]+)"', page)

    assert link is not None
    assert [r.pk for r in results(admin_client.get(link[1].replace("&amp;", "&")))] == [mine.pk]


def test_connection_links_to_its_message_events_and_back(admin_client):
    chain = build_chain()

    page = admin_client.get(admin_url(ConnectionLog, "change", chain.connection.pk))
    link = re.search(r'href="([^"]*messagelog/\?connection=[^"]+)"', page.content.decode())
    events = results(admin_client.get(link[1]))

    assert sorted(e.seq for e in events) == [1, 2]
    assert {e.event for e in events} == {MessageLog.Event.SENT}
    back = admin_client.get(admin_url(MessageLog, "change", events[0].pk)).content.decode()
    assert admin_url(ConnectionLog, "change", chain.connection.pk) in back


# --- security overview ---------------------------------------------------------------------------


def test_security_overview_counts_and_flags_an_ip_over_the_threshold(admin_client, settings):
    settings.CHAT_SECURITY_ALERT_THRESHOLD = 3
    settings.CHAT_SECURITY_ALERT_WINDOW = 300
    now = timezone.now()
    log_connection(user=make_user("alice"))
    log_connection()
    log_close(log_connection())  # closed: not live
    log_connection(opened_at=now - timedelta(seconds=settings.CHAT_MAX_CONNECTION_AGE + 60))
    rejected = audit.Outcome.REJECTED
    for _ in range(3):
        log_connection(outcome=rejected, reason=audit.Reason.TICKET_EXPIRED, ip="192.0.2.66")
    denied = audit.Reason.ORIGIN_DENIED
    log_connection(outcome=rejected, reason=denied, ip="192.0.2.7")
    log_connection(
        outcome=rejected, reason=denied, ip="192.0.2.7", opened_at=now - timedelta(minutes=10)
    )
    log_connection(
        outcome=rejected, reason=denied, ip="192.0.2.7", opened_at=now - timedelta(hours=2)
    )
    audit.security_event(event=audit.Event.ALERT, ip="192.0.2.66", details={"count": 3})

    response = admin_client.get(reverse(OVERVIEW))

    overview = response.context["overview"]
    assert overview.live_count == 2
    assert {(r.reason, r.count) for r in overview.rejections_last_hour} == {
        ("ticket_expired", 3),
        ("origin_denied", 2),
    }
    assert overview.rejected_last_hour == 5
    assert [(r.ip, r.count, r.over_threshold) for r in overview.top_ips] == [
        ("192.0.2.66", 3, True),
        ("192.0.2.7", 1, False),
    ]
    assert [a.ip for a in overview.alerts] == ["192.0.2.66"]
    flagged = re.findall(r'<tr class="over-threshold">(.*?)</tr>', response.content.decode(), re.S)
    assert len(flagged) == 1
    assert "192.0.2.66" in flagged[0]


# --- moderation through the services -------------------------------------------------------------


@pytest.fixture
def posted():
    alice, room = make_user("alice"), make_room("lobby")
    services.message_send(room=room, author=alice, body="hello there", client_id="c1")
    return Message.objects.get(room=room, seq=1)


def test_soft_delete_action_deletes_audits_and_broadcasts(
    admin_client, admin_user, posted, django_capture_on_commit_callbacks
):
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(f"room.{posted.room_id}", channel)

    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(
            admin_url(Message, "changelist"),
            {"action": "soft_delete", "_selected_action": [posted.pk]},
        )

    posted.refresh_from_db()
    assert posted.deleted_at is not None
    assert posted.deleted_by == admin_user
    log = MessageLog.objects.get(event=MessageLog.Event.DELETED)
    assert (log.username, log.room_slug, log.seq) == ("admin", "lobby", 1)
    event = async_to_sync(layer.receive)(channel)
    assert event["type"] == "hub.frame"
    assert '"type":"deleted"' in event["text"].replace(" ", "")


def test_restore_action_restores_and_audits(admin_client, posted):
    moderator = make_user("mod")
    make_member(posted.room, moderator, Membership.Role.MODERATOR)
    services.message_delete(actor=moderator, room=posted.room, seq=posted.seq)

    admin_client.post(
        admin_url(Message, "changelist"), {"action": "restore", "_selected_action": [posted.pk]}
    )

    posted.refresh_from_db()
    assert posted.deleted_at is None
    assert MessageLog.objects.filter(event=MessageLog.Event.RESTORED, username="admin").count() == 1


@pytest.mark.parametrize("who", ["author", "member"])
def test_a_member_may_not_restore_a_message(posted, who):
    """The service behind the admin's restore action checks its actor, as deletion does: a
    member, the author included, may not bring back what a moderator removed."""
    room = posted.room
    moderator = make_user("mod")
    make_member(room, moderator, Membership.Role.MODERATOR)
    services.message_delete(actor=moderator, room=room, seq=posted.seq)
    actor = posted.author if who == "author" else make_user("bob")
    make_member(room, actor)
    with pytest.raises(services.Forbidden, match="may not restore"):
        services.message_restore(actor=actor, message=posted)
    posted.refresh_from_db()
    assert posted.deleted_at is not None
    assert not MessageLog.objects.filter(event=MessageLog.Event.RESTORED).exists()


def test_moderation_actions_need_the_change_permission(client, posted):
    staff = make_user("reader", is_staff=True)
    grant(staff, "view_message")
    client.force_login(staff)
    url = admin_url(Message, "changelist")
    assert offered_actions(client.get(url)) == []

    client.post(url, {"action": "soft_delete", "_selected_action": [posted.pk]})

    posted.refresh_from_db()
    assert posted.deleted_at is None
    assert not MessageLog.objects.filter(event=MessageLog.Event.DELETED).exists()


def test_message_search_by_text_and_author(admin_client, posted):
    other = make_user("bob")
    services.message_send(room=posted.room, author=other, body="something else", client_id="c2")
    url = admin_url(Message, "changelist")

    assert [m.pk for m in results(admin_client.get(url, {"q": "hello"}))] == [posted.pk]
    assert [m.body for m in results(admin_client.get(url, {"q": "bob"}))] == ["something else"]


# --- tickets -------------------------------------------------------------------------------------


def test_revoke_action_revokes_unused_tickets_and_audits(admin_client, admin_user):
    alice, room = make_user("alice"), make_room("lobby")
    unused = account_services.ticket_issue(user=alice, room=room, ip="127.0.0.1").row
    used = account_services.ticket_issue(user=alice, room=room, ip="127.0.0.1")
    account_services.ticket_redeem(token=used.token, room_slug="lobby", ip="127.0.0.1")

    admin_client.post(
        admin_url(Ticket, "changelist"),
        {"action": "revoke", "_selected_action": [unused.pk, used.row.pk]},
    )

    unused.refresh_from_db()
    used.row.refresh_from_db()
    assert unused.revoked_at is not None
    assert used.row.revoked_at is None
    event = SecurityEvent.objects.get(event=SecurityEvent.Event.TICKET_REVOKED)
    assert (event.actor_id, event.target_name, event.room_slug) == (admin_user.pk, "alice", "lobby")
    assert event.details == {"jti": unused.jti}


def test_revoke_action_locks_the_ticket_rows_only(admin_client, admin_user):
    """The tickets are read with their users and rooms (the audit rows name them), but a plain
    FOR UPDATE on that join locked the user and room rows too on PostgreSQL, out of the order
    every other writer takes (room, then users, then the audit chain head)."""
    alice, room = make_user("alice"), make_room("lobby")
    tickets = [
        account_services.ticket_issue(user=alice, room=room, ip="127.0.0.1").row for _ in range(2)
    ]
    ticket_table, user_table, room_table = (
        connection.ops.quote_name(model._meta.db_table) for model in (Ticket, type(alice), Room)
    )

    with CaptureQueriesContext(connection) as queries:
        admin_client.post(
            admin_url(Ticket, "changelist"),
            {"action": "revoke", "_selected_action": [t.pk for t in tickets]},
        )

    [read] = [q["sql"] for q in queries if f"FROM {ticket_table} INNER JOIN" in q["sql"]]
    # The audit rows' users and rooms come in the same statement, not a query per ticket.
    assert f"INNER JOIN {user_table}" in read
    assert f"INNER JOIN {room_table}" in read
    locking = [q["sql"] for q in queries if "FOR UPDATE" in q["sql"]]
    if connection.features.has_select_for_update:
        assert read.endswith(f"FOR UPDATE OF {ticket_table}"), read
        # Single-table locks (the audit chain head's) lock their own row; a join, the tickets.
        assert [sql for sql in locking if " JOIN " in sql] == [read]
    else:
        assert locking == []  # SQLite: the transaction's write lock is the only lock
    assert Ticket.objects.filter(revoked_at__isnull=False).count() == 2
    events = SecurityEvent.objects.filter(event=SecurityEvent.Event.TICKET_REVOKED)
    assert sorted(e.details["jti"] for e in events) == sorted(t.jti for t in tickets)
    assert {(e.actor_id, e.target_name, e.room_slug) for e in events} == {
        (admin_user.pk, "alice", "lobby")
    }


@pytest.mark.parametrize("state", ["issued", "used", "expired", "revoked"])
def test_ticket_state_filter(admin_client, state):
    alice, room = make_user("alice"), make_room("lobby")
    by_state = {"issued": account_services.ticket_issue(user=alice, room=room, ip="127.0.0.1").row}
    used = account_services.ticket_issue(user=alice, room=room, ip="127.0.0.1")
    account_services.ticket_redeem(token=used.token, room_slug="lobby", ip="127.0.0.1")
    by_state["used"] = used.row
    with time_machine.travel(timezone.now() - timedelta(hours=1), tick=False):
        by_state["expired"] = account_services.ticket_issue(
            user=alice, room=room, ip="127.0.0.1"
        ).row
    by_state["revoked"] = account_services.ticket_issue(user=alice, room=room, ip="127.0.0.1").row
    account_services.tickets_revoke(
        actor=alice, tickets=Ticket.objects.filter(pk=by_state["revoked"].pk)
    )

    rows = results(admin_client.get(admin_url(Ticket, "changelist"), {"state": state}))

    assert [t.pk for t in rows] == [by_state[state].pk]
    assert rows[0].state == state


# --- users and rooms -----------------------------------------------------------------------------


def test_deactivate_action_deactivates_audits_and_closes_sockets(
    admin_client, admin_user, django_capture_on_commit_callbacks
):
    alice = make_user("alice")
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(f"user.{alice.pk}", channel)

    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(
            admin_url(type(alice), "changelist"),
            {"action": "deactivate", "_selected_action": [alice.pk, admin_user.pk]},
        )

    alice.refresh_from_db()
    admin_user.refresh_from_db()
    assert not alice.is_active
    assert admin_user.is_active  # never oneself
    event = SecurityEvent.objects.get(event=SecurityEvent.Event.USER_DEACTIVATED)
    assert (event.actor_id, event.target_id) == (admin_user.pk, alice.pk)
    revoke = async_to_sync(layer.receive)(channel)
    assert (revoke["type"], revoke["user"], revoke["code"]) == ("hub.revoke", alice.pk, 4401)


def test_privilege_changes_in_the_admin_record_who_made_them(admin_client, admin_user):
    bob = make_user("bob")
    form = {
        "username": "bob",
        "is_staff": "on",
        "is_superuser": "on",
        "date_joined_0": "2026-01-01",
        "date_joined_1": "00:00:00",
        "initial-date_joined_0": "2026-01-01",
        "initial-date_joined_1": "00:00:00",
    }
    admin_client.post(admin_url(type(bob), "change", bob.pk), form)

    bob.refresh_from_db()
    assert bob.is_superuser
    event = SecurityEvent.objects.get(
        event=SecurityEvent.Event.PRIVILEGES_CHANGED, target_id=bob.pk
    )
    assert (event.actor_id, event.target_id) == (admin_user.pk, bob.pk)
    assert event.details == {"is_staff": [False, True], "is_superuser": [False, True]}


@pytest.mark.parametrize("how", ["delete_view", "bulk_action"])
def test_deleting_users_in_the_admin_is_audited_with_who(admin_client, admin_user, how):
    bob, carol = make_user("bob"), make_user("carol")
    if how == "delete_view":
        admin_client.post(admin_url(type(bob), "delete", bob.pk), {"post": "yes"})
        gone = [bob]
    else:
        admin_client.post(
            admin_url(type(bob), "changelist"),
            {"action": "delete_selected", "_selected_action": [bob.pk, carol.pk], "post": "yes"},
        )
        gone = [bob, carol]

    events = SecurityEvent.objects.filter(event=SecurityEvent.Event.USER_DELETED)
    assert sorted((e.actor_id, e.target_id, e.target_name) for e in events) == sorted(
        (admin_user.pk, user.pk, user.username) for user in gone
    )
    assert not type(bob).objects.filter(pk__in=[u.pk for u in gone]).exists()
    assert audit.verify_chain().ok


@pytest.mark.parametrize("how", ["delete_view", "bulk_action"])
def test_deleting_a_user_who_had_a_ticket_works_in_the_admin(admin_client, admin_user, how):
    """Tickets are read-only in the admin, and Django refuses to delete a user whose rows would
    cascade into a model one may not delete: anyone who had ever opened a socket could not be
    deleted, by a superuser either (found by review)."""
    bob = make_user("bob")
    make_ticket(bob, make_room("lobby", owner=make_user("alice")))

    if how == "delete_view":
        response = admin_client.post(admin_url(type(bob), "delete", bob.pk), {"post": "yes"})
    else:
        response = admin_client.post(
            admin_url(type(bob), "changelist"),
            {"action": "delete_selected", "_selected_action": [bob.pk], "post": "yes"},
        )

    assert response.status_code == 302
    assert not type(bob).objects.filter(pk=bob.pk).exists()
    assert not Ticket.objects.filter(user_id=bob.pk).exists()
    event = SecurityEvent.objects.get(event=SecurityEvent.Event.USER_DELETED)
    assert (event.actor_id, event.target_id) == (admin_user.pk, bob.pk)


def test_user_form_cannot_flip_is_active_around_the_service(admin_client):
    alice = make_user("alice")

    page = admin_client.get(admin_url(type(alice), "change", alice.pk)).content.decode()

    assert 'name="is_active"' not in page


def membership_forms(room=None) -> dict:
    """The (read-only) memberships inline's management form, which every room POST carries."""
    ids = list(room.memberships.values_list("pk", flat=True)) if room else []
    data = {
        "memberships-TOTAL_FORMS": len(ids),
        "memberships-INITIAL_FORMS": len(ids),
        "memberships-MIN_NUM_FORMS": 0,
        "memberships-MAX_NUM_FORMS": 1000,
    }
    for i, pk in enumerate(ids):
        data |= {f"memberships-{i}-id": pk, f"memberships-{i}-room": room.pk}
    return data


def test_room_edit_in_the_admin_goes_through_the_service(admin_client, admin_user):
    room = make_room("lobby", owner=make_user("alice"))

    response = admin_client.post(
        admin_url(Room, "change", room.pk),
        {"title": "Main hall", "visibility": "private", **membership_forms(room)},
    )

    assert response.status_code == 302
    room.refresh_from_db()
    assert (room.title, room.visibility) == ("Main hall", "private")
    event = SecurityEvent.objects.get(event=SecurityEvent.Event.ROOM_UPDATED)
    assert event.actor_id == admin_user.pk
    assert event.details == {"title": ["Lobby", "Main hall"], "visibility": ["public", "private"]}


def test_room_created_in_the_admin_goes_through_the_service(admin_client, admin_user):
    response = admin_client.post(
        admin_url(Room, "add"),
        {"slug": "news", "title": "News", "visibility": "read_only", **membership_forms()},
    )

    assert response.status_code == 302
    room = Room.objects.get(slug="news")
    assert Membership.objects.get(room=room).user == admin_user
    assert SecurityEvent.objects.filter(
        event=SecurityEvent.Event.ROOM_CREATED, room_slug="news"
    ).exists()


def test_csv_exports_are_themselves_audited(admin_client, admin_user):
    chain = build_chain()
    response = export(admin_client, ConnectionLog, [chain.connection, chain.rejected])
    b"".join(response.streaming_content)
    event = SecurityEvent.objects.get(event="audit_exported")
    assert event.actor_id == admin_user.pk
    assert event.details == {"rows_of": "connectionlog", "rows": 2}
    assert audit.verify_chain().ok


# --- privileges: who may grant them, and their audit -------------------------------------------


def test_staff_who_may_change_users_cannot_grant_privileges_or_touch_superusers(client):
    """A helpdesk account with "change user" made itself a superuser through its own change
    form, and could reset a superuser's password (found by review)."""
    from django.contrib.auth.models import Group

    from accounts.models import User

    helpdesk = make_user("helpdesk", is_staff=True)
    grant(helpdesk, "view_user", "change_user", "add_group", "change_group")
    root = make_user("root", is_staff=True, is_superuser=True)
    client.force_login(helpdesk)

    own = client.get(admin_url(User, "change", helpdesk.pk))
    assert own.status_code == 200
    editable = set(own.context["adminform"].form.fields)
    assert not editable & {"is_staff", "is_superuser", "groups", "user_permissions"}
    everything = list(Permission.objects.values_list("pk", flat=True))
    posted = client.post(
        admin_url(User, "change", helpdesk.pk),
        {"username": "helpdesk", "is_superuser": "on", "user_permissions": everything},
    )
    assert posted.status_code == 302
    helpdesk.refresh_from_db()
    assert not helpdesk.is_superuser
    assert helpdesk.user_permissions.count() == 4

    # A superuser's account is not theirs to open, reset or deactivate.
    assert client.get(admin_url(User, "change", root.pk)).status_code == 302  # "not found"
    password = reverse("admin:auth_user_password_change", args=[root.pk])
    assert (
        client.post(
            password, {"password1": "x-New-pass-1", "password2": "x-New-pass-1"}
        ).status_code
        == 404
    )
    client.post(
        admin_url(User, "changelist"), {"action": "deactivate", "_selected_action": [root.pk]}
    )
    root.refresh_from_db()
    assert root.is_active
    assert not root.check_password("x-New-pass-1")
    # Nor are groups, which carry permissions.
    assert client.get(admin_url(Group, "add")).status_code == 403


def test_grants_of_permissions_and_groups_are_audited(admin_client, admin_user):
    """Permissions and groups are many-to-many: saving a user sends no save signal for them,
    so a grant left no audit row, only Django's unchained LogEntry (found by review)."""
    from django.contrib.auth.models import Group

    from accounts.models import User

    mallory = make_user("mallory", is_staff=True)
    helpdesk = Group.objects.create(name="helpdesk")
    posted = admin_client.post(
        admin_url(User, "change", mallory.pk),
        {"username": "mallory", "is_staff": "on", "groups": [helpdesk.pk]},
    )
    assert posted.status_code == 302
    with audit.acting_as(admin_user):
        grant(mallory, "view_securityevent")
        helpdesk.permissions.add(Permission.objects.get(codename="change_user"))
        Permission.objects.get(codename="change_message").user_set.add(mallory)
        mallory.user_permissions.clear()
        helpdesk.user_set.clear()
    rows = SecurityEvent.objects.filter(event=SecurityEvent.Event.PRIVILEGES_CHANGED)
    assert [(r.actor_name, r.target_name, r.details) for r in rows.order_by("pk")] == [
        # The two accounts made privileged (the fixture's superuser, mallory).
        ("", "admin", {"is_staff": [False, True], "is_superuser": [False, True]}),
        ("", "mallory", {"is_staff": [False, True]}),
        ("admin", "mallory", {"groups": {"added": ["helpdesk"]}}),
        ("admin", "mallory", {"user_permissions": {"added": ["chat.view_securityevent"]}}),
        ("admin", "", {"group": "helpdesk", "permissions": {"added": ["accounts.change_user"]}}),
        ("admin", "mallory", {"user_permissions": {"added": ["chat.change_message"]}}),
        (
            "admin",
            "mallory",
            {"user_permissions": {"removed": ["chat.change_message", "chat.view_securityevent"]}},
        ),
        ("admin", "mallory", {"groups": {"removed": ["helpdesk"]}}),
    ]


@pytest.mark.parametrize("how", ["delete_view", "bulk_action"])
def test_deleting_a_group_in_the_admin_is_audited_for_its_members(admin_client, admin_user, how):
    """A group's members lose its permissions when it is deleted; the database cascade sends no
    m2m_changed, so this took privileges from them without an audit row (found by review)."""
    from django.contrib.auth.models import Group

    helpdesk, other = Group.objects.create(name="helpdesk"), Group.objects.create(name="other")
    helpdesk.permissions.add(Permission.objects.get(codename="change_user"))
    mallory, trudy = make_user("mallory", is_staff=True), make_user("trudy", is_staff=True)
    mallory.groups.add(helpdesk, other)
    trudy.groups.add(helpdesk)
    already = set(SecurityEvent.objects.values_list("pk", flat=True))

    if how == "delete_view":
        admin_client.post(admin_url(Group, "delete", helpdesk.pk), {"post": "yes"})
    else:
        admin_client.post(
            admin_url(Group, "changelist"),
            {"action": "delete_selected", "_selected_action": [helpdesk.pk], "post": "yes"},
        )

    assert not Group.objects.filter(pk=helpdesk.pk).exists()
    rows = SecurityEvent.objects.exclude(pk__in=already).order_by("target_name")
    assert [(r.event, r.actor_id, r.target_name, r.details) for r in rows] == [
        ("privileges_changed", admin_user.pk, name, {"groups": {"removed": ["helpdesk"]}})
        for name in ("mallory", "trudy")
    ]
    assert audit.verify_chain().ok
