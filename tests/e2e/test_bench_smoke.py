"""The benchmark still works: its quick mode against the chat loses and doubles nothing."""

import json
import os
import secrets
import signal
import subprocess
import sys
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.e2e.server import ROOT
from tests.services import reachable_redis_url, service_unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _quick_bench(tmp_path, *args: str, timeout: float = 90) -> dict:
    """Run `python -m bench --quick` against the chat; its results.

    In a process group of its own: past the timeout the bench and the servers it started go
    together, and none is left pinned to a core.
    """
    bench = subprocess.Popen(
        [
            *(sys.executable, "-m", "bench", "--quick", "--targets", "chat"),
            *args,
            *("--results-dir", str(tmp_path), "--no-docs"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = bench.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(bench.pid, signal.SIGKILL)
        stdout, stderr = bench.communicate()
        pytest.fail(f"the bench took over {timeout} s: {stdout[-2000:]}{stderr[-3000:]}")
    assert bench.returncode == 0, stdout[-2000:] + stderr[-3000:]
    (path,) = tmp_path.glob("bench-*.json")
    return json.loads(path.read_text())["results"]


def test_bench_quick_broadcast_delivers_everything_once(tmp_path):
    results = _quick_bench(tmp_path, "--scenario", "broadcast", "--rates", "300", "--duration", "1")
    points = results["broadcast"]["chat"]["points"]
    assert points
    for point in points:
        assert point["lost"] == 0
        assert point["duplicated"] == 0
        assert point["out_of_order"] == 0
        assert point["deliveries_per_s"] > 0


def test_bench_quick_handshakes_measures_the_ticket_and_the_connect_apart(tmp_path):
    figures = _quick_bench(tmp_path, "--scenario", "handshakes")["handshakes"]["chat"]
    assert figures["failed"] == {}
    assert figures["completed"] == figures["attempted"] == 40
    apart = figures["apart"]
    assert apart["failed"] == {}
    assert apart["ticket_posts_per_s"] > 0
    assert apart["connects_per_s"] > 0
    assert apart["server_cpu_us_per_ticket_post"] > 0
    assert apart["server_cpu_us_per_connect"] > 0


def test_bench_quick_layers_measures_each_layer_of_a_handshake(tmp_path):
    found = _quick_bench(tmp_path, "--scenario", "layers")["layers"]["chat"]
    # Every request of every layer was answered 201: the do-nothing views authenticated the
    # seeded user's token, and the ticket view issued tickets.
    assert found["failed"] == {}
    assert found["rounds"] == 1
    assert set(found["daphne"]) == {"post", "connect"}
    assert set(found["stack"]) == {"django", "drf", "token", "jwt", "chat_auth", "ticket"}
    for server in ("daphne", "stack"):
        for layer, values in found[server].items():
            assert len(values) == 1, layer
            assert values[0] > 0, layer


@pytest.fixture
def throwaway_postgres():
    """A PostgreSQL database of the test's own (the bench migrates and fills it), dropped after."""
    import psycopg

    url = os.environ.get("CHAT_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
    try:
        admin = psycopg.connect(url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        service_unavailable(f"PostgreSQL at {url} is not reachable: {error}")
    name = f"bench_smoke_{secrets.token_hex(4)}"
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_bench_quick_scaling_runs_one_process_then_two_on_shared_services(
    tmp_path, throwaway_postgres
):
    results = _quick_bench(
        tmp_path,
        *("--scenario", "scaling", "--scaling-cpus", "0,1"),
        *("--scaling-redis-url", reachable_redis_url()),
        *("--scaling-database-url", throwaway_postgres),
        timeout=180,
    )
    found = results["scaling"]["chat"]
    assert found["cores"] == [0, 1]
    # The quick run: one pair, one process then two, each on its 10 rooms of 2.
    assert len(found["one"]) == len(found["two"]) == len(found["ratios"]) == 1
    for run in (*found["one"], *found["two"]):
        assert run["connections"] == 20
        assert run["acked"] > 0
        assert run["lost"] == run["duplicated"] == run["unacked"] == 0
        assert run["rows_match_acks"] is True
        assert run["rate"] > 0
    assert found["ratio"] is not None
    # The load client's core is core 1 (the default): the ratio is measured, but no verdict.
    assert "a process shared core 1 with the load client" in found["shared"]
