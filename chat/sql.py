"""Bulk writes the ORM makes expensive."""

from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Any

from django.db import models, transaction

# Pairs per query in select_pairs: the OR chain stays well inside SQLite's expression depth
# limit (1,000).
PAIRS_PER_QUERY = 200


def build(model: type[models.Model], **values: Any) -> models.Model:
    """A new, unsaved instance from attribute names (`room_id`, not `room`), built positionally.

    `Model(**kwargs)` resolves every keyword against every field and asks each missing field for
    its default (a foreign key's default checks it against the related model): 8.3 µs for a
    MessageLog, 5.7 µs this way, and every message builds two rows. Passing values in field
    order is how Django builds the rows it reads. Callable defaults are called per instance, as
    Model() does.
    """
    args = []
    for attname, default in _layout(model):
        args.append(values.pop(attname) if attname in values else default())
    if values:
        raise TypeError(f"{model.__name__} has no field(s) {', '.join(sorted(values))}")
    return model(*args)


@cache
def _layout(model: type[models.Model]) -> list[tuple[str, Callable[[], Any]]]:
    layout = []
    for field in model._meta.concrete_fields:
        if field.has_db_default() or getattr(field, "generated", False):
            # Model() makes a fresh DatabaseDefault per instance and leaves generated fields
            # unset; insert_many could not write either. Use the ORM for such models.
            raise TypeError(f"build() does not handle {model.__name__}.{field.name}")
        if field.has_default():
            default = field.get_default
        else:
            constant = field.get_default()
            default = lambda constant=constant: constant  # noqa: E731
        layout.append((field.attname, default))
    return layout


def update_many(
    model: type[models.Model], fields: Sequence[str], rows: Iterable[tuple[Any, Sequence[Any]]]
) -> None:
    """UPDATE `fields` of many rows, given as (primary key, values), in the current transaction.

    One prepared statement executed per row. QuerySet.bulk_update writes one CASE WHEN per column
    and row instead, which costs more to build than the rows cost to write.
    """
    connection = transaction.get_connection()
    quote = connection.ops.quote_name
    meta = model._meta
    columns = [meta.get_field(name) for name in fields]
    assignments = ", ".join(f"{quote(field.column)} = %s" for field in columns)
    # Only names from the model go into the text; every value is a parameter.
    sql = f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s"  # noqa: S608
    params = [
        [f.get_db_prep_save(value, connection) for f, value in zip(columns, values, strict=True)]
        + [meta.pk.get_db_prep_value(pk, connection)]
        for pk, values in rows
    ]
    if params:
        with connection.cursor() as cursor:
            cursor.executemany(sql, params)


def insert_many(objs: Sequence[models.Model]) -> None:
    """INSERT model instances of one model, in order, in the current transaction.

    One prepared statement executed per row, like update_many. QuerySet.bulk_create compiles the
    SQL and converts each value through the whole compiler, most of the cost of writing a batch
    of messages with their audit rows. Generated primary keys are not read back.
    """
    if not objs:
        return
    model = type(objs[0])
    connection = transaction.get_connection()
    quote = connection.ops.quote_name
    meta = model._meta
    fields = [f for f in meta.concrete_fields if not (f.primary_key and f.db_returning)]
    columns = ", ".join(quote(f.column) for f in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    sql = f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES ({placeholders})"  # noqa: S608
    params = [
        [f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields] for obj in objs
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


def select_in(
    model: type[models.Model],
    fields: Sequence[str],
    *,
    for_update: bool = False,
    order_by: str | None = None,
    **where: Iterable[Any],
) -> list[models.Model]:
    """Instances of `model` with `fields` loaded, whose columns are in the given value lists.

    `select_in(Room, ["slug"], pk=[1, 2])` runs SELECT id, slug FROM chat_room WHERE id IN (1, 2).
    The SQL text comes from the model's metadata (names quoted by the backend, values always
    parameters) and goes through Model.objects.raw(), which converts values like the ORM does
    but skips the query compiler: on the message path that compiler cost more than the queries.
    """
    connection = transaction.get_connection()
    quote = connection.ops.quote_name
    meta = model._meta
    conditions, params = [], []
    for name, values in where.items():
        field = _field(meta, name)
        values = list(values)
        if not values:
            return []
        conditions.append(f"{quote(field.column)} IN ({', '.join(['%s'] * len(values))})")
        params += [field.get_db_prep_value(v, connection) for v in values]
    return _select(model, fields, " AND ".join(conditions), params, for_update, order_by)


def select_pairs(
    model: type[models.Model],
    fields: Sequence[str],
    columns: tuple[str, str],
    pairs: Iterable[tuple[Any, Any]],
) -> list[models.Model]:
    """Instances of `model` with `fields` loaded whose two `columns` equal one of `pairs`.

    The WHERE clause is (a = %s AND b = %s) OR ...: one probe of a two-column index per pair,
    on SQLite and PostgreSQL alike. `a IN (...) AND b IN (...)` probes every combination (for a
    batch of 200 messages by 180 authors SQLite made 36,000 probes, 11 ms, against 0.1 ms),
    and SQLite answers a row-value `(a, b) IN (...)` with a table scan.
    """
    connection = transaction.get_connection()
    quote = connection.ops.quote_name
    meta = model._meta
    first, second = _field(meta, columns[0]), _field(meta, columns[1])
    term = f"({quote(first.column)} = %s AND {quote(second.column)} = %s)"
    pairs = list(dict.fromkeys(pairs))
    found: list[models.Model] = []
    for start in range(0, len(pairs), PAIRS_PER_QUERY):
        chunk = pairs[start : start + PAIRS_PER_QUERY]
        params = []
        for a, b in chunk:
            params += [
                first.get_db_prep_value(a, connection),
                second.get_db_prep_value(b, connection),
            ]
        found += _select(model, fields, " OR ".join([term] * len(chunk)), params)
    return found


def _field(meta, name: str):
    return meta.pk if name == "pk" else meta.get_field(name)


def _select(
    model: type[models.Model],
    fields: Sequence[str],
    where: str,
    params: list[Any],
    for_update: bool = False,
    order_by: str | None = None,
) -> list[models.Model]:
    connection = transaction.get_connection()
    quote = connection.ops.quote_name
    meta = model._meta
    columns = [meta.pk, *(meta.get_field(name) for name in fields)]
    sql = (
        f"SELECT {', '.join(quote(c.column) for c in dict.fromkeys(columns))} "  # noqa: S608
        f"FROM {quote(meta.db_table)} WHERE {where}"
    )
    if order_by:
        sql += f" ORDER BY {quote(meta.get_field(order_by).column)}"
    if for_update and connection.features.has_select_for_update:
        sql += " FOR UPDATE"
    return list(model.objects.raw(sql, params))
