"""Schemathesis against /api/schema/: no operation answers 5xx, signed in or not.

The schema is fetched from the real ASGI application when this module is collected (with the test
host allowed). Not through `schemathesis.pytest.from_fixture`: its lazy loader sets
`request.node._nodeid`, which pytest 9 no longer has. Path parameters are drawn half the time from
rooms, users and messages that exist, so the fuzzing gets past the 404s into the views' logic.
"""

import json

import pytest
import schemathesis
from channels.layers import channel_layers
from django.test import override_settings
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

from accounts.tokens import ChatRefreshToken
from chat import services
from chat.models import Membership, Room
from chatproject.asgi import application
from tests.factories import make_member, make_room, make_user

pytestmark = pytest.mark.django_db(transaction=True)

ROOMS = ["lobby", "private-room", "read-only"]
USERS = ["owner", "member"]

CONFIG = SchemathesisConfig.from_dict(
    {
        "dictionaries": {
            "rooms": {"values": ROOMS},
            "users": {"values": USERS},
            "seqs": {"values": [1, 2, 3]},
        },
        "parameters": {
            "path.slug": {"dictionary": "rooms", "probability": 0.5},
            "path.username": {"dictionary": "users", "probability": 0.5},
            "path.seq": {"dictionary": "seqs", "probability": 0.5},
        },
    }
)

API_FUZZ_SETTINGS = settings(
    max_examples=5,
    deadline=None,
    # chat_data is set up once per operation and shared by its examples, on purpose.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)


with override_settings(ALLOWED_HOSTS=["testserver"]):
    schema = schemathesis.openapi.from_asgi("/api/schema/", application, config=CONFIG)


@pytest.fixture(autouse=True)
def _forget_channel_layer():
    """Runs before conftest's channel layer flush, which would close this layer's Redis pools.

    The ASGI transport serves requests on schemathesis' own event loop, so a Redis channel layer
    used by a request (a broadcast) holds pools of that loop, which the test's loop cannot close.
    Forgotten, the layer is rebuilt for the flush. (The in-memory layer does not care.)
    """
    yield
    channel_layers.backends.clear()


@pytest.fixture
def chat_data(transactional_db, settings):
    """Rooms of every visibility, an owner, a member and three messages."""
    # PBKDF2 at full strength costs more than the fuzzing itself (users in every test).
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    owner = make_user("owner")
    member = make_user("member")
    lobby = make_room("lobby", owner=owner)
    make_member(lobby, member)
    make_room("private-room", visibility=Room.Visibility.PRIVATE, owner=owner)
    make_room("read-only", visibility=Room.Visibility.READ_ONLY, owner=owner)
    for n in range(3):
        services.message_send(room=lobby, author=owner, body=f"hello {n}", client_id=f"seed-{n}")
    assert Membership.objects.count() == 4
    return owner


@schema.parametrize()
@API_FUZZ_SETTINGS
def test_api_never_answers_5xx_unauthenticated(chat_data, case):
    case.call_and_validate(checks=[not_a_server_error])


@schema.parametrize()
@API_FUZZ_SETTINGS
def test_api_never_answers_5xx_with_jwt(chat_data, case):
    # The rooms' owner: every moderation path is open to it.
    token = ChatRefreshToken.for_user(chat_data).access_token
    case.call_and_validate(
        headers={"Authorization": f"Bearer {token}"}, checks=[not_a_server_error]
    )


@pytest.mark.parametrize(
    "username",
    [
        "\ud800",  # Redis cannot encode it into a throttle key: was HTTP 500 with REDIS_URL set
        "alice\x83\x0e",  # control characters: invalid memcached keys (CacheKeyWarning)
        "x" * 10_000,
        "ALICE ",
    ],
)
def test_login_with_any_username_string_is_a_client_error(client, username):
    response = client.post(
        "/api/auth/token/",
        json.dumps({"username": username, "password": "wrong"}),
        content_type="application/json",
    )
    assert response.status_code in (400, 401)
