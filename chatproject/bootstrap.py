"""Set up and run the project from a bare python3: `python3 -m chatproject.bootstrap run|test`.

Standard library only, because it runs before anything is installed. It creates .venv, installs
the pinned requirements, prepares the embedded database, and then either serves the app on
http://127.0.0.1:8000 with demo data or runs the whole test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".installed"


def _run(*args: str, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, env=env, check=True)  # noqa: S603


def ensure_venv(dev: bool) -> None:
    if not PYTHON.exists():
        print(f"Creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    requirements = ROOT / ("requirements-dev.txt" if dev else "requirements.txt")
    # Reinstall only when the requirement files change.
    digest = hashlib.sha256()
    for name in ("requirements.txt", "requirements-dev.txt"):
        digest.update((ROOT / name).read_bytes())
    fingerprint = f"{requirements.name}:{digest.hexdigest()[:16]}"
    installed = set(STAMP.read_text().split()) if STAMP.exists() else set()
    if fingerprint not in installed:
        _run(str(PYTHON), "-m", "pip", "install", "--quiet", "--upgrade", "pip")
        _run(str(PYTHON), "-m", "pip", "install", "--quiet", "-r", str(requirements))
        STAMP.write_text("\n".join(sorted(installed | {fingerprint})) + "\n")


def ensure_dotenv() -> None:
    """A development .env with a fresh secret, written once; the real environment overrides it."""
    path = ROOT / ".env"
    if path.exists():
        return
    path.write_text(
        "# Written by `python3 -m chatproject.bootstrap`: local development only.\n"
        "DJANGO_DEBUG=1\n"
        f"DJANGO_SECRET_KEY={secrets.token_urlsafe(50)}\n"
        f"CHAT_AUDIT_HMAC_KEY={secrets.token_urlsafe(32)}\n"
        f"JWT_SIGNING_KEY={secrets.token_urlsafe(50)}\n"
    )
    path.chmod(0o600)
    print(f"Wrote {path} (development settings with generated secrets)", flush=True)


def manage(*args: str, env: dict[str, str] | None = None) -> None:
    _run(str(PYTHON), "manage.py", *args, env=env)


def cmd_run(args: argparse.Namespace) -> None:
    ensure_venv(dev=False)
    ensure_dotenv()
    manage("migrate", "--noinput", "-v", "0")
    manage("collectstatic", "--noinput", "-v", "0")
    manage("seed_demo")
    print(f"\nServing on http://{args.host}:{args.port}/  (Ctrl+C stops)\n", flush=True)
    os.execve(  # noqa: S606
        str(PYTHON),
        [str(PYTHON), "manage.py", "serve", "--bind", args.host, "--port", str(args.port)],
        serve_environment(args.host, args.port),
    )


def serve_environment(host: str, port: int) -> dict[str, str]:
    """The server's environment: the pages it serves may open sockets, whatever the --port.

    A browser's Origin is the page's, and settings.py's development origins are port 8000's
    only. Origins the developer set (in the environment or .env) are kept.
    """
    env = dict(os.environ)
    dotenv = ROOT / ".env"
    lines = dotenv.read_text().splitlines() if dotenv.exists() else []
    if "CHAT_ALLOWED_ORIGINS" in env or any(
        line.startswith("CHAT_ALLOWED_ORIGINS=") for line in lines
    ):
        return env
    names = dict.fromkeys([f"[{host}]" if ":" in host else host, "127.0.0.1", "localhost"])
    env["CHAT_ALLOWED_ORIGINS"] = ",".join(f"http://{name}:{port}" for name in names)
    return env


def test_environment() -> dict[str, str]:
    env = dict(os.environ)
    # Fixed, test-only secrets, so a developer's .env never leaks into (or changes) a test run.
    env.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key-" + "x" * 40)
    env.setdefault("CHAT_AUDIT_HMAC_KEY", "test-only-audit-key-" + "y" * 40)
    env.setdefault("JWT_SIGNING_KEY", "test-only-jwt-key-" + "z" * 40)
    env.setdefault("DJANGO_DEBUG", "0")
    env.setdefault("DJANGO_HTTPS", "0")
    env.setdefault("CHAT_DATA_DIR", str(ROOT / "var"))
    return env


def cmd_test(args: argparse.Namespace) -> None:
    ensure_venv(dev=True)
    env = test_environment()
    (ROOT / "var").mkdir(exist_ok=True)
    manage("collectstatic", "--noinput", "-v", "0", env=env)
    if shutil.which("chromium") is None and not os.environ.get("CI"):
        print(
            "note: /usr/bin/chromium is missing; browser tests will be skipped "
            "(install Debian's chromium package to run them)",
            flush=True,
        )
    os.chdir(ROOT)
    os.execve(str(PYTHON), [str(PYTHON), "-m", "pytest", *args.pytest_args], env)  # noqa: S606


def main() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036  (this file runs on whatever python3 is there)
        sys.exit(f"Python 3.11 or newer is needed (this is {sys.version.split()[0]}).")
    parser = argparse.ArgumentParser(prog="python3 -m chatproject.bootstrap")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="set up and serve on the embedded default (SQLite, in-memory layer)"
    )
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.set_defaults(func=cmd_run)
    test = sub.add_parser("test", help="run the whole test suite (extra arguments go to pytest)")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    test.set_defaults(func=cmd_test)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
