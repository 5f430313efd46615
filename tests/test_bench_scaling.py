"""The bench's scaling scenario: which cores it takes, when it runs, what the report concludes."""

import asyncio
import os
from types import SimpleNamespace

import pytest

from bench import cli, report
from bench.scenarios import Options, Window, scaling_cores, server_cpus


@pytest.mark.parametrize(
    ("nproc", "client", "requested", "cores", "shared"),
    [
        # Enough cores: the first two that are not the client's, and a verdict.
        (4, 1, None, [0, 2], ""),
        (8, 0, None, [1, 2], ""),
        (4, 3, "1,2", [1, 2], ""),
        # Asked for anyway: the figures are measured, but they are no verdict, and say why.
        (4, 1, "0,0", [0, 0], "both processes ran on core 0"),
        (4, 1, "0,1", [0, 1], "a process shared core 1 with the load client"),
        (3, 2, "0,1", [0, 1], "3 cores: none left for Redis and the database (needs 4)"),
        (
            2,
            1,
            "0-1",
            [0, 1],
            "a process shared core 1 with the load client; "
            "2 cores: none left for Redis and the database (needs 4)",
        ),
    ],
)
def test_scaling_takes_a_core_per_process_and_says_what_the_cores_allow(
    nproc, client, requested, cores, shared
):
    assert scaling_cores(nproc, client, requested) == (cores, shared)


@pytest.mark.parametrize("requested", ["0", "0,1,2", "0-2"])
def test_scaling_needs_exactly_two_cores(requested):
    with pytest.raises(ValueError, match="two cores are needed"):
        scaling_cores(8, 3, requested)


@pytest.mark.parametrize("requested", ["0", "x,y"])
def test_the_command_line_refuses_other_than_two_cores(requested, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(["--scenario", "scaling", "--scaling-cpus", requested])
    assert exited.value.code == 2
    assert "--scaling-cpus" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "procs", "pinned"),
    [
        ("0", 1, ["0"]),
        ("0,2", 2, ["0", "2"]),  # one core each
        ("0-1", 2, ["0", "1"]),
        ("0,1", 3, ["0,1", "0,1", "0,1"]),  # not one per process: every process on all of them
        ("0", 2, ["0", "0"]),
    ],
)
def test_server_processes_get_a_core_each_when_there_is_one_each(spec, procs, pinned):
    assert server_cpus(spec, procs) == pinned


NO_URLS = "given by --scaling-redis-url and --scaling-database-url"


@pytest.mark.parametrize(("spec", "cores"), [("0,0", [0]), ("1,0", [0, 1]), ("0-1,1", [0, 1])])
def test_a_window_counts_each_server_core_once(spec, cores):
    # Other processes' share of the servers' cores: a core listed twice would count its busy
    # time twice.
    stage = SimpleNamespace(opts=Options(server_cpus=spec, client_cpu=1))
    assert Window(stage).server_cores == cores


@pytest.mark.parametrize(
    ("urls", "nproc", "said"),
    [
        ({}, 8, NO_URLS),
        ({"redis": "redis://r"}, 8, NO_URLS),
        ({"db": "postgres://d"}, 8, NO_URLS),
        ({"redis": "redis://r", "db": "postgres://d"}, 3, "not run: 3 cores, and it needs 4"),
        ({}, 2, "not run: 2 cores, and it needs 4"),
    ],
)
def test_scaling_is_not_run_without_shared_services_or_cores(
    urls, nproc, said, tmp_path, monkeypatch
):
    monkeypatch.setattr(os, "cpu_count", lambda: nproc)
    argv = ["--scenario", "scaling"]
    if "redis" in urls:
        argv += ["--scaling-redis-url", urls["redis"]]
    if "db" in urls:
        argv += ["--scaling-database-url", urls["db"]]
    found = asyncio.run(cli._scaling(cli.parse_args(argv), Options(), tmp_path))
    assert said in found["skipped"]
    assert list(tmp_path.iterdir()) == []  # nothing was started or prepared


def _run(messages_per_s: float, **changes) -> dict:
    return {
        "messages_per_s": messages_per_s,
        "server_cpu_us_per_message": 400.0,
        "p50_ms": 5.0,
        "p99_ms": 9.0,
        "lost": 0,
        "duplicated": 0,
        "rows_match_acks": True,
        "rows_in_database": 100,
        "client_core_share": 0.4,
        "client_saturated": False,
        "foreign_share_server_core": 0.05,
        **changes,
    }


def _scaled(one: dict, two: dict, shared: str = "") -> dict:
    ratio = round(two["messages_per_s"] / one["messages_per_s"], 2)
    return {
        "options": {"persist_rooms": 200, "persist_window": 4, "persist_duration": 10.0},
        "machine": {"nproc": 8},
        "results": {
            "scaling": {
                "chat": {"cores": [0, 2], "one": one, "two": two, "ratio": ratio, "shared": shared}
            }
        },
    }


def _verdict(data: dict) -> tuple[str, str]:
    (found,) = [v for v in report.verdicts(data) if v[0].startswith("2 processes")]
    return found[1:]


def _lost(data: dict) -> tuple[str, str]:
    (found,) = [v for v in report.verdicts(data) if v[0].startswith("0 lost")]
    return found[1:]


@pytest.mark.parametrize(
    ("one", "two", "shared", "measured", "verdict"),
    [
        (
            _run(1000.0),
            _run(1900.0),
            "",
            "1,900 persisted messages/s on two processes, 1,000 on one: 1.90x",
            "PASS",
        ),
        (_run(1000.0), _run(1800.0), "", "1,800 persisted messages/s", "PASS"),
        (_run(1000.0), _run(1790.0), "", "1.79x", "**FAIL**"),
        # Fast, but not complete: a lost message, or rows the acks do not match.
        (_run(1000.0), _run(1900.0, lost=1), "", "1.90x", "**FAIL**"),
        (_run(1000.0, duplicated=2), _run(1900.0), "", "1.90x", "**FAIL**"),
        (_run(1000.0), _run(1900.0, rows_match_acks=False), "", "1.90x", "**FAIL**"),
        # Measured on cores that could not show it, or by a client at its limit: no verdict.
        (
            _run(1000.0),
            _run(1000.0),
            "both processes ran on core 0",
            "1.00x (both processes ran on core 0)",
            "no verdict",
        ),
        (
            _run(1000.0),
            _run(1200.0, client_core_share=0.9, client_saturated=True),
            "",
            "1.20x (the load client saturated its core)",
            "no verdict",
        ),
    ],
)
def test_the_two_process_verdict_is_the_ratio_of_complete_runs(one, two, shared, measured, verdict):
    found = _verdict(_scaled(one, two, shared))
    assert measured in found[0]
    assert found[1] == verdict


def test_scaling_runs_count_towards_lost_and_duplicated():
    assert _lost(_scaled(_run(1000.0), _run(1900.0))) == ("0 lost or duplicated", "PASS")
    found = _lost(_scaled(_run(1000.0, lost=2), _run(1900.0, duplicated=1)))
    assert found == ("3 lost or duplicated", "**FAIL**")


def test_without_a_scaling_run_the_verdict_is_not_measured_and_a_skip_says_why():
    data = _scaled(_run(1000.0), _run(1900.0))
    data["results"] = {}
    assert _verdict(data) == (
        "8 cores: one for the server, one for the load client",
        "not measured",
    )
    data["results"] = {"scaling": {"chat": {"skipped": "not run: 3 cores, and it needs 4"}}}
    assert _verdict(data) == ("not run: 3 cores, and it needs 4", "not measured")
    assert "Not run: 3 cores, and it needs 4." in report._scaling_section(
        data["results"]["scaling"]["chat"], data["options"]
    )


def test_the_scaling_section_shows_each_run_and_the_verdict():
    data = _scaled(_run(1000.0), _run(1900.0, foreign_share_server_core=0.2))
    text = "\n".join(report._other_sections(data, ["chat"], data["options"]))
    assert "## Two processes" in text
    assert "| 1 | 0 | 1,000 | 400.0 | 5.0 / 9.0 | 0 / 0 | yes | 40% | 5% |" in text
    assert "| 2 | 0, 2 | 1,900 | 400.0 | 5.0 / 9.0 | 0 / 0 | yes | 40% | 20% |" in text
    assert "1,900 persisted messages/s on two processes, 1,000 on one: 1.90x: PASS." in text


def test_warnings_name_the_scaling_run_they_come_from():
    data = _scaled(_run(1000.0), _run(1900.0, client_core_share=0.9, client_saturated=True))
    warnings = report._warnings(data)
    assert warnings == [
        "warning: scaling/chat (2 processes): the load client used 90% of its core; "
        "the figure may measure the client"
    ]
