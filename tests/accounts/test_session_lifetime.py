"""A socket never outlives the credential that obtained its ticket."""

import pytest
from django.test import Client
from rest_framework.test import APIClient

from chat.models import ConnectionLog, SecurityEvent
from chat.runtime import get_runtime
from tests.chat.helpers import join, sync
from tests.factories import PASSWORD, make_room, make_user
from tests.ws import WAIT, closed_with, communicator, receive_until

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


async def refusal(ticket: str) -> tuple[int, str, str]:
    """Open a socket with `ticket`: its close code, and the outcome and reason recorded."""
    comm = communicator("/ws/rooms/lobby/", ticket=ticket)
    assert (await comm.connect())[0]
    code, _ = await closed_with(comm)
    await comm.disconnect()
    await get_runtime().audit.flush()
    log = await sync(ConnectionLog.objects.get)()
    return code, log.outcome, log.reason


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


async def test_jwt_logout_revokes_the_unused_tickets_of_that_login_only(setup):
    first_ticket, first_refresh = await sync(jwt_ticket)("alice")
    second_ticket, _ = await sync(jwt_ticket)("alice")
    assert (await sync(jwt_logout)(first_refresh)).status_code == 200
    assert await refusal(first_ticket) == (4401, "rejected", "ticket_revoked")
    # The other login's ticket, not yet used either, still opens its socket.
    comm = await open_socket(second_ticket)
    await comm.disconnect()


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
    reason = "password changed" if how == "set_password" else "account deactivated"
    for comm in sockets:
        assert await closed_with(comm) == (4401, reason)
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


@pytest.mark.parametrize("how", ["createsuperuser", "shell"])
def test_an_account_made_with_privileges_is_audited_as_a_grant(how, monkeypatch):
    """A superuser made by `createsuperuser` (or a staff account by the shell) was granted its
    privileges as it was made: no privileges_changed row, none at all, said so."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    if how == "createsuperuser":
        monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", PASSWORD)
        call_command("createsuperuser", "--noinput", "--username", "mallory", "--email", "m@x.io")
        granted = {"is_staff": [False, True], "is_superuser": [False, True]}
    else:
        get_user_model().objects.create_user("mallory", password=PASSWORD, is_staff=True)
        granted = {"is_staff": [False, True]}
    event = SecurityEvent.objects.get(event="privileges_changed")
    assert (event.target_name, event.details) == ("mallory", granted)


@pytest.mark.parametrize("field", ["is_staff", "is_superuser"])
def test_privilege_changes_are_audited(setup, field):
    alice, _ = setup
    setattr(alice, field, True)
    alice.save()
    event = SecurityEvent.objects.get(event="privileges_changed")
    assert (event.target_name, event.details) == ("alice", {field: [False, True]})


# --- tickets obtained before the credential ended -----------------------------------------------


def _end_login(how: str, alice, browser: Client, refresh: str) -> None:
    from chat import services

    if how == "jwt_logout":
        assert jwt_logout(refresh).status_code == 200
    elif how == "session_logout":
        browser.post("/logout/", HTTP_X_CSRFTOKEN=browser.cookies["csrftoken"].value)
    elif how == "password_change":
        alice.set_password("a-new-password-that-is-long")
        alice.save()
    else:
        services.user_deactivate(actor=None, user=alice)


@pytest.mark.parametrize("how", ["jwt_logout", "session_logout", "password_change", "deactivation"])
async def test_an_unused_ticket_dies_with_the_login_that_obtained_it(setup, how):
    alice, _ = setup
    browser = Client()
    if how == "session_logout":
        ticket, refresh = await sync(session_ticket)(browser), ""
    else:
        ticket, refresh = await sync(jwt_ticket)("alice")
    await sync(_end_login)(how, alice, browser, refresh)
    # A deactivated user is refused as such before the ticket row is even looked at.
    expected = "user_inactive" if how == "deactivation" else "ticket_revoked"
    assert await refusal(ticket) == (4401, "rejected", expected)


@pytest.mark.parametrize(
    ("how", "reason"), [("jwt_logout", "ticket_revoked"), ("deactivation", "user_inactive")]
)
async def test_a_socket_still_joining_when_its_login_ends_is_closed(
    setup, monkeypatch, how, reason
):
    """Revoked between the ticket's redemption and the socket's subscription to the revocation
    broadcast: the broadcast cannot reach it, the ticket row (or the account) does."""
    from chat.hub import Hub

    alice, _ = setup
    ticket, refresh = await sync(jwt_ticket)("alice")
    attach = Hub.attach

    async def end_then_attach(hub, sock, read):
        await sync(_end_login)(how, alice, Client(), refresh)
        return await attach(hub, sock, read)

    monkeypatch.setattr(Hub, "attach", end_then_attach)
    comm = communicator("/ws/rooms/lobby/", ticket=ticket)
    assert (await comm.connect())[0]
    assert (await closed_with(comm))[0] == 4401
    await comm.disconnect()
    await get_runtime().audit.flush()
    log = await sync(ConnectionLog.objects.get)()
    assert (log.outcome, log.reason) == ("rejected", reason)


@pytest.mark.parametrize("how", ["jwt_logout", "session_logout"])
async def test_a_ticket_written_after_its_login_ended_opens_no_socket(setup, monkeypatch, how):
    """The ticket request passed its checks, then the logout (another process) revoked the
    login's tickets before this ticket's row existed: the ended login still refuses it."""
    from accounts import api

    alice, _ = setup
    browser, tokens = Client(), {}

    def ticket_request() -> str:
        if how == "session_logout":
            return session_ticket(browser)  # signs in, then asks
        tokens.update(jwt_login())
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")
        response = client.post("/api/tickets/", {"room": "lobby"}, format="json")
        assert response.status_code == 201, response.content
        return response.json()["ticket"]

    issue = api.services.ticket_issue

    def logout_first(**kwargs):
        _end_login(how, alice, browser, tokens.get("refresh", ""))
        return issue(**kwargs)

    monkeypatch.setattr(api.services, "ticket_issue", logout_first)
    ticket = await sync(ticket_request)()
    assert await refusal(ticket) == (4401, "rejected", "ticket_revoked")
    assert await sync(SecurityEvent.objects.filter(event="logout").count)() == 1


@pytest.mark.parametrize("how", ["password_change", "deactivation"])
async def test_a_ticket_written_after_a_credential_change_opens_no_socket(setup, monkeypatch, how):
    """As above, for the changes that end every login of the user (docs/security.md: a
    password change or deactivation does the same as a logout for a ticket request that had
    passed its checks): the change revoked the user's tickets before this one's row existed."""
    from accounts import api

    alice, _ = setup
    issue = api.services.ticket_issue

    def change_first(**kwargs):
        _end_login(how, alice, Client(), "")
        return issue(**kwargs)

    monkeypatch.setattr(api.services, "ticket_issue", change_first)
    ticket, _ = await sync(jwt_ticket)("alice")
    comm = communicator("/ws/rooms/lobby/", ticket=ticket)
    assert (await comm.connect())[0]
    first = await comm.receive_output(WAIT)
    assert first["type"] == "websocket.close", f"a socket opened after the {how}: {first}"
    assert first["code"] == 4401
    await comm.disconnect()
    await get_runtime().audit.flush()
    log = await sync(ConnectionLog.objects.get)()
    expected = "user_inactive" if how == "deactivation" else "ticket_revoked"
    assert (log.outcome, log.reason) == ("rejected", expected)


def test_access_tokens_of_a_logged_out_login_are_refused_at_once(setup):
    tokens = jwt_login()
    other = jwt_login()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")
    assert api.post("/api/tickets/", {"room": "lobby"}, format="json").status_code == 201
    assert jwt_logout(tokens["refresh"]).status_code == 200
    refused = api.post("/api/tickets/", {"room": "lobby"}, format="json")
    assert refused.status_code == 401
    assert "ended" in str(refused.json())
    assert api.get("/api/rooms/").status_code == 401
    # Another login of the same user is not affected.
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {other['access']}")
    assert api.post("/api/tickets/", {"room": "lobby"}, format="json").status_code == 201


async def test_a_password_hash_upgrade_at_login_is_not_a_password_change(setup, settings):
    from django.contrib.auth.hashers import PBKDF2PasswordHasher, make_password

    class Weaker(PBKDF2PasswordHasher):
        algorithm = "pbkdf2_sha256"
        iterations = PBKDF2PasswordHasher.iterations // 2

    alice, room = setup
    weak = Weaker()
    stored = make_password(PASSWORD, weak.salt(), hasher=weak)
    await sync(lambda: type(alice).objects.filter(pk=alice.pk).update(password=stored))()
    await sync(alice.refresh_from_db)()  # as a ticket request loads her (tickets carry the hash)
    comm, _ = await join(alice, room)
    await sync(jwt_login)()  # Django re-hashes with the current iterations and saves
    upgraded = await sync(lambda: type(alice).objects.get(pk=alice.pk).password)()
    assert upgraded != stored  # the upgrade happened
    await comm.send_json_to({"type": "ping"})
    await receive_until(comm, "pong")
    await comm.disconnect()
    await get_runtime().audit.flush()
    events = await sync(lambda: list(SecurityEvent.objects.values_list("event", flat=True)))()
    assert "password_changed" not in events


async def test_ending_a_login_leaves_used_and_expired_tickets_as_they_were(setup):
    """Only tickets that could still open (or be opening) a socket are revoked; a ticket that
    opened one stays 'used' in the admin and in cleanup_tickets' counts."""
    from datetime import timedelta

    from django.utils import timezone

    from accounts.models import Ticket

    def two_tickets_of_one_login():
        tokens = jwt_login()
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")
        issue = [api.post("/api/tickets/", {"room": "lobby"}, format="json") for _ in range(2)]
        return [r.json()["ticket"] for r in issue], tokens["refresh"]

    (opened, _), refresh = await sync(two_tickets_of_one_login)()
    comm = await open_socket(opened)

    def expire_one_long_ago():
        old = Ticket.objects.get(used_at__isnull=True)
        Ticket.objects.filter(pk=old.pk).update(expires_at=timezone.now() - timedelta(minutes=5))

    await sync(expire_one_long_ago)()
    assert (await sync(jwt_logout)(refresh)).status_code == 200
    assert await closed_with(comm) == (4401, "logged out")
    await comm.disconnect()
    states = await sync(lambda: sorted(t.state for t in Ticket.objects.all()))()
    assert states == ["expired", "used"]
    replay = communicator("/ws/rooms/lobby/", ticket=opened)
    assert (await replay.connect())[0]
    assert (await closed_with(replay))[0] == 4401
    await replay.disconnect()
    await get_runtime().audit.flush()
    from chat.models import ConnectionLog

    reasons = await sync(lambda: list(ConnectionLog.objects.values_list("reason", flat=True)))()
    assert "ticket_reused" in reasons


async def test_making_a_password_unusable_closes_the_sockets(setup):
    alice, room = setup
    comm, _ = await join(alice, room)

    def lock_out():
        alice.set_unusable_password()
        alice.save(update_fields=["password"])

    await sync(lock_out)()
    assert await closed_with(comm) == (4401, "password changed")
    await comm.disconnect()
