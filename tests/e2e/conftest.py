"""End-to-end fixtures: real daphne processes on the test database."""

from __future__ import annotations

import pytest

from tests.e2e.server import DaphneServer, free_port, new_redis_prefix, server_environment
from tests.factories import make_member, make_room, make_user

pytestmark = pytest.mark.e2e


@pytest.fixture
def server_factory(transactional_db, tmp_path):
    """Start daphne processes: servers started in one test share a Redis prefix (one deployment)."""
    servers: list[DaphneServer] = []
    prefix = new_redis_prefix()

    def start(
        *,
        port: int | None = None,
        extra_args: list[str] | None = None,
        scheme: str = "http",
        **env: str,
    ) -> DaphneServer:
        port = port or free_port()
        server = DaphneServer(
            port=port,
            env=server_environment(port, redis_prefix=prefix, **env),
            log_path=tmp_path / f"daphne-{port}.log",
            extra_args=list(extra_args or []),
            scheme=scheme,
        )
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def daphne(server_factory) -> DaphneServer:
    return server_factory()


@pytest.fixture
def people(transactional_db):
    """alice owns the public room "lobby"; bob is a member."""
    alice, bob = make_user("alice"), make_user("bob")
    room = make_room("lobby", owner=alice)
    make_member(room, bob)
    return alice, bob, room
