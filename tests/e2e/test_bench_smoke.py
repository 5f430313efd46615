"""The benchmark still works: its quick mode against the chat loses and doubles nothing."""

import json
import subprocess
import sys

import pytest

from tests.e2e.server import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _quick_bench(tmp_path, *args: str) -> dict:
    """Run `python -m bench --quick` against the chat; its results."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bench", "--quick", "--targets", "chat"),
            *args,
            *("--results-dir", str(tmp_path), "--no-docs"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
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
