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


def test_scaling_needs_cores_the_machine_has():
    with pytest.raises(ValueError, match="core 4: this machine has cores 0-3"):
        scaling_cores(4, 3, "0,4")


@pytest.mark.parametrize("requested", ["0", "x,y", "0,4096"])
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


@pytest.mark.parametrize(("spec", "share"), [("0", 0.4), ("0,0", 0.4), ("0,2", 0.2)])
def test_a_window_gives_other_processes_share_per_server_core(spec, share):
    # 0.4 s of other processes' CPU on the servers' cores in a 1 s window: 40% of one core, or
    # 20% of each of two. The report compares it with one limit, whatever the cores.
    window = Window(SimpleNamespace(opts=Options(server_cpus=spec, client_cpu=1)))
    window.wall, window.server, window.client = 1.0, 0.5, 0.1
    window.foreign_server_core, window.foreign_client_core = 0.4, 0.0
    assert window.figures(per=100, unit="message")["foreign_share_server_core"] == share


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


def _run(rate: float, **changes) -> dict:
    return {
        "messages_per_s": rate,
        "delivered_messages_per_s": rate,
        "rate": rate,
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


def _scaled(ones: list[dict], twos: list[dict], shared: str = "", nproc: int = 8) -> dict:
    ratios = [round(t["rate"] / o["rate"], 2) for o, t in zip(ones, twos, strict=True)]
    return {
        "options": {"persist_rooms": 200, "persist_window": 4, "persist_duration": 10.0},
        "machine": {"nproc": nproc},
        "results": {
            "scaling": {
                "chat": {
                    "cores": [0, 2],
                    "one": ones,
                    "two": twos,
                    "ratios": ratios,
                    "ratio": report.median(ratios),
                    "shared": shared,
                }
            }
        },
    }


def _verdict(data: dict) -> tuple[str, str]:
    (found,) = [v for v in report.verdicts(data) if v[0].startswith("2 processes")]
    return found[1:]


def _lost(data: dict) -> tuple[str, str] | None:
    found = [v for v in report.verdicts(data) if v[0].startswith("0 lost")]
    return found[0][1:] if found else None


@pytest.mark.parametrize(
    ("ones", "twos", "shared", "measured", "verdict"),
    [
        (
            [_run(1000.0), _run(1000.0)],
            [_run(1900.0), _run(1850.0)],
            "",
            "1.88x (the median of 2 pairs: 1.90x, 1.85x); messages/s stored, acked and "
            "delivered: 1,875 on two processes, 1,000 on one",
            "PASS",
        ),
        ([_run(1000.0)], [_run(1800.0)], "", "1.80x (the median of 1 pairs: 1.80x)", "PASS"),
        ([_run(1000.0)], [_run(1790.0)], "", "1.79x", "**FAIL**"),
        # One good pair does not carry the other: the median decides.
        ([_run(1000.0), _run(1000.0)], [_run(2500.0), _run(1000.0)], "", "1.75x", "**FAIL**"),
        # Fast, but not complete: a lost message, or rows the acks do not match.
        ([_run(1000.0)], [_run(1900.0, lost=1)], "", "1.90x", "**FAIL**"),
        ([_run(1000.0, duplicated=2)], [_run(1900.0)], "", "1.90x", "**FAIL**"),
        ([_run(1000.0)], [_run(1900.0, rows_match_acks=False)], "", "1.90x", "**FAIL**"),
        # Measured on cores that could not show it, or by a client at its limit: no verdict.
        (
            [_run(1000.0)],
            [_run(1000.0)],
            "both processes ran on core 0",
            "1.00x (the median of 1 pairs: 1.00x); messages/s stored, acked and delivered: "
            "1,000 on two processes, 1,000 on one (both processes ran on core 0)",
            "no verdict",
        ),
        (
            [_run(1000.0)],
            [_run(1900.0, client_core_share=0.9, client_saturated=True)],
            "",
            "(the load client saturated its core)",
            "no verdict",
        ),
        (
            [_run(1000.0, client_core_share=0.9, client_saturated=True)],
            [_run(1900.0)],
            "",
            "(the load client saturated its core)",
            "no verdict",
        ),
        # Other processes (Redis, the database) on a chat core: per core, over 10%.
        (
            [_run(1000.0, foreign_share_server_core=0.15)],
            [_run(1900.0)],
            "",
            "(other processes took up to 15% of a chat process's core)",
            "no verdict",
        ),
        (
            [_run(1000.0)],
            [_run(1900.0, foreign_share_server_core=0.15)],
            "",
            "(other processes took up to 15% of a chat process's core)",
            "no verdict",
        ),
        ([_run(1000.0)], [_run(1900.0, foreign_share_server_core=0.1)], "", "1.90x", "PASS"),
    ],
)
def test_the_two_process_verdict_is_the_median_ratio_of_complete_runs(
    ones, twos, shared, measured, verdict
):
    found = _verdict(_scaled(ones, twos, shared))
    assert measured in found[0]
    assert found[1] == verdict


def test_a_pair_without_a_rate_on_one_process_gives_no_ratio_and_fails():
    data = _scaled([_run(1000.0)], [_run(1900.0)])
    data["results"]["scaling"]["chat"].update(ratios=[None], ratio=None)
    assert _verdict(data) == (
        "- (the median of 1 pairs: -); messages/s stored, acked and delivered: "
        "1,900 on two processes, 1,000 on one",
        "**FAIL**",
    )


def test_scaling_runs_count_towards_lost_and_duplicated():
    assert _lost(_scaled([_run(1000.0)], [_run(1900.0)])) == ("0 lost or duplicated", "PASS")
    found = _lost(_scaled([_run(1000.0, lost=2)], [_run(1900.0, duplicated=1)]))
    assert found == ("3 lost or duplicated", "**FAIL**")


def test_no_lost_verdict_is_given_for_a_run_that_measured_no_messages():
    skipped = _scaled([], [])
    skipped["results"]["scaling"]["chat"] = {"skipped": "not run: 2 cores, and it needs 4"}
    assert _lost(skipped) is None
    skipped["results"]["handshakes"] = {"chat": {"handshakes_per_s": 400.0}}
    assert _lost(skipped) is None


@pytest.mark.parametrize(
    ("nproc", "said"),
    [
        (2, "2 cores: one for the server, one for the load client"),
        (8, "the scaling scenario was not run"),
    ],
)
def test_without_a_scaling_run_the_verdict_is_not_measured(nproc, said):
    data = _scaled([_run(1000.0)], [_run(1900.0)], nproc=nproc)
    data["results"] = {}
    assert _verdict(data) == (said, "not measured")


def test_a_skipped_scaling_run_says_why():
    data = _scaled([], [])
    data["results"] = {"scaling": {"chat": {"skipped": "not run: 3 cores, and it needs 4"}}}
    assert _verdict(data) == ("not run: 3 cores, and it needs 4", "not measured")
    section = report._scaling_section(data["results"]["scaling"]["chat"], data["options"])
    assert "Not run: 3 cores, and it needs 4." in section


def test_the_scaling_section_shows_each_run_and_the_verdict():
    data = _scaled(
        [_run(1000.0), _run(1100.0, delivered_messages_per_s=1200.0)],
        [_run(1900.0, foreign_share_server_core=0.1), _run(2000.0)],
    )
    text = "\n".join(report._other_sections(data, ["chat"], data["options"]))
    assert "## Two processes" in text
    assert "| 1 | 0 | 1,000 | 1,000 | 400.0 | 5.0 / 9.0 | 0 / 0 | yes | 40% | 5% |" in text
    assert "| 1 | 0 | 1,100 | 1,200 | 400.0 |" in text
    # The others' share, as the window gives it: per chat core.
    assert "| 2 | 0, 2 | 1,900 | 1,900 | 400.0 | 5.0 / 9.0 | 0 / 0 | yes | 40% | 10% |" in text
    assert "Two processes ÷ one: 1.86x (the median of 2 pairs: 1.90x, 1.82x)" in text
    assert text.rstrip().endswith(": PASS.")


def test_warnings_name_the_scaling_run_they_come_from():
    saturated = {"client_core_share": 0.9, "client_saturated": True}
    data = _scaled(
        [_run(1000.0), _run(1000.0, foreign_share_server_core=0.3)],
        [_run(1900.0), _run(1900.0, **saturated)],
    )
    assert report._warnings(data) == [
        "warning: scaling/chat (one process, run 2): other processes used 30% of a bench core",
        "warning: scaling/chat (two processes, run 2): the load client used 90% of its core; "
        "the figure may measure the client",
    ]
