"""chatproject/bootstrap.py: the development server it starts."""

import argparse
import os

import pytest

from chatproject import bootstrap

DEFAULT_DEBUG_ORIGINS = "http://127.0.0.1:8000,http://localhost:8000"  # chatproject/settings.py


@pytest.fixture
def served(monkeypatch, tmp_path):
    """Runs `bootstrap run` up to the exec of the server; returns what that exec was given."""
    monkeypatch.setattr(bootstrap, "ROOT", tmp_path)
    monkeypatch.setattr(bootstrap, "ensure_venv", lambda dev: None)
    monkeypatch.setattr(bootstrap, "manage", lambda *args, **kwargs: None)
    monkeypatch.delenv("CHAT_ALLOWED_ORIGINS", raising=False)
    execs = []

    def execve(path, argv, env):
        execs.append(env)
        raise SystemExit(0)

    monkeypatch.setattr(bootstrap.os, "execve", execve)
    monkeypatch.setattr(bootstrap.os, "execv", lambda path, argv: execve(path, argv, os.environ))

    def run(host: str, port: int) -> dict:
        with pytest.raises(SystemExit):
            bootstrap.cmd_run(argparse.Namespace(host=host, port=port))
        return execs[-1]

    return run


def allowed_origins(env) -> list[str]:
    return env.get("CHAT_ALLOWED_ORIGINS", DEFAULT_DEBUG_ORIGINS).split(",")


@pytest.mark.parametrize("port", [8000, 8765])
def test_run_lets_the_pages_it_serves_open_sockets(served, port):
    # The browser's Origin is the page's: on another port, every socket was refused (403).
    env = served("127.0.0.1", port)
    assert f"http://127.0.0.1:{port}" in allowed_origins(env)
    assert f"http://localhost:{port}" in allowed_origins(env)


def test_run_keeps_the_origins_the_developer_set(served, monkeypatch):
    monkeypatch.setenv("CHAT_ALLOWED_ORIGINS", "http://dev.example:9000")
    assert allowed_origins(served("127.0.0.1", 8765)) == ["http://dev.example:9000"]
