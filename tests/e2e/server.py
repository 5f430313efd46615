"""Real daphne processes for end-to-end tests, started with `manage.py serve` like production."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_database_url() -> str:
    """The URL of the database this test run uses (pytest-django's test database)."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@dataclass
class DaphneServer:
    port: int
    env: dict[str, str]
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    scheme: str = "http"
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        return self.url

    def ws_url(self, path: str) -> str:
        ws_scheme = "wss" if self.scheme == "https" else "ws"
        return f"{ws_scheme}://127.0.0.1:{self.port}{path}"

    def start(self, timeout: float = 60.0) -> DaphneServer:
        args = self.extra_args or ["--bind", "127.0.0.1", "--port", str(self.port)]
        log = self.log_path.open("ab")
        since = log.tell()  # a restart appends: report only this start's output
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", *args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daphne exited at start:\n{self._output_since(since)}")
            try:
                response = httpx.get(f"{self.url}/healthz", timeout=1.0, verify=False)  # noqa: S501
                if response.status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        stacks = self._stacks()
        self.stop(signal.SIGKILL)
        raise RuntimeError(
            f"daphne did not answer /healthz within {timeout:.0f} s.\n"
            f"Its output:\n{self._output_since(since)}\nWhere it was:\n{stacks}"
        )

    def _output_since(self, offset: int) -> str:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")[-4000:] or "(nothing)"

    def _stacks(self) -> str:
        """The Python stacks of a server that does not answer, so a hang explains itself."""
        spy = Path(sys.executable).with_name("py-spy")
        try:
            dump = subprocess.run(
                [spy, "dump", "--pid", str(self.process.pid)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"(py-spy failed: {error})"
        return (dump.stdout + dump.stderr)[-6000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def server_environment(port: int, *, redis_prefix: str, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=test_database_url(),
        DJANGO_DEBUG="0",
        DJANGO_HTTPS="0",
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        CHAT_ALLOWED_ORIGINS=f"http://127.0.0.1:{port},https://127.0.0.1:{port}",
        CHAT_REDIS_PREFIX=redis_prefix,
        CHAT_INSTANCE_NAME=f"e2e-{port}",
        CHAT_AUDIT_FLUSH_INTERVAL="0.01",
        PYTHONUNBUFFERED="1",
    )
    if settings.REDIS_URL:
        env["REDIS_URL"] = settings.REDIS_URL
    env.update(overrides)
    return env


def new_redis_prefix() -> str:
    return f"{settings.CHAT_REDIS_PREFIX}-e2e-{uuid.uuid4().hex[:8]}"
