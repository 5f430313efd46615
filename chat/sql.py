"""The message and handshake paths' SQL, built from model metadata without the query compiler.

Batched inserts and updates, reads by key or by value lists, and a conditional single-row claim:
on these paths Django's query compiler (and QuerySet.raw()'s machinery) cost more than the
database spent answering. Names come from the models and are quoted by the backend; every value
is a parameter, converted as the ORM would convert it.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from inspect import getattr_static
from types import NoneType
from typing import Any

from django.db import models, transaction
from django.db.backends.base.operations import BaseDatabaseOperations
from django.db.models.base import ModelState
from django.db.models.fields.related_descriptors import ForeignKeyDeferredAttribute
from django.db.models.query_utils import DeferredAttribute
from django.db.models.signals import post_init, pre_init

# Pairs per query in select_pairs: the OR chain stays well inside SQLite's expression depth
# limit (1,000).
PAIRS_PER_QUERY = 200


def build(model: type[models.Model], **values: Any) -> models.Model:
    """A new, unsaved instance from attribute names (`room_id`, not `room`), built positionally.

    `Model(**kwargs)` resolves every keyword against every field and asks each missing field for
    its default (a foreign key's default checks it against the related model): 8.3 µs for a
    MessageLog, and every message builds two rows. Callable defaults are called per instance, as
    Model() does. For a model with Django's own constructor and plain field attributes, and while
    nobody listens to pre_init/post_init, the instance is filled in directly, as
    Model.__init__ itself would do with positional values (its signals are then no-ops and its
    setattr calls store into the instance dict); otherwise Model(*values) builds it.
    """
    layout = _layout(model)
    args = []
    for attname, default in layout.fields:
        args.append(values.pop(attname) if attname in values else default())
    if values:
        raise TypeError(f"{model.__name__} has no field(s) {', '.join(sorted(values))}")
    if _fills_directly(model):
        return _filled(model, layout.attnames, args, ModelState())
    return model(*args)


def _filled(model, attnames, values, state: ModelState) -> models.Model:
    """What Model.__init__ makes of positional values, for a model _fills_directly allows."""
    instance = model.__new__(model)
    instance.__dict__["_state"] = state
    instance.__dict__.update(zip(attnames, values, strict=True))
    return instance


_PLAIN_DESCRIPTORS = (DeferredAttribute, ForeignKeyDeferredAttribute)


def _fills_directly(model: type[models.Model]) -> bool:
    """Whether an instance may be filled in without Model.__init__: Django's own constructor
    and from_db, plain field attributes, and nobody listening to pre_init/post_init (whose
    sends are then no-ops)."""
    return _plain(model) and not pre_init.receivers and not post_init.receivers


@cache
def _plain(model: type[models.Model]) -> bool:
    if model.__init__ is not models.Model.__init__ or model.__setattr__ is not object.__setattr__:
        return False
    if model.from_db.__func__ is not models.Model.from_db.__func__:
        return False
    # ForeignKeyDeferredAttribute.__set__ only drops a cached related object, which a new
    # instance has not got; anything else (a custom descriptor) goes through Model().
    return all(
        type(getattr_static(model, field.attname, None)) in _PLAIN_DESCRIPTORS
        for field in model._meta.concrete_fields
    )


@dataclass(frozen=True, slots=True)
class _Layout:
    fields: list[tuple[str, Callable[[], Any]]]  # (attname, default) in concrete field order
    attnames: tuple[str, ...]


@cache
def _layout(model: type[models.Model]) -> _Layout:
    fields = []
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
        fields.append((field.attname, default))
    return _Layout(fields, tuple(attname for attname, _ in fields))


def update_many(
    model: type[models.Model], fields: Sequence[str], rows: Iterable[tuple[Any, Sequence[Any]]]
) -> None:
    """UPDATE `fields` of many rows, given as (primary key, values), in the current transaction.

    One prepared statement executed per row. QuerySet.bulk_update writes one CASE WHEN per column
    and row instead, which costs more to build than the rows cost to write.
    """
    connection = transaction.get_connection()
    meta = model._meta
    update, columns = _update_of(model, fields, connection)
    sql = f"{update} WHERE {connection.ops.quote_name(meta.pk.column)} = %s"
    params = [
        [f.get_db_prep_save(value, connection) for f, value in zip(columns, values, strict=True)]
        + [meta.pk.get_db_prep_value(pk, connection)]
        for pk, values in rows
    ]
    if params:
        with connection.cursor() as cursor:
            cursor.executemany(sql, params)


def update_if(
    model: type[models.Model],
    pk: Any,
    values: dict[str, Any],
    *,
    null: Sequence[str] = (),
    later: dict[str, Any] | None = None,
) -> bool:
    """UPDATE one row's `values` only while its `null` fields are NULL and its `later` fields are
    after the given values; True if the row changed.

    One statement, so the database decides between concurrent callers: of many that try to
    claim the same row, one gets True (a ticket's single use). QuerySet.filter().update()
    writes the same statement through the query compiler, which cost more than the UPDATE.
    """
    connection = transaction.get_connection()
    quote = connection.ops.quote_name
    meta = model._meta
    update, columns = _update_of(model, list(values), connection)
    params = [
        f.get_db_prep_save(v, connection) for f, v in zip(columns, values.values(), strict=True)
    ]
    conditions = [f"{quote(meta.pk.column)} = %s"]
    params.append(meta.pk.get_db_prep_value(pk, connection))
    for name in null:
        conditions.append(f"{quote(meta.get_field(name).column)} IS NULL")
    for name, value in (later or {}).items():
        field = meta.get_field(name)
        conditions.append(f"{quote(field.column)} > %s")
        params.append(field.get_db_prep_value(value, connection))
    with connection.cursor() as cursor:
        cursor.execute(f"{update} WHERE {' AND '.join(conditions)}", params)
        return cursor.rowcount == 1


def _update_of(model: type[models.Model], fields: Sequence[str], connection):
    """`UPDATE <table> SET <column> = %s, ...` for `fields`, and those fields in that order."""
    quote = connection.ops.quote_name
    columns = [model._meta.get_field(name) for name in fields]
    assignments = ", ".join(f"{quote(field.column)} = %s" for field in columns)
    # Only names from the model go into the text; every value is a parameter.
    return f"UPDATE {quote(model._meta.db_table)} SET {assignments}", columns  # noqa: S608


_Column = tuple[str, Callable | None, frozenset[type], Callable]


def insert_many(objs: Sequence[models.Model]) -> None:
    """INSERT model instances of one model, in order, in the current transaction.

    One prepared statement executed per row, like update_many. QuerySet.bulk_create compiles the
    SQL and converts each value through the whole compiler, most of the cost of writing a batch
    of messages with their audit rows. Values go through each field's get_db_prep_save, except
    those that _unchanged_types shows it returns as they are, and a value object shared by many
    rows (the batch's timestamp) is converted once. Generated primary keys are not read back.
    """
    if not objs:
        return
    connection = transaction.get_connection()
    sql, columns = _insert_plan(type(objs[0]), connection.vendor)
    # (column, id(value)) -> (value, converted): keeping the value keeps its id from being reused
    converted: dict[tuple[int, int], tuple[Any, Any]] = {}
    params = [_insert_params(obj, columns, connection, converted) for obj in objs]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


def insert(obj: models.Model) -> None:
    """INSERT one new instance, as `obj.save()` would, and set its generated primary key.

    For a row written on a request's path (a ticket): Model.save() and QuerySet.create() run the
    query compiler and the save machinery (signals included), several times what the database
    spends on the INSERT. Values are converted as insert_many converts them; the key is read
    back with RETURNING where the backend has it, else as the last insert id. No pre_save or
    post_save signal is sent: use the ORM for a model that has receivers.
    """
    model = type(obj)
    connection = transaction.get_connection()
    sql, columns = _insert_plan(model, connection.vendor)
    params = _insert_params(obj, columns, connection, {})
    pk = model._meta.pk
    generated = pk.db_returning  # else the key is one of the columns written
    if generated and getattr(obj, pk.attname) is not None:
        # save() would write it; the plan leaves the column out. Not a case this path has.
        raise ValueError(f"sql.insert({model.__name__}): the database generates its key")
    with connection.cursor() as cursor:
        if not generated:
            cursor.execute(sql, params)
        elif connection.features.can_return_columns_from_insert:
            returning, returning_params = connection.ops.return_insert_columns([pk])
            cursor.execute(f"{sql} {returning}", [*params, *returning_params])
            key = connection.ops.fetch_returned_insert_columns(cursor, returning_params)[0]
            setattr(obj, pk.attname, key)
        else:
            cursor.execute(sql, params)
            key = connection.ops.last_insert_id(cursor, model._meta.db_table, pk.column)
            setattr(obj, pk.attname, key)
    obj._state.adding, obj._state.db = False, connection.alias


def _insert_params(obj, columns: list[_Column], connection, converted: dict) -> list[Any]:
    row = []
    for index, (attname, pre_save, unchanged, prep) in enumerate(columns):
        value = getattr(obj, attname) if pre_save is None else pre_save(obj, True)
        if type(value) not in unchanged:
            key = (index, id(value))
            if key not in converted:
                converted[key] = (value, prep(value, connection))
            value = converted[key][1]
        row.append(value)
    return row


@cache
def _insert_plan(model: type[models.Model], vendor: str) -> tuple[str, list[_Column]]:
    connection = transaction.get_connection()
    quote = connection.ops.quote_name
    meta = model._meta
    fields = [f for f in meta.concrete_fields if not (f.primary_key and f.db_returning)]
    names = ", ".join(quote(f.column) for f in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    sql = f"INSERT INTO {quote(meta.db_table)} ({names}) VALUES ({placeholders})"  # noqa: S608
    columns = []
    for field in fields:
        reads_attribute = type(field).pre_save is models.Field.pre_save or (
            type(field) is models.DateTimeField and not (field.auto_now or field.auto_now_add)
        )
        columns.append(
            (
                field.attname,
                None if reads_attribute else field.pre_save,
                _unchanged_types(field, connection),
                field.get_db_prep_save,
            )
        )
    return sql, columns


_INTEGER_FIELDS = (
    models.IntegerField,
    models.BigIntegerField,
    models.SmallIntegerField,
    models.PositiveIntegerField,
    models.PositiveBigIntegerField,
    models.PositiveSmallIntegerField,
)
_AUTO_FIELDS = (models.AutoField, models.BigAutoField, models.SmallAutoField)


def _unchanged_types(field: models.Field, connection) -> frozenset[type]:
    """The value types that `field.get_db_prep_save(value, connection)` returns unchanged.

    Read from Django's code for fields of exactly these classes (a subclass may convert):
    CharField and TextField return a str or None as it is; integer fields return an int as it is
    unless the backend adapts integers (psycopg 3 wraps them in typed integers), and a foreign
    key to an auto field only runs the backend's validate_autopk_value (MySQL refuses 0);
    date-times, UUIDs and IP addresses are converted, but None stays None.
    tests/chat/test_sql.py compares this with get_db_prep_save on every backend CI runs.
    """
    ops = type(connection.ops)
    ints_kept = ops.adapt_integerfield_value is BaseDatabaseOperations.adapt_integerfield_value
    pks_kept = ops.validate_autopk_value is BaseDatabaseOperations.validate_autopk_value
    kind = type(field)
    if kind in (models.CharField, models.TextField):
        return frozenset({str, NoneType})
    if kind in _INTEGER_FIELDS:
        return frozenset({int, NoneType}) if ints_kept else frozenset({NoneType})
    if kind is models.ForeignKey:
        target = type(field.target_field)
        if (target in _AUTO_FIELDS and pks_kept) or (target in _INTEGER_FIELDS and ints_kept):
            return frozenset({int, NoneType})
        return frozenset({NoneType})
    if kind in (models.DateTimeField, models.UUIDField, models.GenericIPAddressField):
        return frozenset({NoneType})
    return frozenset()


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
    parameters); rows come back as _select makes them. Values are matched with IN, so None
    (which the ORM would turn into IS NULL) is refused.
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
        if any(value is None for value in values):
            raise ValueError(f"select_in({model.__name__}, {name}=...) cannot match None")
        conditions.append(f"{quote(field.column)} IN ({', '.join(['%s'] * len(values))})")
        params += [field.get_db_prep_value(v, connection) for v in values]
    return _select(model, fields, " AND ".join(conditions), params, for_update, order_by)


def get(model: type[models.Model], **where: Any) -> models.Model | None:
    """The row whose columns equal `where`, with every field loaded, or None.

    For lookups that name at most one row (a primary key, a unique column or constraint): the
    handshake path's reads, where QuerySet.first() spent more in the query compiler (and in the
    ORDER BY it adds) than SQLite spent answering. One lookup of `get_each`.
    """
    return get_each((model, None, where))[0]


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


def _every_field(model: type[models.Model]) -> list[str]:
    """What a lookup with fields None reads: every concrete field (the key is always read)."""
    return [f.name for f in model._meta.concrete_fields if not f.primary_key]


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
    """Instances read by `SELECT <pk and fields> FROM <table> WHERE <where>`.

    What Model.objects.raw() does with such a query, without the RawQuerySet machinery, which
    cost more than SQLite's answer (one-message batch: four selects): the columns are read in
    field order, each value goes through the converters the ORM would apply (backend's and
    field's, e.g. SQLite's text dates to aware datetimes), and each row becomes an instance as
    Model.from_db makes it (fields not read are deferred, `_state.adding` is False).
    """
    connection = transaction.get_connection()
    plan = _read_plan(model, tuple(fields), connection)
    sql = f"SELECT {plan.columns} FROM {plan.table} WHERE {where}"  # noqa: S608
    if order_by:
        sql += f" ORDER BY {connection.ops.quote_name(model._meta.get_field(order_by).column)}"
    if for_update and connection.features.has_select_for_update:
        sql += " FOR UPDATE"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    direct = _fills_directly(model)
    return [_instance(model, plan, list(row), connection, direct) for row in rows]


def _instance(model, plan: "_ReadPlan", values: list[Any], connection, direct: bool):
    """A read row as the instance Model.from_db makes of it, its values converted first."""
    for position, converters, expression in plan.converters:
        value = values[position]
        for converter in converters:
            value = converter(value, expression, connection)
        values[position] = value
    if direct:
        state = ModelState()
        state.adding, state.db = False, connection.alias
        return _filled(model, plan.attnames, values, state)
    return model.from_db(connection.alias, plan.attnames, values)


Lookup = tuple[type[models.Model], Sequence[str] | None, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Found:
    """In a get_each lookup's `where`: the value of `field` in the row an earlier lookup (by its
    position) found. If that lookup found nothing, neither does this one."""

    lookup: int
    field: str = "pk"


def get_each(*lookups: Lookup) -> list[models.Model | None]:
    """For each (model, fields, where), the one row whose columns equal `where`, or None; all of
    them in one statement.

    `get` (fields None: every field) or `select_in` with one value per column, for a handshake's
    lookups by key. On PostgreSQL each lookup was a round trip. Each is a LEFT JOIN on a one-row
    table, so one that finds nothing leaves the others their rows; a lookup that names several
    rows is refused, as `get` refuses it. A value may be `Found(n, field)`, a column of the row
    lookup n found (the membership of the room found by its slug).
    """
    connection = transaction.get_connection()
    shape = tuple(
        (
            model,
            None if fields is None else tuple(fields),
            tuple(
                (name, value if isinstance(value, Found) else None) for name, value in where.items()
            ),
        )
        for model, fields, where in lookups
    )
    built = _statements.get((shape, connection.vendor))
    if built is None:
        built = _statements[shape, connection.vendor] = _each_statement(shape, connection)
    sql, reads, keys = built
    plans = [(model, _read_plan(model, read, connection)) for model, read in reads]
    params = []
    for (model, _, where), lookup_keys in zip(lookups, keys, strict=True):
        for name, field in lookup_keys:
            value = where[name]
            if value is None:
                raise ValueError(f"get_each({model.__name__}, {name}=None) cannot match None")
            params.append(field.get_db_prep_value(value, connection))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    found: list[models.Model | None] = []
    start = 0
    for model, plan in plans:
        end = start + len(plan.attnames)
        if len({row[start + plan.pk_position] for row in rows}) > 1:
            raise model.MultipleObjectsReturned(f"sql.get_each({model.__name__}, ...)")
        values = list(rows[0][start:end])
        missing = values[plan.pk_position] is None  # LEFT JOIN found no row
        direct = _fills_directly(model)
        found.append(None if missing else _instance(model, plan, values, connection, direct))
        start = end
    return found


# get_each's statements by (shape, vendor): the few shapes of lookups the code makes, each built
# once. The text depends on the backend's quoting only, so no connection is kept alive by it.
_statements: dict[tuple, tuple[str, tuple, tuple]] = {}


def _each_statement(shape: tuple, connection) -> tuple[str, tuple, tuple]:
    """get_each's SQL for lookups of this shape ((model, fields, ((name, Found or None), ...)),
    ...), with each lookup's (model, fields read) and the (name, field) of each value it binds."""
    quote = connection.ops.quote_name
    columns: list[str] = []
    joins: list[str] = []
    reads: list[tuple[type[models.Model], tuple[str, ...]]] = []
    keys: list[list[tuple[str, models.Field]]] = []  # per lookup: the values it binds
    for number, (model, fields, where) in enumerate(shape):
        meta = model._meta
        read = tuple(_every_field(model) if fields is None else fields)
        plan = _read_plan(model, read, connection)
        alias = f"t{number}"
        columns += [f"{alias}.{name}" for name in plan.names]
        conditions, bound = [], []
        for name, found in where:
            field = _field(meta, name)
            if found is not None:
                if not 0 <= found.lookup < number:
                    raise ValueError(f"get_each: {found} is not an earlier lookup")
                earlier = _field(reads[found.lookup][0]._meta, found.field).column
                other = f"t{found.lookup}.{quote(earlier)}"
            else:
                other = "%s"
                bound.append((name, field))
            conditions.append(f"{alias}.{quote(field.column)} = {other}")
        joins.append(f"LEFT JOIN {plan.table} {alias} ON {' AND '.join(conditions)}")
        reads.append((model, read))
        keys.append(bound)
    sql = f"SELECT {', '.join(columns)} FROM (SELECT 1 AS one) one {' '.join(joins)}"  # noqa: S608
    return sql, tuple(reads), tuple(map(tuple, keys))


@dataclass(frozen=True, slots=True)
class _ReadPlan:
    columns: str  # quoted, in concrete field order
    names: tuple[str, ...]  # the same, one by one
    pk_position: int
    table: str
    attnames: tuple[str, ...]  # of those columns, same order
    converters: tuple[tuple[int, tuple[Callable, ...], Any], ...]  # (position, converters, Col)


# Per connection, not per backend: the backend's converters are methods of that connection's
# operations (SQLite's read the connection's time zone). A process uses a handful of connections.
@lru_cache(maxsize=256)
def _read_plan(model: type[models.Model], fields: tuple[str, ...], connection) -> _ReadPlan:
    quote = connection.ops.quote_name
    meta = model._meta
    wanted = {meta.pk, *(meta.get_field(name) for name in fields)}
    read = [f for f in meta.concrete_fields if f in wanted]
    converters = []
    for position, field in enumerate(read):
        # What SQLCompiler.get_converters finds for this column (RawQuerySet does the same).
        column = field.get_col(meta.db_table)
        found = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        if found:
            converters.append((position, tuple(found), column))
    names = tuple(quote(f.column) for f in read)
    return _ReadPlan(
        columns=", ".join(names),
        names=names,
        pk_position=read.index(meta.pk),
        table=quote(meta.db_table),
        attnames=tuple(f.attname for f in read),
        converters=tuple(converters),
    )
