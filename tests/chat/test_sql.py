"""chat.sql: the raw queries of the message path answer what the ORM would."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection, models
from django.db.models.functions import Now
from django.db.models.signals import post_init, pre_init
from django.test.utils import CaptureQueriesContext

from accounts import services as accounts_services
from chat import audit, selectors, sql
from chat.models import (
    AuditChainHead,
    ConnectionLog,
    Membership,
    Message,
    MessageLog,
    Room,
    SecurityEvent,
)
from tests.factories import make_member, make_room, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def grid():
    """Three rooms, three users, every user in every room."""
    rooms = [make_room() for _ in range(3)]
    users = [make_user() for _ in range(3)]
    for room in rooms:
        for user in users:
            make_member(room, user)
    return rooms, users


def pairs_of(rows):
    return sorted((m.room_id, m.user_id) for m in rows)


def test_select_pairs_answers_the_pairs_and_not_their_combinations(grid):
    (r1, r2, _), (u1, u2, _) = grid
    wanted = [(r1.pk, u1.pk), (r2.pk, u2.pk)]
    rows = sql.select_pairs(Membership, ["room", "user", "role"], ("room", "user"), wanted)
    assert pairs_of(rows) == sorted(wanted)  # not (r1, u2) nor (r2, u1)
    assert {m.role for m in rows} == {Membership.Role.MEMBER}


def test_select_pairs_skips_pairs_that_match_nothing_and_repeats(grid):
    (r1, _, _), (u1, _, _) = grid
    wanted = [(r1.pk, u1.pk), (r1.pk, u1.pk), (r1.pk, 10**9), (10**9, u1.pk)]
    rows = sql.select_pairs(Membership, ["room", "user"], ("room", "user"), wanted)
    assert pairs_of(rows) == [(r1.pk, u1.pk)]
    assert sql.select_pairs(Membership, ["room"], ("room", "user"), []) == []


def test_select_pairs_splits_long_lists_into_queries(grid, monkeypatch):
    rooms, users = grid
    monkeypatch.setattr(sql, "PAIRS_PER_QUERY", 4)
    wanted = [(r.pk, u.pk) for r in rooms for u in users]  # 9 pairs: 3 queries
    with CaptureQueriesContext(connection) as queries:
        rows = sql.select_pairs(Membership, ["room", "user"], ("room", "user"), wanted)
    assert pairs_of(rows) == sorted(wanted)
    assert len(queries) == 3
    assert " OR " in queries[0]["sql"]
    assert " IN " not in queries[0]["sql"]


def test_select_in_still_answers_value_lists(grid):
    (r1, r2, _), (u1, _, _) = grid
    rows = sql.select_in(Membership, ["room", "user"], room=[r1.pk, r2.pk], user=[u1.pk])
    assert pairs_of(rows) == sorted([(r1.pk, u1.pk), (r2.pk, u1.pk)])
    assert sql.select_in(Membership, ["room"], room=[]) == []


def field_values(instance) -> dict:
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


@pytest.mark.parametrize(
    ("model", "values"),
    [
        (Message, {"room_id": 1, "seq": 7, "author_id": 2, "body": "hi", "client_id": "c-1"}),
        (MessageLog, {"event": "sent", "user_id": 2, "username": "bob", "ip": "::1", "seq": 3}),
        (ConnectionLog, {"username": "bob", "outcome": "accepted"}),
    ],
)
def test_build_makes_what_the_model_constructor_makes(model, values):
    built, constructed = sql.build(model, **values), model(**values)
    # Callable defaults (uuid4, timezone.now) differ per instance by design.
    per_instance = {
        f.attname for f in model._meta.concrete_fields if f.has_default() and callable(f.default)
    }
    built_values, constructed_values = field_values(built), field_values(constructed)
    for name in per_instance:
        assert built_values.pop(name) is not None
        constructed_values.pop(name)
    assert built_values == constructed_values
    assert built._state.adding


def test_build_calls_callable_defaults_per_instance():
    first, second = sql.build(ConnectionLog), sql.build(ConnectionLog)
    assert first.id != second.id  # uuid4 per row
    message = sql.build(Message, room_id=1, seq=1, author_id=1, body="x", client_id="c")
    assert message.created_at is not None  # timezone.now


def test_build_refuses_names_that_are_not_attribute_names():
    with pytest.raises(TypeError, match="room"):
        sql.build(Message, room=object(), seq=1)


def test_build_refuses_models_it_cannot_build_like_the_constructor(monkeypatch):
    # Model() gives each instance a fresh DatabaseDefault; build() would share one.
    monkeypatch.setattr(Message._meta.get_field("body"), "db_default", Now())
    sql._layout.cache_clear()
    try:
        with pytest.raises(TypeError, match=r"Message\.body"):
            sql.build(Message, room_id=1, seq=1, author_id=1, client_id="c")
    finally:
        monkeypatch.undo()
        sql._layout.cache_clear()
    assert sql.build(Message, room_id=1, seq=1, author_id=1, body="b", client_id="c").body == "b"


# --- insert_many: values converted as get_db_prep_save would, at a fraction of its cost ----------

NOW = datetime(2026, 12, 4, 17, 30, 1, 234567, tzinfo=UTC)


def hot_rows():
    """Rows of every model the message path inserts, with each kind of value it writes."""
    message = sql.build(
        Message,
        room_id=3,
        seq=2**40,
        author_id=None,
        body="ünï\ncode",
        client_id="c-1",
        created_at=NOW,
    )
    log = sql.build(
        MessageLog,
        event="sent",
        user_id=5,
        username="bob",
        room_id=3,
        room_slug="r",
        seq=7,
        connection_id=uuid.uuid4(),
        ip="2001:db8::1",
        created_at=NOW,
        chain_seq=9,
        prev_hash="a" * 64,
        row_hash="b" * 64,
    )
    connection_row = sql.build(
        ConnectionLog,
        username="bob",
        outcome="accepted",
        ip="10.0.0.1",
        opened_at=NOW,
        chain_seq=10,
        prev_hash="c" * 64,
        row_hash="d" * 64,
    )
    event = SecurityEvent(
        event=SecurityEvent.Event.RATE_LIMITED,
        details={"n": 1, "why": "x"},
        ip=None,
        created_at=NOW,
        chain_seq=11,
        prev_hash="e" * 64,
        row_hash="f" * 64,
    )
    return [message, log, connection_row, event]


@pytest.mark.parametrize("row", hot_rows(), ids=lambda row: type(row).__name__)
def test_insert_many_converts_values_exactly_as_get_db_prep_save(row):
    _, columns = sql._insert_plan(type(row), connection.vendor)
    fields = [f for f in type(row)._meta.concrete_fields if not (f.primary_key and f.db_returning)]
    for (attname, _, unchanged, _), field in zip(columns, fields, strict=True):
        assert attname == field.attname
        value = field.pre_save(row, True)
        if type(value) in unchanged:
            expected = field.get_db_prep_save(value, connection)
            # Same value and same type: psycopg 3 binds a typed integer differently from an int.
            assert (type(expected), expected) == (type(value), value), field.name


@pytest.mark.parametrize(
    "field",
    [
        models.CharField(max_length=5),
        models.TextField(null=True),
        models.PositiveBigIntegerField(null=True),
        models.IntegerField(),
        models.ForeignKey(Room, on_delete=models.CASCADE),
        models.DateTimeField(null=True),
        models.UUIDField(null=True),
        models.GenericIPAddressField(null=True),
        models.JSONField(null=True),
        models.EmailField(),  # a subclass: trusted with nothing
    ],
    ids=lambda field: type(field).__name__,
)
@pytest.mark.parametrize("value", ["x", "", 0, 7, 2**62, True, None, NOW, uuid.uuid4(), 1.5])
def test_values_passed_unchanged_are_the_ones_django_leaves_unchanged(field, value):
    if isinstance(field, models.ForeignKey):
        field.set_attributes_from_name("room")
        field.remote_field.model = Room
    unchanged = sql._unchanged_types(field, connection)
    if type(value) not in unchanged:
        return
    converted = field.get_db_prep_save(value, connection)
    assert (type(converted), converted) == (type(value), value)


def test_the_integer_shortcut_follows_the_backend():
    kept = sql._unchanged_types(models.IntegerField(), connection)
    # SQLite's driver takes ints as they are; psycopg 3 gets typed integers (Int4, Int8...).
    assert (int in kept) is (connection.vendor == "sqlite")
    assert sql._unchanged_types(models.EmailField(), connection) == frozenset()
    assert sql._unchanged_types(models.JSONField(null=True), connection) == frozenset()


def test_insert_many_writes_what_the_orm_reads_back(grid):
    (room, _, _), (author, _, _) = grid
    shared_at, other_at = NOW, NOW + timedelta(seconds=1)
    rows = [
        sql.build(
            Message,
            room_id=room.pk,
            seq=seq,
            author_id=author.pk if seq != 2 else None,
            body=f"body {seq}",
            client_id=f"c-{seq}",
            created_at=at,
        )
        for seq, at in [(1, shared_at), (2, shared_at), (3, other_at), (4, shared_at)]
    ]
    sql.insert_many(rows)
    stored = list(Message.objects.filter(room=room).order_by("seq"))
    assert [(m.seq, m.author_id, m.body, m.client_id, m.created_at) for m in stored] == [
        (1, author.pk, "body 1", "c-1", shared_at),
        (2, None, "body 2", "c-2", shared_at),
        (3, author.pk, "body 3", "c-3", other_at),
        (4, author.pk, "body 4", "c-4", shared_at),
    ]


def test_insert_many_converts_a_value_shared_by_rows_once(grid, monkeypatch):
    (room, _, _), (author, _, _) = grid
    field = Message._meta.get_field("created_at")
    calls = []
    original = field.get_db_prep_save
    monkeypatch.setattr(
        field, "get_db_prep_save", lambda v, connection: calls.append(v) or original(v, connection)
    )
    sql._insert_plan.cache_clear()
    try:
        later = NOW + timedelta(seconds=1)
        sql.insert_many(
            [
                sql.build(
                    Message,
                    room_id=room.pk,
                    seq=seq,
                    author_id=author.pk,
                    body="b",
                    client_id=f"s-{seq}",
                    created_at=at,
                )
                for seq, at in [(1, NOW), (2, NOW), (3, later), (4, NOW)]
            ]
        )
    finally:
        sql._insert_plan.cache_clear()
    assert calls == [NOW, later]  # one conversion per value object, not per row


# --- build: Django's constructor only when something could tell the difference -------------------


def test_build_calls_a_model_s_own_constructor(monkeypatch):
    calls = []

    def __init__(self, *args, **kwargs):
        calls.append(args)
        models.Model.__init__(self, *args, **kwargs)

    monkeypatch.setattr(Message, "__init__", __init__, raising=False)
    sql._plain.cache_clear()
    try:
        message = sql.build(Message, room_id=1, seq=1, author_id=2, body="b", client_id="c")
    finally:
        monkeypatch.undo()
        sql._plain.cache_clear()
    assert len(calls) == 1
    assert message.body == "b"
    sql.build(Message, room_id=1, seq=1, author_id=2, body="b", client_id="c")
    assert len(calls) == 1  # Django's own constructor again: build fills the instance itself


def test_build_goes_through_the_constructor_while_init_signals_are_heard():
    heard = []

    def receiver(sender, **kwargs):
        heard.append(sender)

    pre_init.connect(receiver, sender=Message)
    try:
        message = sql.build(Message, room_id=1, seq=1, author_id=2, body="b", client_id="c")
    finally:
        pre_init.disconnect(receiver, sender=Message)
    assert heard == [Message]
    assert message.body == "b"
    quiet = sql.build(Message, room_id=1, seq=1, author_id=2, body="b", client_id="c")
    assert heard == [Message]  # nobody listening: no constructor, no signal
    assert field_values(quiet) | {"created_at": None} == field_values(message) | {
        "created_at": None
    }
    assert quiet._state.adding
    assert quiet._state.db is None
    assert "room" not in quiet._state.fields_cache


# --- get: the handshake path's lookups by key ----------------------------------------------------


def test_get_loads_every_field_of_the_one_row(grid, django_assert_num_queries):
    (room, _, _), (user, _, _) = grid
    with django_assert_num_queries(1):
        found = sql.get(Membership, room=room.pk, user=user.pk)
        loaded = field_values(found)  # no deferred field left to fetch
    assert loaded == field_values(Membership.objects.get(room=room, user=user))
    assert found._state.adding is False  # a stored row: save() would UPDATE it
    assert sql.get(Room, slug=room.slug).title == room.title
    assert sql.get(Room, slug="no-such-room") is None


def test_lookups_refuse_none_rather_than_match_nothing(grid):
    # The ORM reads filter(x=None) as IS NULL; an IN list cannot say that.
    with pytest.raises(ValueError, match="None"):
        sql.get(Message, author=None, client_id="c")
    with pytest.raises(ValueError, match="None"):
        sql.select_in(Room, ["slug"], pk=[1, None])


def test_get_refuses_a_lookup_that_names_several_rows(grid):
    (room, _, _), _ = grid
    with pytest.raises(Membership.MultipleObjectsReturned):
        sql.get(Membership, room=room.pk)


# --- get_each: independent lookups by key in one statement --------------------------------------


def test_get_each_answers_each_lookup_in_one_statement(grid, django_assert_num_queries):
    (room, _, _), (user, _, _) = grid
    with django_assert_num_queries(1):
        found_room, membership, found_user = sql.get_each(
            (Room, None, {"pk": room.pk}),
            (Membership, None, {"room": room.pk, "user": user.pk}),
            (type(user), ["is_active"], {"pk": user.pk}),
        )
        loaded = field_values(found_room), field_values(membership)
    assert loaded == (
        field_values(Room.objects.get(pk=room.pk)),
        field_values(Membership.objects.get(room=room, user=user)),
    )
    assert found_user.is_active is True
    assert found_user.get_deferred_fields() == {
        f.attname for f in type(user)._meta.concrete_fields if f.attname not in ("id", "is_active")
    }
    assert found_room._state.adding is False


def test_get_each_gives_none_for_a_lookup_that_finds_nothing_and_the_others_their_rows(grid):
    (room, _, _), (user, _, _) = grid
    missing, membership, found = sql.get_each(
        (Room, ["slug"], {"slug": "no-such-room"}),
        (Membership, ["role"], {"room": room.pk, "user": user.pk}),
        (Room, ["slug"], {"pk": room.pk}),
    )
    assert (missing, membership.role, found.slug) == (None, "member", room.slug)
    assert sql.get_each((Room, None, {"pk": -1}), (Room, None, {"pk": -2})) == [None, None]


def test_get_each_converts_every_column_as_the_orm_does(grid):
    expected = stored_rows(grid)
    found = sql.get_each(*((type(row), None, {"pk": row.pk}) for row in expected))
    assert [typed_values(row) for row in found] == [typed_values(row) for row in expected]


def test_get_each_refuses_a_lookup_that_names_several_rows_or_none(grid):
    (room, _, _), _ = grid
    with pytest.raises(Membership.MultipleObjectsReturned):
        sql.get_each((Room, None, {"pk": room.pk}), (Membership, None, {"room": room.pk}))
    with pytest.raises(ValueError, match="None"):
        sql.get_each((Room, None, {"slug": None}))


def test_get_each_finds_a_row_by_a_column_of_a_row_found_before(grid, django_assert_num_queries):
    (room, other, _), (user, _, _) = grid
    with django_assert_num_queries(1):
        found, membership = sql.get_each(
            (Room, ["slug"], {"slug": room.slug}),
            (Membership, None, {"room": sql.Found(0), "user": user.pk}),
        )
    assert (found, membership) == (room, Membership.objects.get(room=room, user=user))
    # The membership follows the row found: another room, that room's membership.
    found, membership = sql.get_each(
        (Room, [], {"slug": other.slug}),
        (Membership, ["room"], {"user": user.pk, "room": sql.Found(0, "pk")}),
    )
    assert (found.pk, membership.room_id, membership.user_id) == (other.pk, other.pk, user.pk)
    # No room, so no membership, whatever else matches.
    assert sql.get_each(
        (Room, None, {"slug": "no-such-room"}),
        (Membership, None, {"room": sql.Found(0), "user": user.pk}),
    ) == [None, None]


def test_get_each_builds_a_shape_s_statement_once_and_binds_each_call_s_values(grid, monkeypatch):
    rooms, (user, _, _) = grid
    built = sql._each_statement
    calls = []
    monkeypatch.setattr(sql, "_statements", {})
    monkeypatch.setattr(sql, "_each_statement", lambda *args: calls.append(args) or built(*args))
    found = [
        sql.get_each(
            (Room, ["slug"], {"slug": room.slug}),
            (Membership, ["room", "role"], {"room": sql.Found(0), "user": user.pk}),
        )
        for room in rooms
    ]
    assert [(r.pk, m.room_id) for r, m in found] == [(room.pk, room.pk) for room in rooms]
    assert len(calls) == 1  # built for the first call; the others bound their values to it


def test_get_each_refuses_a_reference_to_a_lookup_not_made_before(grid):
    (room, _, _), (user, _, _) = grid
    for position in (1, 2, -1):
        with pytest.raises(ValueError, match="not an earlier lookup"):
            sql.get_each(
                (Room, None, {"pk": room.pk}),
                (Membership, None, {"room": sql.Found(position), "user": user.pk}),
            )


def test_a_socket_s_context_and_a_ticket_s_redemption_read_in_one_statement(
    grid, django_assert_num_queries
):
    (room, _, _), (user, _, _) = grid
    with django_assert_num_queries(1):
        context = selectors.socket_context(
            room_id=room.pk, user_id=user.pk, jti="none", credential="jwt:none"
        )
    assert (context.room, context.membership.user_id, context.user_active) == (room, user.pk, True)
    assert context.ticket_revoked is False
    assert context.audit_seq == AuditChainHead.objects.get().last_seq
    accounts_services.login_end(user=user, credential="jwt:none", jwt=True)
    audit.security_event(event=audit.Event.LOGIN_FAILED, ip="192.0.2.1")  # the chain moves on
    ended = selectors.socket_context(room_id=room.pk, user_id=user.pk, credential="jwt:none")
    assert ended.ticket_revoked is True
    assert ended.audit_seq == AuditChainHead.objects.get().last_seq > context.audit_seq
    issued = accounts_services.ticket_issue(user=user, room=room, ip="127.0.0.1", credential="c")
    with django_assert_num_queries(2):  # the reads, then the single-use claim
        redeemed = accounts_services.ticket_redeem(
            token=issued.token, room_slug=room.slug, ip="127.0.0.1"
        )
    assert (redeemed.error, redeemed.user, redeemed.grant.room_id) == ("", user, room.pk)


# --- reads: what Model.objects.raw() would give, without its machinery ---------------------------


def typed_values(instance) -> dict:
    return {name: (type(value), value) for name, value in field_values(instance).items()}


def stored_rows(grid):
    """One stored row of each model whose columns need converting on the way out."""
    (room, _, _), (user, _, _) = grid
    Room.objects.filter(pk=room.pk).update(archived_at=NOW)  # datetime
    audit.append(
        [
            sql.build(ConnectionLog, username="bob", outcome="accepted", ip="::1", opened_at=NOW),
            audit.security_event_row(event=SecurityEvent.Event.RATE_LIMITED, details={"n": [1]}),
        ]
    )
    return [
        Room.objects.get(pk=room.pk),
        type(user).objects.get(pk=user.pk),  # booleans (integers in SQLite)
        ConnectionLog.objects.get(),  # UUID primary key (text in SQLite), IP
        SecurityEvent.objects.get(),  # JSON
    ]


def test_reads_convert_every_column_as_the_orm_does(grid):
    for expected in stored_rows(grid):
        found = sql.get(type(expected), pk=expected.pk)
        assert typed_values(found) == typed_values(expected), type(expected).__name__
        assert found._state.adding is False
        assert found._state.db == "default"
        assert found.get_deferred_fields() == set()


def test_fields_not_read_are_deferred_and_load_on_access(grid, django_assert_num_queries):
    (room, _, _), _ = grid
    with django_assert_num_queries(1):
        (found,) = sql.select_in(Room, ["last_seq"], pk=[room.pk])
    assert found.get_deferred_fields() == {
        f.attname for f in Room._meta.concrete_fields if f.attname not in ("id", "last_seq")
    }
    with django_assert_num_queries(1):
        assert found.title == room.title


def test_reads_go_through_from_db_while_init_signals_are_heard(grid):
    (room, _, _), _ = grid
    heard = []

    def receiver(sender, instance, **kwargs):
        heard.append(instance)

    post_init.connect(receiver, sender=Room)
    try:
        found = sql.get(Room, pk=room.pk)
    finally:
        post_init.disconnect(receiver, sender=Room)
    assert heard == [found]
    assert found._state.adding is False
    assert typed_values(found) == typed_values(Room.objects.get(pk=room.pk))


# --- update_if: a conditional claim of one row ---------------------------------------------------


def test_update_if_changes_the_row_once_while_its_conditions_hold(grid):
    (room, _, _), (user, _, _) = grid
    membership = Membership.objects.get(room=room, user=user)
    claim = {"banned_at": NOW}
    assert sql.update_if(Membership, membership.pk, claim, null=["banned_at"]) is True
    assert sql.update_if(Membership, membership.pk, claim, null=["banned_at"]) is False
    membership.refresh_from_db()
    assert membership.banned_at == NOW


def test_update_if_leaves_the_row_when_a_later_than_condition_fails(grid):
    (room, _, _), (user, _, _) = grid
    membership = Membership.objects.get(room=room, user=user)
    Membership.objects.filter(pk=membership.pk).update(muted_until=NOW)
    mute = {"role": Membership.Role.MODERATOR}
    assert not sql.update_if(Membership, membership.pk, mute, later={"muted_until": NOW})
    assert sql.update_if(
        Membership, membership.pk, mute, later={"muted_until": NOW - timedelta(seconds=1)}
    )
    assert not sql.update_if(Membership, 10**9, mute)  # no such row
    membership.refresh_from_db()
    assert membership.role == Membership.Role.MODERATOR


# --- the message table's indexes (migration 0006) ------------------------------------------------


def test_a_stored_message_updates_only_the_indexes_it_needs():
    """Two unique constraints (room, seq) and (author, client_id), which also serve lookups by
    room and by author, and a partial index on deleted_by where it is set: the migration leaves
    the database as the model declares it, on each backend."""
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, Message._meta.db_table)
    indexes = {
        tuple(info["columns"]): info["unique"]
        for info in constraints.values()
        if (info["index"] or info["unique"]) and not info["primary_key"]
    }
    assert indexes == {
        ("room_id", "seq"): True,
        ("author_id", "client_id"): True,
        ("deleted_by_id",): False,
    }
    foreign_keys = {info["columns"][0] for info in constraints.values() if info["foreign_key"]}
    if connection.features.supports_foreign_keys:
        assert foreign_keys == {"room_id", "author_id", "deleted_by_id"}


@pytest.mark.parametrize(
    "returning",
    [
        True,
        pytest.param(
            False,
            marks=pytest.mark.skipif(
                connection.vendor != "sqlite",
                reason="the last-insert-id path is for backends without RETURNING",
            ),
        ),
    ],
)
def test_insert_sets_the_generated_key_and_writes_what_the_orm_reads_back(
    grid, monkeypatch, returning
):
    from accounts.models import Ticket

    monkeypatch.setattr(connection.features, "can_return_columns_from_insert", returning)

    (room, other, _), (user, _, _) = grid
    rows = [
        sql.build(
            Ticket,
            jti=f"jti-{n}",
            user_id=user.pk,
            room_id=target.pk,
            ip=ip,
            issued_at=NOW,
            expires_at=NOW + timedelta(seconds=30),
        )
        for n, (target, ip) in enumerate([(room, "127.0.0.1"), (other, "2001:db8::1")])
    ]
    for row in rows:
        sql.insert(row)
    assert rows[0].pk is not None
    assert rows[1].pk == rows[0].pk + 1
    assert not rows[0]._state.adding
    assert rows[0]._state.db == "default"
    stored = {t.pk: t for t in Ticket.objects.all()}
    assert [
        (s.jti, s.user_id, s.room_id, s.ip, s.issued_at, s.expires_at, s.used_at)
        for s in (stored[rows[0].pk], stored[rows[1].pk])
    ] == [
        ("jti-0", user.pk, room.pk, "127.0.0.1", NOW, NOW + timedelta(seconds=30), None),
        ("jti-1", user.pk, other.pk, "2001:db8::1", NOW, NOW + timedelta(seconds=30), None),
    ]


def test_insert_of_a_model_whose_key_it_writes_reads_nothing_back(grid, monkeypatch):
    # ConnectionLog's key is a UUID made by its default: written with the row, not returned.
    (room, _, _), (user, _, _) = grid
    row = sql.build(
        ConnectionLog,
        chain_seq=10**9,  # a chain position no test appends up to; the link itself is not checked
        prev_hash="0" * 64,
        row_hash="1" * 64,
        user_id=user.pk,
        room_id=room.pk,
        ip="127.0.0.1",
        outcome="accepted",
        opened_at=NOW,
    )
    key = row.pk
    with CaptureQueriesContext(connection) as queries:
        sql.insert(row)
    assert row.pk == key
    assert ConnectionLog.objects.filter(pk=key, room=room).exists()
    assert "RETURNING" not in queries[0]["sql"].upper()


def test_insert_refuses_a_key_the_database_would_generate(grid):
    from accounts.models import Ticket

    (room, _, _), (user, _, _) = grid
    row = sql.build(
        Ticket, jti="j", user_id=user.pk, room_id=room.pk, ip="::1", expires_at=NOW, id=12345
    )
    with pytest.raises(ValueError, match="generates its key"):
        sql.insert(row)
    assert not Ticket.objects.exists()
