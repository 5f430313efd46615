"""The three servers under test, started as production starts them, and what /proc says of them."""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# The daphne flags `manage.py serve` derives from the default settings (chat/management/commands/
# serve.py), given to the tutorial baseline too so both daphnes run alike.
DAPHNE_FLAGS = [
    "--websocket-max-message-size",
    "65536",
    "--websocket-max-frame-size",
    "65536",
    "--ping-interval",
    "20",
    "--ping-timeout",
    "30",
    "--websocket_connect_timeout",
    "10",
    "--application-close-timeout",
    "10",
    "-v",
    "1",
    "--no-server-name",
]

# Limits raised so that the bench measures the server, not its rate limiting.
UNLIMITED = {
    "CHAT_MESSAGE_RATE": "1000000",
    "CHAT_MESSAGE_BURST": "1000000",
    "CHAT_MAX_SOCKETS_PER_USER": "100000",
    "CHAT_CONNECT_RATE_PER_IP": "100000000",
    "CHAT_TICKET_RATE": "1000000/s",
    "CHAT_API_RATE": "1000000/s",
    "CHAT_API_MESSAGE_RATE": "1000000/s",
    "CHAT_LOGIN_RATE_PER_IP": "1000000/s",
    "CHAT_LOGIN_RATE_PER_USERNAME": "1000000/s",
    "CHAT_ABUSE_LIMIT": "1000000",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- /proc ----------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


_LIBC = ctypes.CDLL(None)  # clock_getcpuclockid returns its error number


def process_cpu_clock(pid: int) -> float | None:
    """A process's CPU clock (`clock_getcpuclockid`): the scheduler's count of every thread's
    time, exited threads' included, to the nanosecond; None once the process is gone.
    """
    clock = ctypes.c_int()
    if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)):
        return None
    try:
        return time.clock_gettime(clock.value)
    except OSError:
        return None


# How cpu_seconds counts, as a run's results record it (bench/report.py says what each means).
SERVER_CPU = "clock"


def cpu_seconds(pid: int) -> float:
    """CPU time of the process tree: each process's CPU clock, plus the utime + stime of its
    children already waited for (from `/proc/<pid>/stat`, in ticks; the servers' children live
    as long as they do, so this part does not move during a window).

    utime + stime alone count in 10 ms ticks: a window of 40 requests to a server that spends
    250 µs on each could read 0 or 20 ms. The CPU clock is the same total, without the ticks.
    """
    total = 0.0
    for proc in process_tree(pid):
        try:
            with open(f"/proc/{proc}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        running = process_cpu_clock(proc)
        if running is None:
            continue
        # After the command: state is field 3, cutime 16, cstime 17.
        total += running + sum(int(v) for v in fields[13:15]) / CLOCK_TICKS
    return total


def rss_bytes(pid: int) -> int:
    total = 0
    for proc in process_tree(pid):
        try:
            with open(f"/proc/{proc}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def core_busy_seconds() -> dict[int, float]:
    """Busy time of each core since boot (everything but idle and iowait), from /proc/stat."""
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in values]
                busy[int(name[3:])] = (sum(v[:8]) - v[3] - v[4]) / CLOCK_TICKS
    return busy


def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
    }


# --- targets --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What differs between the servers: how each starts, where its rooms are, what it says."""

    name: str
    description: str
    authenticated: bool  # tickets, hello, acks, persistence and audit
    settings: str | None = None  # DJANGO_SETTINGS_MODULE, if not the chat's own

    def ws_path(self, slug: str) -> str:
        return {
            "chat": f"/ws/rooms/{slug}/",
            "tutorial": f"/ws/chat/{slug}/",
            "websockets": f"/{slug}",
            "daphne": f"/ws/{slug}/",
        }[self.name]


TARGETS = {
    "chat": Target("chat", "this project: daphne, tickets, persistence, audit", True),
    "tutorial": Target(
        "tutorial",
        "Channels tutorial consumer, InMemoryChannelLayer",
        False,
        settings="bench.baselines.tutorial.settings",
    ),
    "websockets": Target("websockets", "bare websockets broadcast()", False),
}

# The `layers` scenario's servers: what the chat's handshake costs, a layer at a time.
LAYER_TARGETS = {
    "daphne": Target("daphne", "daphne with an ASGI app that does nothing", False),
    "stack": Target(
        "stack",
        "the chat's server and settings, with do-nothing views in front",
        True,
        settings="bench.baselines.stack.settings",
    ),
}


@dataclass
class Deployment:
    """A database (SQLite in a temp dir unless given) and the environment every process shares."""

    workdir: Path
    database_url: str | None = None
    redis_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    _template: Path | None = None
    _counter: int = 0

    def prepare(self) -> None:
        self.env = dict(os.environ)
        self.env.update(UNLIMITED)
        self.env.update(
            DJANGO_DEBUG="0",
            DJANGO_HTTPS="0",
            DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
            CHAT_AUDIT_HMAC_KEY=secrets.token_urlsafe(40),
            JWT_SIGNING_KEY=secrets.token_urlsafe(40),
            JWT_ACCESS_LIFETIME="7200",
            DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
            # Each server adds its own origin; the system checks refuse an empty list.
            CHAT_ALLOWED_ORIGINS="http://127.0.0.1:1",
            CHAT_DATA_DIR=str(self.workdir),
            DJANGO_STATIC_ROOT=str(self.workdir / "static"),
            CHAT_REDIS_PREFIX=f"bench-{secrets.token_hex(4)}",
            PYTHONUNBUFFERED="1",
        )
        (self.workdir / "static").mkdir(exist_ok=True)
        for key in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"):
            self.env.pop(key, None)
        if self.redis_url:
            self.env["REDIS_URL"] = self.redis_url
        if self.database_url:
            self.env["DATABASE_URL"] = self.database_url
            self._run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"])
        else:
            # Migrate once into a template; every scenario gets a fresh copy.
            self._template = self.workdir / "template.sqlite3"
            self._run(
                [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
                DATABASE_URL=f"sqlite:///{self._template}",
            )

    def fresh_database(self) -> dict[str, str]:
        """Environment overrides for a scenario: its own SQLite copy (external databases are shared;
        the seed's prefixes keep scenarios apart)."""
        if self._template is None:
            return {}
        self._counter += 1
        path = self.workdir / f"bench-{self._counter}.sqlite3"
        shutil.copyfile(self._template, path)
        return {"DATABASE_URL": f"sqlite:///{path}"}

    def _run(self, argv: list[str], stdin: str | None = None, **env: str) -> str:
        result = subprocess.run(
            argv,
            cwd=ROOT,
            env={**self.env, **env},
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def seed(self, db_env: dict[str, str], *, prefix: str, rooms: int, members: int) -> list[dict]:
        spec = json.dumps({"prefix": prefix, "rooms": rooms, "members": members})
        out = self._run([sys.executable, "-m", "bench.seed", "make"], stdin=spec, **db_env)
        return json.loads(out)["rooms"]

    def count_messages(self, db_env: dict[str, str], prefix: str) -> int:
        out = self._run([sys.executable, "-m", "bench.seed", "count", prefix], **db_env)
        return json.loads(out)["messages"]


class Server:
    """One server process pinned with taskset; `servers` of a target may be several of these."""

    def __init__(
        self, target: Target, env: dict[str, str], *, port: int, cpus: str, log_path: Path
    ) -> None:
        self.target, self.port, self.cpus, self.log_path = target, port, cpus, log_path
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def argv(self) -> list[str]:
        port = str(self.port)
        if self.target.name in ("chat", "stack"):
            return [sys.executable, "manage.py", "serve", "--bind", "127.0.0.1", "--port", port]
        apps = {
            "tutorial": "bench.baselines.tutorial.asgi:application",
            "daphne": "bench.baselines.raw_asgi:application",
        }
        if self.target.name in apps:
            return [
                sys.executable,
                "-m",
                "daphne",
                *DAPHNE_FLAGS,
                "-b",
                "127.0.0.1",
                "-p",
                port,
                apps[self.target.name],
            ]
        return [sys.executable, "-m", "bench.baselines.ws_server", "--port", port]

    def start(self, timeout: float = 30.0) -> Server:
        env = dict(self.env)
        if self.target.settings:
            env["DJANGO_SETTINGS_MODULE"] = self.target.settings
        argv = self.argv()
        if self.target.name == "websockets":
            argv += ["--origin", self.origin]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            ["taskset", "-c", self.cpus, *argv],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.target.name} exited at start:\n{self.log()[-3000:]}")
            if self._ready():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"{self.target.name} did not start:\n{self.log()[-3000:]}")

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                if not self.target.authenticated:
                    return True
                sock.sendall(
                    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)
