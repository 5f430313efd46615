"""The bench report: what it says about the host and about a handshake measured apart."""

from bench import report


def _point(us: float, rate: int = report.TARGET_RATE) -> dict:
    return {"offered_deliveries_per_s": rate, "server_cpu_us_per_delivery": us}


def _data(results: dict) -> dict:
    return {"options": {"members": 100, "fanout_members": 1000}, "results": results}


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
