"""A socket never outlives the credential that obtained its ticket."""

import pytest
from django.test import Client
from rest_framework.test import APIClient

from chat.models import SecurityEvent
from chat.runtime import get_runtime
from tests.chat.helpers import join, sync
from tests.factories import PASSWORD, make_room, make_user
from tests.ws import closed_with, communicator, receive_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def setup():
    return make_user("alice"), make_room("lobby")


def jwt_login(username: str = "alice") -> dict:
    credentials = {"username": username, "password": PASSWORD}
    return APIClient().post("/api/auth/token/", credentials, format="json").json()


def jwt_ticket(username: str) -> tuple[str, str]:
    tokens = jwt_login(username)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")
    ticket = api.post("/api/tickets/", {"room": "lobby"}, format="json").json()["ticket"]
    return ticket, tokens["refresh"]


def jwt_logout(refresh: str):
    return APIClient().post("/api/auth/logout/", {"refresh": refresh}, format="json")


def session_ticket(client: Client) -> str:
    client.get("/login/")
    csrf = client.cookies["csrftoken"].value
    client.post("/login/", {"username": "alice", "password": PASSWORD, "csrfmiddlewaretoken": csrf})
    response = client.post(
        "/api/tickets/",
        {"room": "lobby"},
        content_type="application/json",
        HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value,
    )
    assert response.status_code == 201, response.content
    return response.json()["ticket"]


async def open_socket(ticket: str):
    comm = communicator("/ws/rooms/lobby/", ticket=ticket)
    assert (await comm.connect())[0]
    await receive_until(comm, "hello")
    return comm


async def test_jwt_logout_closes_the_sockets_of_that_login_only(setup):
    first_ticket, first_refresh = await sync(jwt_ticket)("alice")
    second_ticket, _ = await sync(jwt_ticket)("alice")
    first, second = await open_socket(first_ticket), await open_socket(second_ticket)
    response = await sync(jwt_logout)(first_refresh)
    assert response.status_code == 200
    assert await closed_with(first) == (4401, "logged out")
    await second.send_json_to({"type": "ping"})
    await receive_until(second, "pong")
    await first.disconnect()
    await second.disconnect()


async def test_session_logout_closes_the_sockets_of_that_session(setup):
    browser = Client()
    ticket = await sync(session_ticket)(browser)
    comm = await open_socket(ticket)
    csrf = browser.cookies["csrftoken"].value
    await sync(lambda: browser.post("/logout/", HTTP_X_CSRFTOKEN=csrf))()
    assert await closed_with(comm) == (4401, "logged out")
    await comm.disconnect()


@pytest.mark.parametrize("how", ["set_password", "deactivate_by_save", "deactivate_service"])
async def test_credential_changes_close_every_socket(setup, how):
    alice, room = setup
    sockets = [(await join(alice, room))[0] for _ in range(2)]

    def change():
        from chat import services

        if how == "set_password":
            alice.set_password("a-new-password-that-is-long")
            alice.save()
        elif how == "deactivate_by_save":
            alice.is_active = False
            alice.save()
        else:
            services.user_deactivate(actor=None, user=alice)

    await sync(change)()
    for comm in sockets:
        code, reason = await closed_with(comm)
        assert code == 4401
        assert reason in ("password changed", "account deactivated")
        await comm.disconnect()
    events = await sync(lambda: list(SecurityEvent.objects.values_list("event", flat=True)))()
    expected = "password_changed" if how == "set_password" else "user_deactivated"
    assert events.count(expected) == 1


async def test_last_login_update_is_not_a_credential_change(setup):
    alice, room = setup
    comm, _ = await join(alice, room)
    await sync(jwt_login)()
    await comm.send_json_to({"type": "ping"})
    await receive_until(comm, "pong")
    await comm.disconnect()
    await get_runtime().audit.flush()
    events = await sync(lambda: list(SecurityEvent.objects.values_list("event", flat=True)))()
    assert "password_changed" not in events


@pytest.mark.parametrize("field", ["is_staff", "is_superuser"])
def test_privilege_changes_are_audited(setup, field):
    alice, _ = setup
    setattr(alice, field, True)
    alice.save()
    event = SecurityEvent.objects.get(event="privileges_changed")
    assert (event.target_name, event.details) == ("alice", {field: [False, True]})
