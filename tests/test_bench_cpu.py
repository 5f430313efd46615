"""The bench's server CPU: a process tree's time to well under a clock tick, exited threads too."""

import subprocess
import sys
import textwrap

import pytest

from bench.servers import cpu_seconds, process_cpu_clock

# A process that, for each line it reads ("thread 3", "child 30", "reaped 30"), burns that many ms
# of CPU in a new thread, then joined, or in a new child process, then left waiting or waited for
# once it has exited; and says so.
BURNER = textwrap.dedent(
    """
    import subprocess, sys, threading, time

    def burn(ms):
        end = time.thread_time() + ms / 1000
        while time.thread_time() < end:
            pass

    children = []
    print("ready", flush=True)
    for line in sys.stdin:
        kind, ms = line.split()
        if kind == "thread":
            thread = threading.Thread(target=burn, args=(int(ms),))
            thread.start()
            thread.join()
        else:
            code = (
                f"import time\\nend = time.process_time() + {int(ms)} / 1000\\n"
                "while time.process_time() < end: pass\\nprint(flush=True)\\n"
            )
            if kind == "child":
                code += "input()\\n"
            child = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            child.stdout.readline()
            if kind == "reaped":
                child.wait()
            else:
                children.append(child)
        print("done", flush=True)
    """
)


@pytest.fixture
def burner():
    process = subprocess.Popen(
        [sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "ready\n"

    def burn(kind: str, ms: int) -> float:
        """The tree's CPU seconds spent while `kind` burned `ms` milliseconds."""
        before = cpu_seconds(process.pid)
        process.stdin.write(f"{kind} {ms}\n")
        process.stdin.flush()
        assert process.stdout.readline() == "done\n"
        return cpu_seconds(process.pid) - before

    yield burn
    process.kill()
    process.wait()


@pytest.mark.parametrize("ms", [1, 3])
def test_a_burst_shorter_than_a_tick_in_a_thread_that_has_exited_is_counted(burner, ms):
    # utime + stime count in 10 ms ticks: each burst would read 0 (mostly) or 10 ms. Above the
    # burst: the burner's own reading, thread start and reply, well under a tick.
    for _ in range(5):
        spent = burner("thread", ms)
        assert ms / 1000 <= spent < ms / 1000 + 0.025


@pytest.mark.parametrize("kind", ["child", "reaped"])
def test_a_child_process_of_the_server_is_counted(burner, kind):
    # A child (as `manage.py serve` runs daphne) burns 30 ms, then waits, still alive (its own
    # CPU clock); or exits and is waited for (its parent's cutime + cstime, in ticks).
    spent = burner(kind, 30)
    assert spent >= 0.030


def test_a_process_that_is_gone_has_no_cpu_clock():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert process_cpu_clock(process.pid) is None
    assert cpu_seconds(process.pid) == 0.0
