"""chatproject.postgresql: Django's health check once per idle spell, not once per thread hop.

It runs against the PostgreSQL CI provides (DATABASE_URL when the suite runs on it, else
CHAT_TEST_DATABASE_URL), on a connection of its own, so both CI runs cover it. Each "unit of
work" below is what a request does: close_old_connections() before and after. The database
thread's calls (chatproject/dbthread.py) do it before only; the tests of the checks' cadence run
both ways.
"""

import os
import subprocess
import sys
from pathlib import Path

import environ
import psycopg
import pytest
from django.conf import settings
from django.db import DatabaseError, connections

from chatproject.postgresql.base import DatabaseWrapper
from tests.services import service_unavailable


@pytest.fixture
def database(django_db_blocker, settings):
    # An idle spell far longer than any test: only a test that says so (0.0, or `_proven_at`
    # moved back) sees a connection as idle, never a slow moment of the host between two units.
    settings.DATABASE_HEALTH_CHECK_IDLE = 60.0
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        url = os.environ.get("CHAT_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
    config = environ.Env.db_url_config(url)
    config.update(CONN_MAX_AGE=600, CONN_HEALTH_CHECKS=True)
    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.Error as error:
        service_unavailable(f"PostgreSQL at {url} is not reachable: {error}")
    # Filled in with Django's defaults, as for any configured database.
    (config,) = connections.configure_settings({"default": config}).values()
    wrapper = DatabaseWrapper(config, alias="health-check-test")
    checks: list[bool] = []
    is_usable = wrapper.is_usable

    def counted() -> bool:
        checks.append(usable := is_usable())
        return usable

    wrapper.is_usable = counted
    with django_db_blocker.unblock():  # a connection of its own, not the test database's
        yield wrapper, checks, url
        wrapper.close()


def database_call(wrapper, sql: str = "SELECT 2"):
    """The database thread's unit of work: the check before only."""
    wrapper.close_if_unusable_or_obsolete()
    with wrapper.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()


def unit_of_work(wrapper, sql: str = "SELECT 2"):
    """A request's: the check before and after."""
    try:
        return database_call(wrapper, sql)
    finally:
        wrapper.close_if_unusable_or_obsolete()


UNITS = pytest.mark.parametrize("unit", [unit_of_work, database_call], ids=["request", "call"])


@UNITS
def test_a_connection_in_use_is_not_checked_before_every_unit_of_work(database, unit):
    wrapper, checks, _ = database
    for _ in range(5):
        assert unit(wrapper) == (2,)
    assert checks == []


@UNITS
def test_a_connection_idle_past_the_limit_is_checked_first(database, settings, unit):
    wrapper, checks, _ = database
    unit(wrapper)
    settings.DATABASE_HEALTH_CHECK_IDLE = 0.0
    unit(wrapper)
    unit(wrapper)
    assert checks == [True, True]


def test_a_unit_of_work_without_queries_proves_nothing(database):
    wrapper, checks, _ = database
    unit_of_work(wrapper)
    wrapper._proven_at -= settings.DATABASE_HEALTH_CHECK_IDLE  # its last queries, a while ago
    for _ in range(3):  # hops that ran no query
        wrapper.close_if_unusable_or_obsolete()
        wrapper.close_if_unusable_or_obsolete()
    unit_of_work(wrapper)
    assert checks == [True]


def test_after_an_error_django_checks_the_connection_once_as_it_does(database, settings):
    wrapper, checks, _ = database
    unit_of_work(wrapper)
    with pytest.raises(DatabaseError):
        unit_of_work(wrapper, "SELEC 1")
    assert checks == [True]  # Django's own check, at the end of the failed unit
    unit_of_work(wrapper)
    assert checks == [True]  # which has just found it alive
    settings.DATABASE_HEALTH_CHECK_IDLE = 0.0
    unit_of_work(wrapper)
    assert checks == [True, True]


def _drop_from_the_server(wrapper, url: str) -> None:
    pid = wrapper.connection.info.backend_pid
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])


def test_a_connection_dropped_while_idle_is_replaced_before_the_query(database):
    wrapper, checks, url = database
    unit_of_work(wrapper)
    first = wrapper.connection.info.backend_pid
    _drop_from_the_server(wrapper, url)
    wrapper._proven_at -= settings.DATABASE_HEALTH_CHECK_IDLE
    assert unit_of_work(wrapper) == (2,)
    assert checks == [False]
    assert wrapper.connection.info.backend_pid != first


def test_a_connection_dropped_within_the_limit_fails_one_unit_then_is_replaced(database):
    wrapper, checks, url = database
    unit_of_work(wrapper)
    first = wrapper.connection.info.backend_pid
    _drop_from_the_server(wrapper, url)
    with pytest.raises(DatabaseError):
        unit_of_work(wrapper)
    assert checks == [False]  # Django's check at the end of the failed unit, which closed it
    assert wrapper.connection is None
    assert unit_of_work(wrapper) == (2,)
    assert wrapper.connection.info.backend_pid != first


def test_a_postgresql_database_url_runs_on_this_backend():
    code = "from django.db import connections; print(type(connections['default']).__module__)"
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-v", "0", "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "DATABASE_URL": "postgres://chat@127.0.0.1:5432/chat"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "chatproject.postgresql.base"
