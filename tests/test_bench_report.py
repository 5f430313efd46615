"""The bench report: what it says about the host and about a handshake measured apart."""

import pytest

from bench import report
from bench.scenarios import Options


def _point(us: float, rate: int = report.TARGET_RATE) -> dict:
    return {"offered_deliveries_per_s": rate, "server_cpu_us_per_delivery": us}


def _data(results: dict) -> dict:
    return {
        "options": {"members": 100, "fanout_members": 1000},
        "machine": {"nproc": 2},
        "results": results,
    }


def test_host_speed_compares_the_baselines_with_the_issue_machine():
    data = _data(
        {
            "broadcast": {
                "tutorial": {"points": [_point(258.0)]},
                "websockets": {"points": [_point(22.0)]},
            }
        }
    )
    text = report.host_speed(data)
    assert "tutorial consumer took 258.0 µs" in text
    assert "(the issue: 250-350)" in text
    assert "websockets server 22.0 µs (the issue: 16)" in text


def test_host_speed_is_left_out_without_a_baseline_at_the_target_rate():
    data = _data({"broadcast": {"tutorial": {"points": [_point(258.0, rate=1000)]}}})
    assert report.host_speed(data) is None
    assert report.host_speed(_data({})) is None


def test_handshake_rows_show_the_ticket_post_and_the_connect_apart():
    data = _data(
        {
            "handshakes": {
                "chat": {
                    "handshakes_per_s": 150.0,
                    "server_cpu_us_per_handshake": 6600.0,
                    "apart": {
                        "server_cpu_us_per_ticket_post": 3000.0,
                        "server_cpu_us_per_connect": 3200.0,
                    },
                },
                "tutorial": {"handshakes_per_s": 490.0, "server_cpu_us_per_handshake": 2000.0},
            }
        }
    )
    rows = {label: values for label, values, _ in report.rows(data)}
    post = rows["Server CPU per ticket POST, measured apart"]
    connect = next(v for label, v in rows.items() if label.startswith("Server CPU per connect"))
    assert post == {"chat": 3000.0, "tutorial": None}
    # A baseline has no ticket: its whole handshake is the connect.
    assert connect == {"chat": 3200.0, "tutorial": 2000.0}


def _layers(stack: dict, daphne: dict | None = None) -> dict:
    return {
        "rounds": 3,
        "failed": {},
        "daphne": daphne or {"post": [300.0, 250.0, 280.0], "connect": [600.0, 550.0, 650.0]},
        "stack": stack,
    }


LAYERS = {
    "django": [560.0, 580.0, 570.0],
    "drf": [700.0, 720.0, 710.0],
    "token": [900.0, 950.0, 930.0],
    "jwt": [1400.0, 1300.0, 1500.0],
    "chat_auth": [1100.0, None, 1200.0],
    "ticket": [2000.0, 2100.0, 2050.0],
}


def _handshakes(chat_per_s: float = 229.0, tutorial_us: float | None = 1070.0) -> dict:
    found = {"chat": {"handshakes_per_s": chat_per_s, "failed": {}}}
    if tutorial_us:
        found["tutorial"] = {"handshakes_per_s": 845.0, "server_cpu_us_per_handshake": tutorial_us}
    return found


def test_layer_cost_is_the_median_of_the_rounds_that_had_no_failure():
    data = _data({"layers": {"chat": _layers(LAYERS)}})
    assert report.layer_cost(data, "stack", "jwt") == 1400.0
    assert report.layer_cost(data, "daphne", "post") == 280.0
    # A round with a failed request has no figure: the median is of the others.
    assert report.layer_cost(data, "stack", "chat_auth") == 1150.0
    assert report.layer_cost(data, "stack", "missing") is None
    failed = _data({"layers": {"chat": _layers({"jwt": [None, None]})}})
    assert report.layer_cost(failed, "stack", "jwt") is None


def _verdict(data: dict) -> tuple[str, str, str]:
    (found,) = [v for v in report.verdicts(data) if v[0] == "≥ 500 full handshakes/s"]
    return found


def test_the_stack_floor_is_the_token_checked_request_and_the_tutorial_handshake():
    data = _data({"layers": {"chat": _layers(LAYERS)}, "handshakes": _handshakes()})
    floor = report.stack_floor(data)
    assert floor == {"post_us": 930.0, "connect_us": 1070.0, "total_us": 2000.0, "per_s": 500.0}
    assert _verdict(data)[1:] == (
        "229.0/s (the stack alone, before any database work: 500.0/s)",
        "**FAIL**",
    )


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: d["results"]["handshakes"].pop("tutorial"), id="no-tutorial"),
        pytest.param(lambda d: d["results"].pop("layers"), id="no-layers"),
        pytest.param(lambda d: d["options"].update(server_procs=2), id="two-processes"),
    ],
)
def test_no_stack_floor_is_stated_without_both_figures_of_one_process(change):
    data = _data({"layers": {"chat": _layers(LAYERS)}, "handshakes": _handshakes()})
    change(data)
    assert report.stack_floor(data) is None
    assert _verdict(data)[1] == "229.0/s"


def test_layers_section_lists_each_layer_with_its_spread_and_the_floor():
    data = _data({"layers": {"chat": _layers(LAYERS)}, "handshakes": _handshakes()})
    data["options"].update(hs_concurrency=32, handshakes=2000)
    text = "\n".join(report._layers_section(data))
    jwt = "+ simplejwt's `JWTAuthentication`: the token's user read by the ORM"
    assert f"| {jwt} | 1,400 | 1,300-1,500 |" in text
    assert "| the chat's ticket view (`POST /api/tickets/`) | 2,050 | 2,000-2,100 |" in text
    assert "its login's end in one statement | 1,150 | 1,100-1,200 |" in text
    assert "| the Channels tutorial consumer: its handshake (handshakes scenario) | 1,070 |" in text
    assert "1,984 requests a window" in text
    assert "take 2,000 µs of server CPU on this host, 500.0 handshakes/s on one core" in text
    assert "Failed requests" not in text


def test_layers_section_leaves_out_a_layer_without_figures_and_lists_failures():
    found = _layers({**LAYERS, "ticket": [None, None, None]})
    found["failed"] = {"POST /api/tickets/: HTTP 401 {...}": 3}
    data = _data({"layers": {"chat": found}})
    data["options"].update(hs_concurrency=32, handshakes=2000)
    text = "\n".join(report._layers_section(data))
    assert "ticket view" not in text
    assert "The stack alone" not in text
    assert "Failed requests: POST /api/tickets/: HTTP 401 {...}: 3." in text


@pytest.mark.parametrize(
    ("recorded", "said"),
    [
        ({"server_cpu": "clock"}, "each server process's CPU clock (`clock_getcpuclockid`"),
        # Results written before the clock was recorded were counted in ticks.
        ({}, "utime + stime of the server process tree from `/proc/<pid>/stat` (10 ms ticks)"),
    ],
)
def test_the_docs_say_how_the_run_counted_server_cpu(recorded, said):
    data = {
        "command": "python -m bench",
        "started": "2026-12-06T18:00:00+00:00",
        "elapsed_s": 1.0,
        "machine": {"nproc": 2, "cpu_model": "Xeon", "kernel": "6", "python": "3.11"},
        "pinned": {"server_cpus": "0", "client_cpu": 1},
        "options": vars(Options()),
        "database": "sqlite (temp file)",
        "channel_layer": "in-memory",
        "results": {},
        **recorded,
    }
    (line,) = [x for x in report.markdown(data, "").splitlines() if x.startswith("- Server CPU")]
    assert line.startswith(f"- Server CPU = {said}")
    assert ("clock_getcpuclockid" in line) == bool(recorded)
