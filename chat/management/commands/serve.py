"""Serve the application with daphne, its WebSocket limits and keepalive taken from settings."""

import daphne.server  # noqa: F401  (installs Twisted's asyncio reactor before anything else)
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections


class Command(BaseCommand):
    help = (
        "Serve with daphne. Frame size, keepalive and timeouts come from settings; give "
        "--bind/--port or --endpoint (e.g. ssl:8443:privateKey=key.pem:certKey=cert.pem)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--endpoint", action="append", default=[], help="Twisted endpoint string; repeatable"
        )
        parser.add_argument("--fd", type=int, help="listen on an inherited socket (systemd)")
        parser.add_argument("--access-log", help="file for the access log ('-' for stdout)")

    def handle(self, *args, **options):
        from daphne.cli import CommandLineInterface

        from chatproject.server import (
            finish_event_loop,
            freeze_startup_heap,
            install_daphne_fixes,
        )

        if settings.CHAT_MAX_FRAME_BYTES <= 0:
            raise CommandError("CHAT_MAX_FRAME_BYTES must be positive: unbounded frames are a DoS.")
        argv = []
        if options["endpoint"]:
            for endpoint in options["endpoint"]:
                argv += ["--endpoint", endpoint]
        elif options["fd"] is not None:
            argv += ["--fd", str(options["fd"])]
        else:
            argv += ["--bind", options["bind"], "--port", str(options["port"])]
        if options["access_log"]:
            argv += ["--access-log", options["access_log"]]
        limit = str(settings.CHAT_MAX_FRAME_BYTES)
        module, _, attribute = settings.ASGI_APPLICATION.rpartition(".")
        argv += [
            "--websocket-max-message-size",
            limit,
            "--websocket-max-frame-size",
            limit,
            "--ping-interval",
            str(settings.CHAT_PING_INTERVAL),
            "--ping-timeout",
            str(settings.CHAT_PING_TIMEOUT),
            # Handshakes that never finish, and sockets that never authenticate, are dropped.
            "--websocket_connect_timeout",
            "10",
            "--application-close-timeout",
            "10",
            "-v",
            str(min(int(options["verbosity"]), 3)),
            "--no-server-name",
            f"{module}:{attribute}",
        ]
        _replay_audit_spool()
        cli = CommandLineInterface()
        cli.server_class = install_daphne_fixes()
        freeze_startup_heap(module)
        try:
            cli.run(argv)
        finally:
            finish_event_loop()


def _replay_audit_spool() -> None:
    """Audit rows the last shutdown kept on disk go into the chain before anything new does."""
    from chat import spool

    try:
        spool.replay()
    except Exception:
        # The database is still down: the files stay for the next start (or the command).
        spool.logger.exception(
            "audit spool not replayed; run manage.py replay_audit_spool once the database is back"
        )
    finally:
        connections.close_all()  # this thread becomes the event loop's: it queries no more
