"""The benchmark still works: its quick mode against the chat loses and doubles nothing."""

import json
import subprocess
import sys

import pytest

from tests.e2e.server import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_bench_quick_broadcast_delivers_everything_once(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--scenario",
            "broadcast",
            "--targets",
            "chat",
            "--rates",
            "300",
            "--duration",
            "1",
            "--results-dir",
            str(tmp_path),
            "--no-docs",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (path,) = tmp_path.glob("bench-*.json")
    points = json.loads(path.read_text())["results"]["broadcast"]["chat"]["points"]
    assert points
    for point in points:
        assert point["lost"] == 0
        assert point["duplicated"] == 0
        assert point["out_of_order"] == 0
        assert point["deliveries_per_s"] > 0
