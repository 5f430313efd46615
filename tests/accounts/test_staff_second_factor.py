"""Staff powers in the rooms need the admin's second factor (CHAT_ADMIN_REQUIRE_OTP), whatever
the way in: the API's sign-in, a socket's ticket, a session.

A stolen staff password reached through the API and the sockets what the admin kept behind a
TOTP code: every private room, and moderation of every room. Now a staff account signed in
with its password alone acts as the member it is; with a code it has its powers.
"""

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.test import Client
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework.test import APIClient

from chat.models import Message, Room, SecurityEvent
from chat.runtime import get_runtime
from tests.accounts.test_admin_otp import current_token, enroll
from tests.chat.helpers import drop_publications, send
from tests.factories import PASSWORD, make_member, make_room, make_user
from tests.ws import closed_with, communicator, receive_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def world(settings):
    """root (staff, TOTP enrolled) outside a private room `vault` and the public `lobby`; bob
    a member of both, with a message in the lobby."""
    settings.CHAT_ADMIN_REQUIRE_OTP = True
    root, bob = make_user("root", is_staff=True), make_user("bob")
    vault, lobby = make_room("vault", visibility="private"), make_room("lobby")
    make_member(vault, bob)
    make_member(lobby, bob)
    enroll("root", "--no-qr", "--backup-codes", "1")
    device = TOTPDevice.objects.get(user=root)
    bob_api = signed_in("bob")
    posted = bob_api.post(
        "/api/rooms/lobby/messages/", {"body": "hi", "client_id": "c1"}, format="json"
    )
    assert posted.status_code == 201, posted.content
    return {"device": device, "seq": posted.json()["seq"]}


def sign_in(username: str, **extra):
    form = {"username": username, "password": PASSWORD, **extra}
    return APIClient().post("/api/auth/token/", form, format="json")


def signed_in(username: str, **extra) -> APIClient:
    response = sign_in(username, **extra)
    assert response.status_code == 200, response.content
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {response.json()['access']}")
    api.refresh_token = response.json()["refresh"]
    return api


def admin_sign_in(browser: Client, device: TOTPDevice) -> None:
    """root signs in to the admin with a code: django-otp verifies the browser's session."""
    form = {
        "username": "root",
        "password": PASSWORD,
        "otp_device": device.persistent_id,
        "otp_token": current_token(device),
    }
    assert browser.post("/admin/login/?next=/admin/", form).status_code == 302


def rooms(api) -> set[str]:
    response = api.get("/api/rooms/")
    assert response.status_code == 200
    return {room["slug"] for room in response.json()}


@pytest.mark.parametrize("second_factor", [False, True], ids=["password", "password+code"])
def test_staff_powers_through_the_api_need_the_second_factor(world, second_factor):
    extra = {"otp_token": current_token(world["device"])} if second_factor else {}
    api = signed_in("root", **extra)
    assert ("vault" in rooms(api)) is second_factor
    ticket = api.post("/api/tickets/", {"room": "vault"}, format="json")
    assert ticket.status_code == (201 if second_factor else 403)
    row = SecurityEvent.objects.get(event=SecurityEvent.Event.LOGIN_SUCCEEDED, actor_name="root")
    assert row.details == {"method": "jwt", "second_factor": second_factor}


def test_the_second_factor_lasts_the_login_across_refreshes(world):
    api = signed_in("root", otp_token=current_token(world["device"]))
    refreshed = APIClient().post(
        "/api/auth/token/refresh/", {"refresh": api.refresh_token}, format="json"
    )
    assert refreshed.status_code == 200
    again = APIClient()
    again.credentials(HTTP_AUTHORIZATION=f"Bearer {refreshed.json()['access']}")
    assert "vault" in rooms(again)


@pytest.mark.parametrize("code", ["wrong", "spent backup", "another's"])
def test_a_bad_second_factor_refuses_the_sign_in(world, code):
    """A code that does not verify is no silent downgrade: the client asked for staff powers.
    Nothing is issued, and the audit trail says why."""
    if code == "wrong":
        sent = f"{(int(current_token(world['device'])) + 1) % 1_000_000:06d}"
        username = "root"
    elif code == "spent backup":
        backup = StaticToken.objects.get(device__user__username="root").token
        assert sign_in("root", otp_token=backup).status_code == 200  # good once
        sent, username = backup, "root"
    else:  # a valid code of someone else's device
        device = StaticDevice.objects.create(user=make_user("carol"), name="backup")
        device.token_set.create(token="12345678")
        sent, username = "12345678", "root"
    response = sign_in(username, otp_token=sent)
    assert response.status_code == 401
    assert response.json()["code"] == "otp_invalid"
    assert "access" not in response.json()
    failed = SecurityEvent.objects.get(event=SecurityEvent.Event.LOGIN_FAILED)
    assert (failed.target_name, failed.reason) == ("root", "bad second factor")


def test_without_the_requirement_a_password_gives_staff_powers(world, settings):
    settings.CHAT_ADMIN_REQUIRE_OTP = False
    assert "vault" in rooms(signed_in("root"))


@pytest.mark.parametrize("second_factor", [False, True], ids=["password", "password+code"])
async def test_a_sockets_staff_powers_follow_its_tickets_login(world, second_factor):
    """The ticket says whether the login that asked for it passed a second factor."""

    def ticket() -> str:
        extra = {"otp_token": current_token(world["device"])} if second_factor else {}
        api = signed_in("root", **extra)
        response = api.post("/api/tickets/", {"room": "lobby"}, format="json")
        assert response.status_code == 201
        return response.json()["ticket"]

    comm = communicator("/ws/rooms/lobby/", ticket=await database_sync_to_async(ticket)())
    connected, _ = await comm.connect()
    assert connected
    hello = await receive_until(comm, "hello")
    assert (hello["staff"], hello["moderator"]) == (second_factor, second_factor)
    await send(comm, type="delete", seq=world["seq"])
    if second_factor:
        assert (await receive_until(comm, "deleted"))["seq"] == world["seq"]
    else:
        assert (await receive_until(comm, "error"))["code"] == "forbidden"
    await comm.disconnect()
    deleted = await database_sync_to_async(
        lambda: Message.objects.get(seq=world["seq"]).deleted_at is not None
    )()
    assert deleted is second_factor


def test_a_session_has_staff_powers_once_verified_in_the_admin(world):
    """The pages sign in with a password; the admin's sign-in, with its code, verifies the
    session (django-otp), and the pages' tickets then carry the powers."""
    browser = Client()
    browser.force_login(get_user_model().objects.get(username="root"))
    assert browser.post("/api/tickets/", {"room": "vault"}).status_code == 403
    admin_sign_in(browser, world["device"])
    assert browser.post("/api/tickets/", {"room": "vault"}).status_code == 201


def test_what_a_staff_password_alone_reaches_can_be_moderated(world):
    """A stolen staff password must reach no more than a member's account: the lobby's owner
    can mute it (before, staff outranked every room role as targets, whatever they signed in
    with). The account's verified login passes over the mute, as staff."""
    owner = make_user("owner")
    lobby = Room.objects.get(slug="lobby")
    make_member(lobby, owner, role="owner")
    root = get_user_model().objects.get(username="root")
    make_member(lobby, root)
    password_only = signed_in("root")
    muted = signed_in("owner").patch(
        "/api/rooms/lobby/members/root/", {"muted_until": "2099-01-01T00:00:00Z"}, format="json"
    )
    assert muted.status_code == 200, muted.content
    body = {"body": "spam", "client_id": "s1"}
    refused = password_only.post("/api/rooms/lobby/messages/", body, format="json")
    assert (refused.status_code, refused.json()["code"]) == (403, "muted")
    verified = signed_in("root", otp_token=current_token(world["device"]))
    body = {"body": "staff here", "client_id": "s2"}
    assert verified.post("/api/rooms/lobby/messages/", body, format="json").status_code == 201


@pytest.mark.parametrize("change", ["deleted", "unconfirmed"])
def test_a_device_removed_takes_its_logins_powers(world, change):
    """A lost phone replaced (`enroll_totp --replace` deletes the device): the login it
    verified keeps signing requests, refreshes included, but its staff powers are gone."""
    api = signed_in("root", otp_token=current_token(world["device"]))
    assert "vault" in rooms(api)
    if change == "deleted":
        world["device"].delete()
    else:
        world["device"].confirmed = False
        world["device"].save()
    assert "vault" not in rooms(api)
    refreshed = APIClient().post(
        "/api/auth/token/refresh/", {"refresh": api.refresh_token}, format="json"
    )
    again = APIClient()
    again.credentials(HTTP_AUTHORIZATION=f"Bearer {refreshed.json()['access']}")
    assert "vault" not in rooms(again)


async def test_a_device_removed_closes_the_sockets_it_verified(world):
    def ticket() -> str:
        api = signed_in("root", otp_token=current_token(world["device"]))
        return api.post("/api/tickets/", {"room": "vault"}, format="json").json()["ticket"]

    comm = communicator("/ws/rooms/vault/", ticket=await database_sync_to_async(ticket)())
    connected, _ = await comm.connect()
    assert connected
    assert (await receive_until(comm, "hello"))["staff"] is True
    await database_sync_to_async(world["device"].delete)()
    code, reason = await closed_with(comm)
    assert (code, reason) == (4401, "second factor removed")


@pytest.mark.parametrize("event", ["live", "lost"])
@pytest.mark.parametrize("sanction", ["ban", "kick"])
async def test_a_ban_binds_only_what_the_password_alone_reaches(
    world, monkeypatch, sanction, event
):
    """The lobby's owner bans or removes root: the socket of root's password-only login closes
    (4403), the one of root's verified login stays, as staff pass over a ban; so too when the
    change's event was lost and the hub's heartbeat finds it (chat.hub)."""
    owner = await database_sync_to_async(make_user)("owner")

    def setup():
        lobby = Room.objects.get(slug="lobby")
        make_member(lobby, owner, role="owner")
        make_member(lobby, get_user_model().objects.get(username="root"))
        tickets = []
        for extra in ({}, {"otp_token": current_token(world["device"])}):
            api = signed_in("root", **extra)
            tickets.append(api.post("/api/tickets/", {"room": "lobby"}, format="json"))
        return [t.json()["ticket"] for t in tickets]

    password_only, verified = await database_sync_to_async(setup)()
    sockets = []
    for ticket in (password_only, verified):
        comm = communicator("/ws/rooms/lobby/", ticket=ticket)
        assert (await comm.connect())[0]
        await receive_until(comm, "hello")
        sockets.append(comm)

    def sanction_root():
        api = signed_in("owner")
        if sanction == "ban":
            return api.patch("/api/rooms/lobby/members/root/", {"banned": True}, format="json")
        return api.delete("/api/rooms/lobby/members/root/")

    if event == "lost":
        drop_publications(monkeypatch, "hub.membership")
    assert (await database_sync_to_async(sanction_root)()).status_code in (200, 204)
    if event == "lost":
        await get_runtime().hub.heartbeat()
    assert (await closed_with(sockets[0]))[0] == 4403
    await send(sockets[1], type="ping")
    assert (await receive_until(sockets[1], "pong"))["type"] == "pong"
    await sockets[1].disconnect()


def test_staff_with_their_powers_may_leave_a_room_they_are_muted_in(world):
    owner = make_user("owner")
    lobby = Room.objects.get(slug="lobby")
    make_member(lobby, owner, role="owner")
    make_member(lobby, get_user_model().objects.get(username="root"))
    mute = {"muted_until": "2099-01-01T00:00:00Z"}
    api = signed_in("owner")
    assert api.patch("/api/rooms/lobby/members/root/", mute, format="json").status_code == 200
    assert signed_in("root").delete("/api/rooms/lobby/members/root/").status_code == 403
    verified = signed_in("root", otp_token=current_token(world["device"]))
    assert verified.delete("/api/rooms/lobby/members/root/").status_code == 204


@pytest.mark.parametrize(
    ("change", "closes", "events"),
    [
        ("delete", "root", [("second_factor_removed", "root")]),
        ("unconfirm", "root", [("second_factor_removed", "root")]),
        (
            "give to carol",
            "root",
            [("second_factor_removed", "root"), ("second_factor_added", "carol")],
        ),
        ("rename", None, []),
        ("verify a code", None, []),
        ("rename a spare unconfirmed device", None, []),
        ("delete with the requirement off", None, [("second_factor_removed", "root")]),
    ],
)
def test_which_device_changes_close_the_users_sockets(
    world, monkeypatch, settings, change, closes, events
):
    """Only a device leaving the user's confirmed ones ends what it verified; a verification's
    own save (last_t, throttling) or a spare device's edit must not close every socket. Each
    device that stops or starts being someone's confirmed one is audited, and nothing else."""
    from accounts import signals

    closed = []
    monkeypatch.setattr(
        signals.chat_services,
        "user_sockets_close",
        lambda *, user_id, reason: closed.append((user_id, reason)),
    )
    device = world["device"]
    root = device.user
    before = SecurityEvent.objects.count()
    if change == "delete":
        device.delete()
    elif change == "unconfirm":
        device.confirmed = False
        device.save()
    elif change == "give to carol":
        device.user = make_user("carol")
        device.save()
    elif change == "rename":
        device.name = "phone"
        device.save()
    elif change == "verify a code":
        assert device.verify_token(current_token(device))
    elif change == "rename a spare unconfirmed device":
        spare = TOTPDevice.objects.create(user=root, name="spare", confirmed=False)
        spare.name = "spare phone"
        spare.save()
    else:
        settings.CHAT_ADMIN_REQUIRE_OTP = False
        device.delete()
    assert closed == ([(root.pk, "second factor removed")] if closes else [])
    rows = SecurityEvent.objects.order_by("chain_seq")[before:]
    assert [(row.event, row.target_name) for row in rows] == events
    assert all(row.details == {"device": "totpdevice", "name": device.name} for row in rows)


@pytest.mark.parametrize("way", ["api", "session"])
async def test_a_ticket_is_checked_against_its_device_when_the_socket_opens(world, way):
    """A ticket names the device that verified its login. Removed between the ticket request's
    check and the ticket's row (the removal's revocation of the user's tickets came first:
    here, a removal that sends no signal stands in for that instant), the device takes the
    socket's staff powers: it opens as the member root is not, and is refused."""

    def tickets() -> list[str]:
        # One sign-in (a TOTP code verifies once), two tickets.
        if way == "api":
            api = signed_in("root", otp_token=current_token(world["device"]))
            answers = [
                api.post("/api/tickets/", {"room": "vault"}, format="json") for _ in range(2)
            ]
        else:
            browser = Client()
            admin_sign_in(browser, world["device"])
            answers = [browser.post("/api/tickets/", {"room": "vault"}) for _ in range(2)]
        return [answer.json()["ticket"] for answer in answers]

    kept, lost = await database_sync_to_async(tickets)()
    comm = communicator("/ws/rooms/vault/", ticket=kept)
    assert (await comm.connect())[0]
    assert (await receive_until(comm, "hello"))["staff"] is True
    await comm.disconnect()
    await database_sync_to_async(
        lambda: TOTPDevice.objects.filter(pk=world["device"].pk)._raw_delete("default")
    )()
    comm = communicator("/ws/rooms/vault/", ticket=lost)
    assert (await comm.connect())[0]
    assert (await closed_with(comm))[0] == 4403
