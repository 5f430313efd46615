"""chat.sql: the raw queries of the message path answer what the ORM would."""

import pytest
from django.db import connection
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext

from chat import sql
from chat.models import ConnectionLog, Membership, Message, MessageLog
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
