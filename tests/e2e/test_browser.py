"""The chat pages in Debian's Chromium against a real daphne server (see docs/pages.md)."""

import asyncio
import itertools
import re
import signal
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.utils import timezone
from playwright.async_api import expect

from chat import services
from chat.models import Membership, Message, Room
from tests.e2e.browser import (  # noqa: F401  (the *_fixture names are fixtures)
    DESKTOP,
    PHONE,
    assert_healthy,
    browser_fixture,
    message_seqs,
    open_room,
    open_tab_fixture,
    send,
    sign_in,
    sign_in_fast,
)
from tests.factories import PASSWORD, make_member, make_room, make_user
from tests.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

HOSTILE_IMG = "<img src=x onerror=alert(1)>"
HOSTILE_SCRIPT = "<script>alert(1)</script>"


@pytest.fixture
def lobby(transactional_db):
    """alice owns the public lobby; bob and carol are members."""
    alice, bob, carol = (make_user(name) for name in ("alice", "bob", "carol"))
    room = make_room("lobby", owner=alice, title="Lobby")
    make_member(room, bob)
    make_member(room, carol)
    return room


@pytest.fixture
def server(server_factory, lobby):
    return server_factory()


def user(username: str):
    return sync_to_async(get_user_model().objects.get)(username=username)


async def signed_in(open_tab, server, username: str, **options):
    tab = await open_tab(server, **options)
    await sign_in_fast(tab, server, await user(username))
    return tab


async def two_in_the_lobby(open_tab, server, first="alice", second="bob", **second_options):
    tabs = [
        await signed_in(open_tab, server, first),
        await signed_in(open_tab, server, second, **second_options),
    ]
    for tab in tabs:
        await open_room(tab, "lobby")
    return tabs


async def test_two_users_see_each_others_messages(open_tab, server):
    # Live: pushed to the other tab, with no reload and no poll (the page has none). How fast
    # is the bench's to measure (docs/performance.md), not a timed assertion's.
    alice, bob = await two_in_the_lobby(open_tab, server)

    await send(alice, "Hello Bob, are you there?")
    await expect(bob.page.locator("#messages .body")).to_have_text(["Hello Bob, are you there?"])
    await send(bob, "Right here, Alice.")
    await expect(alice.page.locator("#messages .body")).to_have_text(
        ["Hello Bob, are you there?", "Right here, Alice."]
    )

    for tab in (alice, bob):
        await expect(tab.page.locator("#messages .body")).to_have_count(2)
        await expect(tab.page.locator("#pending > li")).to_have_count(0)
        await expect(tab.page.locator("#messages .author")).to_have_text(["alice", "bob"])
    await assert_healthy(alice, bob)


@pytest.fixture
def den(transactional_db):
    """alice's room "den", titled with HTML, with a member whose username is HTML."""
    alice = make_user("alice")
    room = make_room("den", owner=alice, title=HOSTILE_SCRIPT)
    make_member(room, make_user(HOSTILE_IMG))
    return room


async def assert_nothing_parsed(page) -> None:
    """No hostile string became markup: no image but the logo, no script element without src."""
    assert await page.evaluate("document.querySelectorAll('img:not(.brand-mark)').length") == 0
    assert await page.evaluate("[...document.scripts].filter(s => !s.src).length") == 0


async def test_hostile_strings_render_as_text_and_run_nothing(open_tab, server_factory, den):
    server = server_factory()
    watcher, attacker = await open_tab(server), await open_tab(server)
    await sign_in(watcher, "alice")
    await sign_in(attacker, HOSTILE_IMG)  # through the form: the name is only a string
    for tab in (watcher, attacker):
        await expect(tab.page.locator(".room-title")).to_have_text(HOSTILE_SCRIPT)
        name = HOSTILE_IMG if tab is attacker else "alice"
        await expect(tab.page.locator(".account-name")).to_contain_text(name)
        await assert_nothing_parsed(tab.page)
    await open_room(watcher, "den")
    await open_room(attacker, "den")

    await attacker.page.locator("#composer-input").press("<")  # a typing frame names its author
    await expect(watcher.page.locator("#typing")).to_have_text(f"{HOSTILE_IMG} is typing…")
    await send(attacker, HOSTILE_IMG)
    await expect(watcher.page.locator("#messages > li")).to_have_count(1)
    await send(watcher, HOSTILE_SCRIPT)

    for tab in (watcher, attacker):
        page = tab.page
        await expect(page.locator("#messages .body")).to_have_text([HOSTILE_IMG, HOSTILE_SCRIPT])
        await expect(page.locator("#messages .author")).to_have_text([HOSTILE_IMG, "alice"])
        await expect(page.locator("#room-title")).to_have_text(HOSTILE_SCRIPT)
        await expect(page.locator("#member-list .member-name")).to_contain_text([HOSTILE_IMG])
        assert (await page.title()).startswith(HOSTILE_SCRIPT)
        await assert_nothing_parsed(page)
    await watcher.page.get_by_role("button", name=f"Manage {HOSTILE_IMG}").click()
    await expect(watcher.page.locator("#moderate-name")).to_have_text(HOSTILE_IMG)
    await assert_healthy(watcher, attacker)


async def test_messages_survive_a_server_crash_exactly_once_in_order(open_tab, server, lobby):
    alice, bob = await two_in_the_lobby(open_tab, server)
    await send(alice, "one")
    await send(alice, "two")
    await expect(bob.page.locator("#messages > li")).to_have_count(2)
    pending = alice.page.locator("#pending > li")
    await expect(pending).to_have_count(0)

    # A frozen server reads nothing: "three" is sent but neither stored nor acknowledged.
    server.process.send_signal(signal.SIGSTOP)
    await send(alice, "three")
    await expect(pending).to_have_attribute("data-state", "sent")
    await expect(pending.locator(".message-state")).to_have_text("Sending…")

    server.stop(signal.SIGKILL)
    await expect(alice.page.locator("#status")).to_have_attribute("data-state", "waiting")
    await send(alice, "four")  # typed while offline
    await expect(pending).to_have_count(2)
    await expect(alice.page.locator("#announcer")).to_have_text(
        "Waiting for connection: your message will be sent when it is back."
    )
    await expect(pending.nth(1).locator(".message-state")).to_have_text("Waiting for connection…")

    await asyncio.to_thread(server.start)  # same port
    expected = ["one", "two", "three", "four"]
    for tab in (alice, bob):
        await expect(tab.page.locator("#messages .body")).to_have_text(expected, timeout=30_000)
        await expect(tab.page.locator("#pending > li")).to_have_count(0)
        assert await message_seqs(tab) == [1, 2, 3, 4]
    stored = await sync_to_async(
        lambda: list(
            Message.objects.filter(room=lobby).order_by("seq").values_list("body", flat=True)
        )
    )()
    assert stored == expected
    # "three" went out twice, before the crash and after it, under one client_id.
    sent = [f for f in alice.frames_sent if f["type"] == "message" and f["body"] == "three"]
    assert len(sent) == 2
    assert sent[0]["client_id"] == sent[1]["client_id"]
    assert await alice.page.evaluate("sessionStorage.length") == 0  # the outbox is empty
    await assert_healthy(alice, bob)


async def test_signing_out_in_another_tab_stops_the_room_and_offers_sign_in(open_tab, server):
    alice = await signed_in(open_tab, server, "alice")
    await open_room(alice, "lobby")
    other = await alice.page.context.new_page()
    await other.goto("/")
    await other.get_by_role("button", name="Sign out").click()
    await expect(other).to_have_url(re.compile(r"/login/$"))

    # The server closes the socket (4401); the new ticket is refused (401): the page stops.
    stopped = alice.page.get_by_role("alert").filter(has_text="You are signed out.")
    await expect(stopped).to_be_visible()
    await expect(alice.page.locator("#status")).to_have_attribute("data-state", "stopped")
    sign_in_link = stopped.get_by_role("link", name="Sign in")
    await expect(sign_in_link).to_have_attribute("href", "/login/?next=/rooms/lobby/")
    assert await alice.ticket_requests() == 2
    await assert_healthy(alice)


async def test_a_room_page_never_posts_as_a_user_who_signed_in_in_another_tab(
    open_tab, server, lobby
):
    """alice signs out in another tab and bob signs in there before her room page reconnects:
    the page's next ticket is for bob's session. What alice typed must not go out as bob's."""
    alice = await signed_in(open_tab, server, "alice", clock=True)
    await open_room(alice, "lobby")
    # Paused: the page reconnects only when the test lets its backoff end.
    await alice.page.clock.pause_at(await alice.page.evaluate("Date.now() / 1000 + 1"))
    other = await alice.page.context.new_page()
    await other.goto("/")
    await other.get_by_role("button", name="Sign out").click()
    await expect(other).to_have_url(re.compile(r"/login/$"))
    await expect(alice.page.locator("#status")).to_have_attribute("data-state", "waiting")
    await sign_in_fast(alice, server, await user("bob"))  # the browser's session is bob's now
    await send(alice, "typed by alice")

    await alice.page.clock.run_for(5_000)
    stopped = alice.page.get_by_role("alert").filter(has_text="You are signed out.")
    await expect(stopped).to_be_visible()
    await expect(alice.page.locator("#status")).to_have_attribute("data-state", "stopped")
    # Its ticket request named alice's page, so bob's session got none (no second socket).
    assert await alice.ticket_requests() == 2
    assert len(alice.sockets) == 1
    assert [f for f in alice.frames_sent if f["type"] == "message"] == []
    await expect(alice.page.locator("#pending > li")).to_have_count(1)  # still alice's to send
    stored = await sync_to_async(Message.objects.filter(room=lobby).count)()
    assert stored == 0
    await assert_healthy(alice)


async def test_a_room_page_stops_on_a_hello_for_another_user(open_tab, server):
    """The second line of the test above, should a ticket reach another user's socket anyway:
    the page stops on its hello, before its outbox goes out."""
    import json

    tab = await signed_in(open_tab, server, "alice")
    sent = []

    def handler(ws):
        ws.on_message(lambda text: sent.append(json.loads(text)))
        ws.send(json.dumps({**scripted_hello(0), "user": "bob"}))

    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    # What alice typed before a reload, waiting in her outbox for the socket.
    typed = {"clientId": "c-alice-1", "body": "typed by alice", "state": "queued", "error": ""}
    await tab.page.add_init_script(
        f"sessionStorage.setItem('chat:outbox:alice:lobby', JSON.stringify([{json.dumps(typed)}]))"
    )
    await tab.page.goto("/rooms/lobby/")
    stopped = tab.page.get_by_role("alert").filter(has_text="You are signed out.")
    await expect(stopped).to_be_visible()
    await expect(tab.page.locator("#status")).to_have_attribute("data-state", "stopped")
    assert [f for f in sent if f["type"] == "message"] == []
    await expect(tab.page.locator("#pending > li")).to_have_count(1)


@pytest.mark.parametrize(
    ("action", "explanation"),
    [
        ("Remove from room", "You were removed from this room."),
        ("Ban from room", "You were banned from this room."),
    ],
)
async def test_removed_member_sees_why_and_stops_reconnecting(
    open_tab, server, action, explanation
):
    owner, carol = await two_in_the_lobby(open_tab, server, second="carol", clock=True)

    await owner.page.get_by_role("button", name="Manage carol").click()
    await owner.page.get_by_role("button", name=action).click()
    await expect(owner.page.locator("#moderate-dialog")).to_be_hidden()

    await expect(carol.page.get_by_role("alert").filter(has_text=explanation)).to_be_visible()
    await expect(carol.page.locator("#status")).to_have_attribute("data-state", "stopped")
    await expect(carol.page.locator("#composer")).to_be_hidden()
    assert await carol.ticket_requests() == 1
    # Two minutes pass, longer than any backoff: no new ticket, no new socket.
    await carol.page.clock.run_for(120_000)
    assert await carol.ticket_requests() == 1
    assert len(carol.sockets) == 1
    await expect(owner.page.locator("#member-list [data-username='carol']")).to_have_count(0)
    await assert_healthy(owner, carol)


async def test_closing_the_moderation_dialog_returns_focus_after_the_list_was_redrawn(
    open_tab, server
):
    """docs/pages.md: focus stays on a member's button when the list is redrawn. Someone comes
    online while the dialog is open: the row it was opened from is redrawn, and Escape must
    still bring a keyboard user back to that member's button, not to the top of the page."""
    owner = await signed_in(open_tab, server, "alice")
    await open_room(owner, "lobby")
    page = owner.page
    await page.get_by_role("button", name="Manage carol").focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#moderate-dialog")).to_be_visible()
    bob = await signed_in(open_tab, server, "bob")
    await open_room(bob, "lobby")
    await expect(page.locator("#member-list [data-username='bob']")).to_have_class(
        re.compile(r"\bonline\b")
    )

    await page.keyboard.press("Escape")
    await expect(page.locator("#moderate-dialog")).to_be_hidden()
    await expect(page.get_by_role("button", name="Manage carol")).to_be_focused()
    await assert_healthy(owner, bob)


async def test_a_message_waiting_when_the_page_stops_is_not_sent_and_can_be_discarded(
    open_tab, server
):
    """bob is banned while his message waits for its ack: no connection will come to send it,
    so it must not say "Waiting for connection…" and go out by itself on a later visit."""
    import json

    tab, sockets = await lobby_on_a_scripted_socket(open_tab, server)
    await send(tab, "never acknowledged")
    pending = tab.page.locator("#pending > li")
    await expect(pending.locator(".message-state")).to_have_text("Sending…")

    await sockets[0].close(code=4403, reason="banned")
    await expect(tab.page.locator("#stopped")).to_contain_text("You were banned from this room.")
    await expect(pending.locator(".message-state")).to_have_text(
        "Not sent: You were banned from this room."
    )
    # The log is no live region: the status says it.
    await expect(tab.page.locator("#announcer")).to_have_text(
        "Not sent: You were banned from this room."
    )
    saved = json.loads(await tab.page.evaluate("sessionStorage.getItem('chat:outbox:bob:lobby')"))
    assert [entry["state"] for entry in saved] == ["failed"]
    await pending.get_by_role("button", name="Discard").click()
    await expect(pending).to_have_count(0)
    assert await tab.page.evaluate("sessionStorage.length") == 0


@pytest.fixture
def bob_moderates(lobby):
    Membership.objects.filter(room=lobby, user__username="bob").update(role="moderator")


async def test_demoted_moderator_reconnects_with_a_new_ticket(open_tab, bob_moderates, server):
    owner, bob = await two_in_the_lobby(open_tab, server)
    manage_carol = bob.page.get_by_role("button", name="Manage carol")
    await expect(manage_carol).to_be_visible()

    await owner.page.get_by_role("button", name="Manage bob").click()
    await owner.page.get_by_role("button", name="Make member").click()

    # The server closes bob's socket (4401); his page asks for a new ticket and comes back.
    await expect(manage_carol).to_be_hidden()
    await expect(bob.page.locator("#status")).to_have_attribute("data-state", "open")
    assert await bob.ticket_requests() == 2
    assert len(bob.sockets) == 2
    await assert_healthy(owner, bob)


@pytest.fixture
def root_moderates(lobby):
    """root, staff, is also a moderator of the lobby."""
    make_member(lobby, make_user("root", is_staff=True), role=Membership.Role.MODERATOR)


async def test_staff_who_moderate_a_room_keep_their_staff_powers_on_its_page(
    open_tab, bob_moderates, root_moderates, server_factory, lobby
):
    """Staff outrank every room role (chat.permissions.rank), also in a room where they hold
    one, and hello says so in `staff`. A staff moderator of the lobby manages bob, a fellow
    moderator, and may make him a member; the page must offer it."""
    server = server_factory(CHAT_ADMIN_REQUIRE_OTP="0")  # staff powers without a second factor
    root = await signed_in(open_tab, server, "root")
    await open_room(root, "lobby")

    await root.page.get_by_role("button", name="Manage bob").click()
    await expect(root.page.get_by_role("button", name="Make member")).to_be_visible()
    await root.page.get_by_role("button", name="Make member").click()
    await expect(root.page.locator("#moderate-dialog")).to_be_hidden()
    bob_row = root.page.locator("#member-list [data-username='bob']")
    await expect(bob_row.locator(".tag", has_text="moderator")).to_have_count(0)
    role = await sync_to_async(
        lambda: Membership.objects.get(room=lobby, user__username="bob").role
    )()
    assert role == Membership.Role.MEMBER
    await assert_healthy(root)


async def test_muted_member_cannot_post_until_unmuted(open_tab, server):
    owner, bob = await two_in_the_lobby(open_tab, server)

    await owner.page.get_by_role("button", name="Manage bob").click()
    await owner.page.get_by_role("button", name="1 hour").click()
    await expect(bob.page.locator("#composer-input")).to_be_disabled()
    await expect(bob.page.locator("#composer-notice")).to_contain_text("You are muted until")
    bob_row = owner.page.locator("#member-list [data-username='bob']")
    await expect(bob_row.locator(".tag", has_text="muted")).to_be_visible()

    await owner.page.get_by_role("button", name="Manage bob").click()
    await owner.page.get_by_role("button", name="Unmute").click()
    await expect(bob.page.locator("#composer-input")).to_be_enabled()
    await send(bob, "Thanks!")
    await expect(owner.page.locator("#messages .body")).to_have_text(["Thanks!"])
    await assert_healthy(owner, bob)


async def test_a_mute_moves_focus_from_the_composer_to_why_and_back_when_lifted(open_tab, server):
    """bob is typing when he is muted: the box is disabled under his cursor. Focus must not fall
    to the top of the page; it goes to the notice that says why, and back to his draft after."""
    owner, bob = await two_in_the_lobby(open_tab, server)
    composer = bob.page.locator("#composer-input")
    await composer.fill("half a thought")
    await composer.focus()

    await owner.page.get_by_role("button", name="Manage bob").click()
    await owner.page.get_by_role("button", name="1 hour").click()
    await expect(composer).to_be_disabled()
    notice = bob.page.locator("#composer-notice")
    await expect(notice).to_be_focused()
    await expect(notice).to_contain_text("You are muted until")

    await owner.page.get_by_role("button", name="Manage bob").click()
    await owner.page.get_by_role("button", name="Unmute").click()
    await expect(composer).to_be_focused()
    await expect(bob.page.locator("#announcer")).to_have_text(
        "Your mute was lifted: you may post again."
    )
    await bob.page.keyboard.press("Enter")
    await expect(owner.page.locator("#messages .body")).to_have_text(["half a thought"])
    await assert_healthy(owner, bob)


@pytest.fixture
def root_muted(lobby):
    """root, staff, was muted in the lobby (before being made staff, say) for an hour."""
    until = timezone.now() + timedelta(hours=1)
    make_member(lobby, make_user("root", is_staff=True), muted_until=until)


async def test_staff_with_a_mute_left_over_may_post_as_the_server_lets_them(
    open_tab, root_muted, server_factory
):
    """The server lets staff post while muted (chat.permissions.post_refusal); the page closed
    their composer with "You are muted until ..." all the same."""
    server = server_factory(CHAT_ADMIN_REQUIRE_OTP="0")  # staff powers without a second factor
    root = await signed_in(open_tab, server, "root")
    await open_room(root, "lobby")
    await expect(root.page.locator("#composer-input")).to_be_enabled()
    await expect(root.page.locator("#composer-notice")).to_be_hidden()
    await send(root, "staff speaking")
    await expect(root.page.locator("#messages .body")).to_have_text(["staff speaking"])
    await assert_healthy(root)


@pytest.fixture
def bob_cannot_post(request, lobby):
    """bob is muted for an hour, or the lobby is read-only (he is a plain member)."""
    if request.param == "muted":
        until = timezone.now() + timedelta(hours=1)
        Membership.objects.filter(room=lobby, user__username="bob").update(muted_until=until)
    else:
        Room.objects.filter(pk=lobby.pk).update(visibility=Room.Visibility.READ_ONLY)
    return request.param


@pytest.mark.parametrize(
    ("bob_cannot_post", "notice"),
    [("muted", "You are muted until"), ("read_only", "Only moderators can post")],
    indirect=["bob_cannot_post"],
)
async def test_a_composer_that_cannot_post_is_closed_before_the_socket_opens(
    open_tab, bob_cannot_post, server, notice
):
    """The server knows when it draws the page that bob may not post: his composer must not
    take messages (to be refused one by one later) while the socket is not open yet, as when
    the server cannot give a ticket."""
    bob = await signed_in(open_tab, server, "bob")
    await bob.page.route("**/api/tickets/", lambda route: route.abort())
    await bob.page.goto("/rooms/lobby/")
    await expect(bob.page.locator("#status")).to_have_attribute("data-state", "waiting")
    await expect(bob.page.locator("#composer-input")).to_be_disabled()
    await expect(bob.page.locator("#composer-notice")).to_contain_text(notice)
    await assert_healthy(bob)


async def test_moderator_deletes_a_message_for_everyone(open_tab, server):
    owner, bob = await two_in_the_lobby(open_tab, server)
    await send(bob, "something regrettable")
    message = owner.page.locator("#messages > li", has_text="something regrettable")

    await message.hover()
    await message.get_by_role("button", name="Delete message").click()
    await expect(owner.page.locator("#confirm-quote")).to_have_text("something regrettable")
    await owner.page.locator("#confirm-dialog").get_by_role("button", name="Delete message").click()

    for tab in (owner, bob):
        await expect(tab.page.locator("#messages .body")).to_have_text(
            ["This message was deleted."]
        )
        await expect(tab.page.locator("#messages")).not_to_contain_text("regrettable")
    await assert_healthy(owner, bob)


async def test_deleting_a_message_by_keyboard_keeps_focus_in_the_log(open_tab, server):
    """The delete button hides once its message is deleted: a keyboard user who pressed it must
    not be thrown back to the top of the page."""
    owner, bob = await two_in_the_lobby(open_tab, server)
    await send(bob, "something regrettable")
    page = owner.page
    message = page.locator("#messages > li", has_text="something regrettable")

    await message.get_by_role("button", name="Delete message").focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#confirm-dialog")).to_be_visible()
    await page.keyboard.press("Tab")  # from Cancel to Delete message
    await page.keyboard.press("Enter")
    await expect(page.locator("#messages .body")).to_have_text(["This message was deleted."])
    await expect(page.get_by_role("log")).to_be_focused()
    await assert_healthy(owner, bob)


async def test_each_delete_button_says_which_message_it_deletes(open_tab, server):
    """Tabbing through the log, a screen reader user hears every delete button: "Delete message"
    over and over does not say which. The name says whose message and when, the description
    its body: also for the message of a deleted account, and again after a restoration."""
    import json

    tab = await signed_in(open_tab, server, "bob")
    sockets = []
    orphan = {**scripted_message(2), "author": None}

    def handler(ws):
        sockets.append(ws)

        def on_message(text):
            if json.loads(text)["type"] == "history":
                page = [scripted_message(1), orphan, scripted_message(3)]
                ws.send(json.dumps({"type": "history", "messages": page, "has_more": False}))

        ws.on_message(on_message)
        ws.send(json.dumps({**scripted_hello(3), "role": "moderator", "moderator": True}))

    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await expect(tab.page.locator("#log")).to_have_attribute("aria-busy", "false")
    sent = await tab.page.locator("[data-seq='1'] .time").text_content()
    buttons = tab.page.locator("#messages .message-delete")
    await expect(buttons).to_have_count(3)
    for button, author, body in zip(
        await buttons.all(), ["alice", "deleted user", "alice"], ["m1", "m2", "m3"], strict=True
    ):
        await expect(button).to_have_accessible_name(f"Delete message from {author} at {sent}")
        await expect(button).to_have_accessible_description(body)

    first = tab.page.locator("[data-seq='1'] .message-delete")
    sockets[0].send(json.dumps({"type": "deleted", "room": "lobby", "seq": 1}))
    await expect(first).to_be_hidden()
    sockets[0].send(json.dumps({"type": "restored", "message": scripted_message(1)}))
    await expect(first).to_be_visible()
    await expect(first).to_have_accessible_name(f"Delete message from alice at {sent}")
    await expect(first).to_have_accessible_description("m1")


@pytest.fixture
def long_lobby(lobby):
    """60 messages: the newest page (50) and one page before it."""
    bob = lobby.memberships.get(user__username="bob").user
    for n in range(60):
        services.message_send(room=lobby, author=bob, body=f"m{n}", client_id=f"c{n}")


async def test_loading_the_first_messages_by_keyboard_keeps_focus_in_the_log(
    open_tab, long_lobby, server
):
    """The Load earlier button hides when the first message is in: focus must stay in the log."""
    alice = await signed_in(open_tab, server, "alice")
    await open_room(alice, "lobby")
    page = alice.page

    await page.get_by_role("button", name="Load earlier messages").focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#messages > li")).to_have_count(60)
    await expect(page.get_by_role("button", name="Load earlier messages")).to_be_hidden()
    await expect(page.get_by_role("log")).to_be_focused()
    await assert_healthy(alice)


async def test_new_messages_button_hiding_under_focus_leaves_the_reader_in_the_log(
    open_tab, long_lobby, server
):
    """ "New messages" shows for a reader scrolled up; scrolled down to them (the wheel, the
    scrollbar) while it has focus, it hides: focus stays in the log, not on the page."""
    alice, bob = await two_in_the_lobby(open_tab, server)
    page = alice.page
    await page.locator("#log").evaluate("log => { log.scrollTop = 0; }")
    await send(bob, "fresh news")
    jump = page.get_by_role("button", name="New messages ↓")
    await expect(jump).to_be_visible()
    await jump.focus()
    await page.locator("#log").evaluate("log => { log.scrollTop = log.scrollHeight; }")
    await expect(jump).to_be_hidden()
    await expect(page.get_by_role("log")).to_be_focused()
    await assert_healthy(alice, bob)


async def test_new_messages_pressed_by_a_reader_who_cannot_post_keeps_focus_in_the_log(
    open_tab, long_lobby, server
):
    """ "New messages" hands focus to the composer, to write a reply: a muted member (or a
    reader of a read-only room) has a disabled composer, which takes no focus, and would be
    dropped at the top of the page as the button hides. They go to the log instead."""
    from chat.models import Membership

    await sync_to_async(Membership.objects.filter(user__username="carol").update)(
        muted_until=timezone.now() + timedelta(hours=1)
    )
    guest = await signed_in(open_tab, server, "carol")
    bob = await signed_in(open_tab, server, "bob")
    for tab in (guest, bob):
        await open_room(tab, "lobby")
    page = guest.page
    await expect(page.locator("#composer-input")).to_be_disabled()
    await page.locator("#log").evaluate("log => { log.scrollTop = 0; }")
    await send(bob, "fresh news")
    jump = page.get_by_role("button", name="New messages ↓")
    await expect(jump).to_be_visible()
    await jump.focus()
    await page.keyboard.press("Enter")
    await expect(jump).to_be_hidden()
    await expect(page.get_by_role("log")).to_be_focused()
    await assert_healthy(guest, bob)


async def test_loading_earlier_messages_is_told_as_a_count_not_read_as_new_ones(
    open_tab, long_lobby, server
):
    """A page of older messages is not news: a screen reader must not read it out as messages
    that just arrived, but hear how many came in."""
    alice = await signed_in(open_tab, server, "alice")
    await open_room(alice, "lobby")
    page = alice.page

    await page.get_by_role("button", name="Load earlier messages").click()
    await expect(page.locator("#messages > li")).to_have_count(60)
    assert [text for text in await alice.heard() if re.search(r"\bm\d\b", text)] == []
    await expect(page.locator("#announcer")).to_have_text(
        "10 earlier messages loaded. This is the beginning of the room."
    )
    assert await alice.heard("earlier") == [
        "10 earlier messages loaded. This is the beginning of the room."
    ]
    await assert_healthy(alice)


async def test_a_new_message_is_read_out_once_and_not_back_to_its_author(open_tab, server):
    """bob's message went from the pending list to the stored ones: two new nodes in the log,
    which read it out to him twice. Others hear it once; he typed it and is not read it back."""
    alice, bob = await two_in_the_lobby(open_tab, server)

    await send(bob, "hello there")
    for tab in (alice, bob):
        await expect(tab.page.locator("#messages .body")).to_have_text(["hello there"])
    await expect(bob.page.locator("#pending > li")).to_have_count(0)
    assert await bob.heard("hello there") == []
    assert await alice.heard("hello there") == ["bob: hello there"]
    await assert_healthy(alice, bob)


async def test_composer_sends_on_enter_breaks_lines_on_shift_enter_and_counts(open_tab, server):
    alice = await signed_in(open_tab, server, "alice")
    await open_room(alice, "lobby")
    page, composer = alice.page, alice.page.locator("#composer-input")

    await composer.press_sequentially("line one")
    await composer.press("Shift+Enter")
    await composer.press_sequentially("line two")
    await expect(page.locator("#composer-count")).to_have_text("17 / 4,000")
    await composer.press("Enter")
    await expect(page.locator("#messages .body")).to_have_text(["line one\nline two"])
    await expect(composer).to_have_value("")
    await expect(composer).to_be_focused()

    await composer.fill("x" * 4001)
    await expect(page.locator("#composer-count")).to_have_class(re.compile(r"\bover\b"))
    await expect(page.locator("#send")).to_be_disabled()
    await composer.press("Enter")
    await expect(composer).to_have_value("x" * 4001)  # refused, kept for editing
    await expect(page.locator("#pending > li")).to_have_count(0)
    await assert_healthy(alice)


@pytest.fixture
def dave(lobby):
    """dave has an account and reads the public lobby as a guest."""
    return make_user("dave")


async def test_a_failed_join_says_why_and_can_be_tried_again(open_tab, dave, server):
    guest = await signed_in(open_tab, server, "dave")
    await open_room(guest, "lobby")
    page = guest.page
    await page.route("**/api/rooms/lobby/join/", lambda route: route.abort())  # the network

    join = page.get_by_role("button", name="Join room")
    await join.click()
    await expect(page.locator("#toast")).to_have_text(
        "The server could not be reached. Check your connection."
    )
    await expect(join).to_be_enabled()
    assert guest.page_errors == []

    await page.unroute("**/api/rooms/lobby/join/")
    await join.click()
    await expect(page.locator("#join-banner")).to_have_count(0)
    await expect(page.locator("[data-username='dave'] .tag", has_text="guest")).to_have_count(0)
    await assert_healthy(guest)


async def test_a_guest_who_joins_and_comes_back_is_shown_as_a_member_to_others(
    open_tab, dave, server
):
    """Others' pages remember who the API said is no member, so as not to ask again at every
    presence frame; a guest who has joined since and comes back (a reload, another tab) is
    asked about again, not tagged a guest until the next reconnect."""
    owner = await signed_in(open_tab, server, "alice")
    guest = await signed_in(open_tab, server, "dave")
    await open_room(owner, "lobby")
    await open_room(guest, "lobby")
    dave_tags = owner.page.locator("[data-username='dave'] .tag")
    await expect(dave_tags).to_have_text(["guest"])

    await guest.page.get_by_role("button", name="Join room").click()
    await expect(guest.page.locator("#join-banner")).to_have_count(0)
    await open_room(guest, "lobby")  # a reload: dave leaves and is present again

    await expect(owner.page.locator("#online-count")).to_have_text("2")
    await expect(dave_tags).to_have_count(0)
    await assert_healthy(owner, guest)


async def test_managing_a_present_user_not_looked_up_yet_says_what_they_are(open_tab, server):
    """In a large room the users present past the first page of members are looked up by name.
    A moderator who opens one of them before the answer is in must not be told "Not a member:
    reading as a guest" about a member (nor be offered a guest's actions): the page asks first."""
    import json

    owner = await signed_in(open_tab, server, "alice")
    held = []

    async def first_page_without_bob_and_lookups_held(route):
        if "username=" in route.request.url and not held:
            held.append(route)  # the first lookup: not answered yet
            return
        response = await route.fetch()
        items = await response.json()
        if "username=" not in route.request.url:  # bob is on a page not loaded
            items = [member for member in items if member["username"] != "bob"]
        await route.fulfill(response=response, body=json.dumps(items))

    await owner.page.route("**/api/rooms/lobby/members/?*", first_page_without_bob_and_lookups_held)
    await owner.page.route("**/api/rooms/lobby/members/", first_page_without_bob_and_lookups_held)
    bob = await signed_in(open_tab, server, "bob")
    await open_room(bob, "lobby")
    await open_room(owner, "lobby")
    page = owner.page
    await expect(page.locator("#online-count")).to_have_text("2")
    for _ in range(100):
        if held:
            break
        await asyncio.sleep(0.05)
    assert len(held) == 1

    await page.get_by_role("button", name="Manage bob").click()
    await expect(page.locator("#moderate-summary")).to_have_text("Member")
    await expect(page.locator("#moderate-kick")).to_be_visible()
    await held[0].abort()
    await assert_healthy(owner, bob)


async def test_a_guest_made_a_member_by_a_moderator_is_no_longer_offered_to_join(
    open_tab, dave, server
):
    """Muting a guest of a public room makes them a member (chat.services.member_mute): their
    page, told by the membership frame, must stop saying they read it as a guest."""
    owner = await signed_in(open_tab, server, "alice")
    guest = await signed_in(open_tab, server, "dave")
    await open_room(owner, "lobby")
    await open_room(guest, "lobby")
    await expect(guest.page.locator("#join-banner")).to_be_visible()

    await owner.page.get_by_role("button", name="Manage dave").click()
    await owner.page.get_by_role("button", name="10 minutes").click()
    await expect(guest.page.locator("#composer-input")).to_be_disabled()
    await expect(guest.page.locator("#join-banner")).to_have_count(0)
    await assert_healthy(owner, guest)


@pytest.fixture
def garden(lobby):
    """Two unread messages in the lobby for alice, and a public room she is not in."""
    bob = lobby.memberships.get(user__username="bob").user
    services.message_send(room=lobby, author=bob, body="one", client_id="c1")
    services.message_send(room=lobby, author=bob, body="two", client_id="c2")
    return make_room("garden", title="Garden")


async def test_room_list_shows_unread_joins_and_creates_rooms(open_tab, garden, server):
    alice = await signed_in(open_tab, server, "alice", viewport=PHONE)
    page = alice.page
    await page.goto("/")

    await expect(page.locator(".room-row[data-slug='lobby'] .unread")).to_have_text("2 unread")
    await page.get_by_role("button", name="Join Garden").click()
    await expect(page).to_have_url(re.compile(r"/rooms/garden/$"))
    await expect(page.locator("#status")).to_have_attribute("data-state", "open")

    await page.goto("/")
    await expect(page.locator(".room-row[data-slug='garden'] button")).to_have_count(0)
    await page.get_by_label("Title").fill("Book club")
    await expect(page.get_by_label("Address")).to_have_value("book-club")
    await page.get_by_label("Private").check()
    await page.get_by_role("button", name="Create room").click()
    await expect(page).to_have_url(re.compile(r"/rooms/book-club/$"))
    await expect(page.locator("#room-title")).to_have_text("Book club")
    await page.get_by_role("button", name="Members").click()
    await expect(page.locator("[data-username='alice'] .tag", has_text="owner")).to_be_visible()

    await page.goto("/")
    await page.get_by_label("Title").fill("Another lobby")
    await page.get_by_label("Address").fill("lobby")
    await page.get_by_role("button", name="Create room").click()
    await expect(page.locator("#create-error")).to_have_text(
        "A room with this slug already exists."
    )
    await assert_healthy(alice)


async def test_sign_in_errors_then_sign_out(open_tab, server):
    visitor = await open_tab(server)
    page = visitor.page

    await page.goto("/rooms/lobby/")
    await expect(page).to_have_url(re.compile(r"/login/\?next=/rooms/lobby/$"))
    await page.get_by_label("Username").fill("alice")
    await page.get_by_label("Password").fill("not the password")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_contain_text("Please enter a correct username")

    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(re.compile(r"/rooms/lobby/$"))
    await expect(page.locator("#status")).to_have_attribute("data-state", "open")

    await page.get_by_role("button", name="Sign out").click()
    await expect(page).to_have_url(re.compile(r"/login/$"))
    await page.goto("/")
    await expect(page).to_have_url(re.compile(r"/login/\?next=/$"))
    await assert_healthy(visitor)


async def test_pages_raise_no_csp_violations(open_tab, server):
    alice = await open_tab(server)
    page = alice.page
    await sign_in(alice, "alice")  # the sign-in page, then the room list
    await open_room(alice, "lobby")
    await send(alice, "styled by the stylesheet only")
    await expect(page.locator("#messages > li")).to_have_count(1)
    await page.get_by_role("button", name="Manage bob").click()
    await expect(page.locator("#moderate-dialog")).to_be_visible()
    await page.keyboard.press("Escape")
    await page.goto("/no-such-page/")
    await expect(page.get_by_role("heading", name="Nothing here")).to_be_visible()
    assert await alice.csp_violations() == []
    # The only console error is the 404 we asked for.
    assert [m for m in alice.console_errors if "404" not in m] == []

    # The detector works: an inline style is refused, and both the page and the console see it.
    await page.evaluate("document.body.setAttribute('style', 'color: red')")
    await page.wait_for_function("window.__csp.length > 0")
    assert any(v.startswith("style-src") for v in await alice.csp_violations())


async def test_api_docs_page_works_under_the_csp(open_tab, server):
    """Swagger UI comes from our static files (no CDN) and runs without inline script."""
    alice = await open_tab(server)
    await sign_in(alice, "alice")
    await alice.page.goto("/api/docs/")
    await expect(alice.page.get_by_text("/api/tickets/").first).to_be_visible()
    assert await alice.csp_violations() == []
    assert alice.page_errors == []


# --- the client against a scripted server (Playwright answers the WebSocket itself) ------------


def scripted_message(seq: int) -> dict:
    return {
        "seq": seq,
        "room": "lobby",
        "author": "alice",
        "body": f"m{seq}",
        "created_at": "2026-11-30T08:00:00Z",
        "client_id": f"c{seq}",
    }


async def lobby_on_a_scripted_socket(open_tab, server, *, last_seq=0, on_frame=None):
    """bob's lobby page on sockets the test plays the server of, each greeted with
    scripted_hello(last_seq) (last_seq(n) for the n-th socket if it is a function), each frame
    the page sends handed to on_frame(ws, frame) if given: the tab once the page has its hello,
    and the sockets so far."""
    import json

    tab = await signed_in(open_tab, server, "bob")
    sockets = []

    def handler(ws):
        top = last_seq(len(sockets)) if callable(last_seq) else last_seq
        sockets.append(ws)
        if on_frame is not None:
            ws.on_message(lambda text: on_frame(ws, json.loads(text)))
        ws.send(json.dumps(scripted_hello(top)))

    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await expect(tab.page.locator("#log")).to_have_attribute("aria-busy", "false")
    return tab, sockets


def scripted_hello(last_seq: int) -> dict:
    return {
        "type": "hello",
        "room": "lobby",
        "title": "Lobby",
        "visibility": "public",
        "user": "bob",
        "staff": False,
        "role": "member",
        "moderator": False,
        "can_post": True,
        "muted_until": None,
        "last_seq": last_seq,
        "presence": ["bob"],
        "limits": {"max_length": 4000, "history_limit": 100},
    }


async def answer_lookups_with_guests(
    tab, asked: list[str], *, delay: float = 0.0, fail_first: tuple = ()
) -> None:
    """The lobby's member lookups by name (`?username=`) answered "none of them is a member"
    after `delay` seconds, each name asked recorded in `asked`; other member requests pass. The
    first lookups fail as `fail_first` says, one each: a dict of `route.fulfill`'s arguments, or
    None for a request that never reaches the server."""
    from urllib.parse import parse_qs, urlsplit

    failures = list(fail_first)

    async def lookups(route):
        names = parse_qs(urlsplit(route.request.url).query).get("username")
        if not names:
            await route.continue_()
            return
        asked.extend(names)
        if failures:
            failure = failures.pop(0)
            if failure is None:
                await route.abort()
            else:
                await route.fulfill(content_type="application/json", **failure)
            return
        await asyncio.sleep(delay)
        await route.fulfill(status=200, content_type="application/json", body="[]")

    await tab.page.route("**/api/rooms/lobby/members/?*", lookups)


async def test_users_present_are_each_asked_about_once_while_others_keep_joining(open_tab, server):
    """A big room's hello lists hundreds present past the first page: they are looked up 100 a
    request, one after another. Users joining meanwhile (a presence burst) are looked up too,
    without asking again about those whose lookup is still under way: that would start a new
    run of requests over the whole room at each join."""
    import json

    tab = await signed_in(open_tab, server, "bob")
    present = [f"u-{n:04d}" for n in range(300)]
    sockets, asked = [], []

    def handler(ws):
        sockets.append(ws)
        ws.send(json.dumps({**scripted_hello(0), "presence": ["bob", *present]}))

    await answer_lookups_with_guests(tab, asked, delay=0.5)  # a busy server
    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await expect(tab.page.locator("#log")).to_have_attribute("aria-busy", "false")
    joined = [f"new-{n}" for n in range(4)]
    for name in joined:
        await asyncio.sleep(0.4)
        sockets[0].send(json.dumps({"type": "presence", "room": "lobby", "joined": name}))
    await expect(tab.page.locator(".member[data-username='new-3'] .tag")).to_have_text(["guest"])
    await expect(tab.page.locator(".member[data-username='u-0299'] .tag")).to_have_text(["guest"])

    repeated = sorted({name for name in asked if asked.count(name) > 1})
    assert repeated == []
    assert sorted(asked) == sorted(present + joined)
    await assert_healthy(tab)


async def test_users_who_keep_joining_faster_than_the_lookup_wait_are_still_asked_about(
    open_tab, server
):
    """In a busy room a join comes every 100 ms: a lookup that waited for a quiet 300 ms never
    ran. The first join of a burst starts the wait; the lookup then asks about every user
    present not yet known, and the next joins start the next."""
    import json

    asked = []
    tab, sockets = await lobby_on_a_scripted_socket(open_tab, server)
    await answer_lookups_with_guests(tab, asked)
    for n in range(20):  # two seconds of joins, 100 ms apart
        sockets[0].send(json.dumps({"type": "presence", "room": "lobby", "joined": f"j-{n}"}))
        await asyncio.sleep(0.1)
    assert asked, "no lookup while the joins kept coming"
    await expect(tab.page.locator(".member[data-username='j-19'] .tag")).to_have_text(["guest"])
    assert sorted(set(asked)) == sorted(f"j-{n}" for n in range(20))
    await assert_healthy(tab)


async def test_a_search_typed_while_a_hello_reloads_the_members_does_not_undo_the_reload(
    open_tab, server
):
    """A hello (a reconnect) starts the drawer over: the first page again, and the users
    present asked about. A search typed before that page is in drops the page's answer as
    stale; the start-over must still happen, or the users present since the reconnect are never
    asked about (dave stays untagged, neither member nor guest)."""
    import json

    tab = await signed_in(open_tab, server, "bob")
    sockets = []

    def handler(ws):
        sockets.append(ws)
        ws.send(json.dumps(scripted_hello(0)))

    first_pages = []

    async def hold_the_second_first_page(route):
        if "?" not in route.request.url:  # the list's first page, as a hello asks for it
            first_pages.append(route)
            if len(first_pages) == 2:
                return  # held
        await route.continue_()

    await tab.page.route("**/api/rooms/lobby/members/**", hold_the_second_first_page)
    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await expect(tab.page.locator("#log")).to_have_attribute("aria-busy", "false")
    await expect(tab.page.locator(".member[data-username='carol']")).to_have_count(1)
    await asyncio.sleep(0.5)  # the first hello's lookups are done with

    sockets[0].send(json.dumps({**scripted_hello(0), "presence": ["bob", "dave"]}))
    for _ in range(100):
        if len(first_pages) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(first_pages) == 2
    search = tab.page.get_by_role("searchbox", name="Find a member by the start of their name")
    await search.fill("d")
    await expect(tab.page.locator("#members-empty")).to_be_hidden()
    await expect(tab.page.locator("#member-list .member")).to_have_count(1)  # dave, present
    await first_pages[1].continue_()

    await expect(tab.page.locator(".member[data-username='dave'] .tag")).to_have_text(["guest"])
    await assert_healthy(tab)


async def test_users_present_with_long_names_in_any_script_are_looked_up(open_tab, server):
    """A username is up to 150 letters of any script, and a URL carries each non-ASCII one as
    up to 9 characters: 100 names a request can make a request line over what the servers take
    (nginx 8 KB by default, daphne 16 KB). The lookups must still go through."""
    import json

    tab = await signed_in(open_tab, server, "bob")
    present = [f"用户{n:03d}" + "名" * 18 for n in range(100)]  # 21 letters each

    def handler(ws):
        ws.send(json.dumps({**scripted_hello(0), "presence": ["bob", *present]}))

    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await expect(tab.page.locator("#log")).to_have_attribute("aria-busy", "false")
    guests = tab.page.locator("#member-list .member .tag", has_text="guest")
    await expect(guests).to_have_count(100)
    await assert_healthy(tab)


@pytest.mark.parametrize("missed", [2, 40], ids=["a few", "many"])
async def test_messages_missed_while_away_are_read_out_if_few_else_counted(
    open_tab, server, missed
):
    """After a reconnect the page fetches what it missed, a page at a time. Read out one by one,
    a long absence would be a flood of lines; more than three from others are told as a count,
    once the catch-up is complete."""
    import json

    def on_frame(ws, frame):
        if frame["type"] != "history":
            return
        first = frame.get("after", 0) + 1
        last = min(3 + missed, first + frame["limit"] - 1) if "after" in frame else 3
        page = [scripted_message(seq) for seq in range(first, last + 1)]
        answer = {"messages": page, "has_more": "after" in frame and last < 3 + missed}
        if "after" in frame:
            answer["after"] = frame["after"]
        ws.send(json.dumps({"type": "history", **answer}))

    tab, sockets = await lobby_on_a_scripted_socket(
        open_tab, server, last_seq=lambda n: 3 if n == 0 else 3 + missed, on_frame=on_frame
    )
    await sockets[0].close(code=1001, reason="restart")
    await expect(tab.page.locator(f"[data-seq='{3 + missed}']")).to_have_count(1, timeout=10_000)
    lines = [text for text in await tab.heard() if text.startswith("alice: m")]
    if missed <= 3:
        assert lines == [f"alice: m{seq}" for seq in range(4, 4 + missed)]
    else:
        await expect(tab.page.locator("#announcer")).to_have_text(
            f"{missed} new messages while you were away."
        )
        assert lines == []
    await assert_healthy(tab)


async def test_a_live_message_during_a_long_catch_up_does_not_skip_the_gap(open_tab, server):
    """Reconnect to a room 247 messages further on; the first live message (251) arrives before
    the first catch-up page. The catch-up must page on from its own pages, not from 251."""
    import json

    tab = await signed_in(open_tab, server, "bob")
    sockets, history_requests = [], []

    def handler(ws):
        n = len(sockets)
        sockets.append(ws)
        top = 3 if n == 0 else 250

        def on_message(text):
            frame = json.loads(text)
            if frame["type"] != "history":
                return
            history_requests.append(frame)
            if "after" in frame:
                first = frame["after"] + 1
                last = min(top + 1, first + frame["limit"] - 1)  # 251 is stored by now too
                page = [scripted_message(seq) for seq in range(first, last + 1)]
                answer = {"messages": page, "has_more": last < top + 1, "after": frame["after"]}
            else:
                answer = {"messages": [scripted_message(s) for s in range(1, top + 1)]}
                answer["has_more"] = False
            ws.send(json.dumps({"type": "history", **answer}))

        ws.on_message(on_message)
        ws.send(json.dumps(scripted_hello(top)))
        if n == 1:
            ws.send(json.dumps({"type": "message", **scripted_message(251)}))

    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await expect(tab.page.locator("#log")).to_have_attribute("aria-busy", "false")
    assert await message_seqs(tab) == [1, 2, 3]
    await sockets[0].close(code=1001, reason="restart")
    await expect(tab.page.locator("[data-seq='250']")).to_have_count(1, timeout=10_000)
    await expect(tab.page.locator("#log")).to_have_attribute("aria-busy", "false")
    assert await message_seqs(tab) == list(range(1, 252))
    assert [r.get("after") for r in history_requests[1:]] == [3, 103, 203]


async def test_an_earlier_page_the_log_already_held_is_not_told_as_zero_messages(open_tab, server):
    """A page of earlier messages the page already shows (a reconnect's history got there
    first) adds nothing: "0 earlier messages loaded" would be noise; the beginning of the room,
    when it is, is still said."""
    import json

    def on_frame(ws, frame):
        if frame["type"] == "history":
            # The newest page, then again the messages it shows, where the room starts.
            answer = {"messages": [scripted_message(s) for s in (2, 3)], "has_more": True}
            if "before" in frame:
                answer.update(has_more=False, before=frame["before"])
            ws.send(json.dumps({"type": "history", **answer}))

    tab, _ = await lobby_on_a_scripted_socket(open_tab, server, last_seq=3, on_frame=on_frame)
    await tab.page.get_by_role("button", name="Load earlier messages").click()
    await expect(tab.page.locator("#announcer")).to_have_text("This is the beginning of the room.")
    assert await tab.heard("earlier") == []
    await assert_healthy(tab)


UNAVAILABLE = {"type": "error", "code": "unavailable", "detail": "temporarily unavailable"}


async def test_a_first_page_answered_unavailable_is_asked_again(open_tab, server):
    """docs/protocol.md §4: `unavailable` without a client_id: the database could not answer,
    try again shortly. Until the newest page comes the log is busy and the outbox waits."""
    import json

    tab = await signed_in(open_tab, server, "bob")
    history_requests, message_frames = [], []

    def handler(ws):
        def on_message(text):
            frame = json.loads(text)
            if frame["type"] == "message":
                message_frames.append(frame)
            if frame["type"] != "history":
                return
            history_requests.append(frame)
            if len(history_requests) == 1:  # the database fails once
                ws.send(json.dumps(UNAVAILABLE))
                return
            page = [scripted_message(s) for s in (1, 2, 3)]
            ws.send(json.dumps({"type": "history", "messages": page, "has_more": False}))

        ws.on_message(on_message)
        ws.send(json.dumps(scripted_hello(3)))

    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await expect(tab.page.locator("#status")).to_have_attribute("data-state", "open")
    await send(tab, "queued until the log is complete")
    await expect(tab.page.locator("#log")).to_have_attribute("aria-busy", "false")
    assert await message_seqs(tab) == [1, 2, 3]
    assert history_requests == [{"type": "history", "limit": 50}] * 2
    await eventually(lambda: message_frames, "the queued message sent")
    assert [f["body"] for f in message_frames] == ["queued until the log is complete"]
    # Asked again by itself: no error for the reader, who can do nothing about it.
    assert "unavailable" not in (await tab.page.locator("#toast").text_content() or "")


async def test_load_earlier_answered_unavailable_can_be_clicked_again(open_tab, server):
    """An older page the database could not read: the reader is told and may ask again (the
    page used to wait for an answer that would not come until its next reconnect)."""
    import json

    tab = await signed_in(open_tab, server, "bob")
    before_requests = []

    def handler(ws):
        def on_message(text):
            frame = json.loads(text)
            if frame["type"] != "history":
                return
            if "before" not in frame:  # the newest page: 3, with more before it
                page = [scripted_message(3)]
                ws.send(json.dumps({"type": "history", "messages": page, "has_more": True}))
                return
            before_requests.append(frame["before"])
            if len(before_requests) == 1:  # the database fails once
                ws.send(json.dumps(UNAVAILABLE))
                return
            page = [scripted_message(s) for s in (1, 2)]
            answer = {"type": "history", "before": 3, "messages": page, "has_more": False}
            ws.send(json.dumps(answer))

        ws.on_message(on_message)
        ws.send(json.dumps(scripted_hello(3)))

    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    earlier = tab.page.get_by_role("button", name="Load earlier messages")
    await earlier.click()
    await expect(tab.page.locator("#toast")).to_contain_text("temporarily unavailable")
    await earlier.click()
    await eventually(lambda: len(before_requests) == 2, "Load earlier asked again")
    await expect(tab.page.locator("#messages .body")).to_have_text(["m1", "m2", "m3"])
    assert before_requests == [3, 3]


async def test_a_catch_up_answered_unavailable_is_asked_again(open_tab, server):
    """After a reconnect the page asks for what it missed (4-6) while a live message (7) comes:
    an `unavailable` answer must not leave 4-6 out for good."""
    import json

    tab = await signed_in(open_tab, server, "bob")
    sockets, after_requests = [], []

    def handler(ws):
        n = len(sockets)
        sockets.append(ws)

        def on_message(text):
            frame = json.loads(text)
            if frame["type"] != "history":
                return
            if "after" not in frame:
                page = [scripted_message(s) for s in (1, 2, 3)]
                ws.send(json.dumps({"type": "history", "messages": page, "has_more": False}))
                return
            after_requests.append(frame["after"])
            if len(after_requests) == 1:  # the database fails once
                ws.send(json.dumps(UNAVAILABLE))
                return
            page = [scripted_message(s) for s in range(frame["after"] + 1, 7)]
            answer = {"messages": page, "has_more": False, "after": frame["after"]}
            ws.send(json.dumps({"type": "history", **answer}))

        ws.on_message(on_message)
        ws.send(json.dumps(scripted_hello(3 if n == 0 else 6)))
        if n == 1:
            ws.send(json.dumps({"type": "message", **scripted_message(7)}))

    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await expect(tab.page.locator("#log")).to_have_attribute("aria-busy", "false")
    await sockets[0].close(code=1001, reason="restart")
    await expect(tab.page.locator("#messages > li")).to_have_count(7)
    assert await message_seqs(tab) == [1, 2, 3, 4, 5, 6, 7]
    assert after_requests == [3, 3]
    assert len(sockets) == 2
    assert "unavailable" not in (await tab.page.locator("#toast").text_content() or "")


@pytest.mark.parametrize(
    ("can_post", "focused"),
    [(True, "#composer-input"), (False, "#log")],
    ids=["to-the-composer", "to-the-log-in-a-read-only-room"],
)
async def test_retry_now_pressed_by_keyboard_hands_focus_on_as_it_hides(
    open_tab, server, can_post, focused
):
    """Retry now hides as the page connects again: a keyboard user who pressed it must not be
    thrown back to the top of the page, but go on writing (or to the log if they cannot)."""
    import json

    tab = await signed_in(open_tab, server, "bob", clock=True)
    sockets = []

    def handler(ws):
        sockets.append(ws)
        ws.send(json.dumps({**scripted_hello(0), "can_post": can_post}))

    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await expect(tab.page.locator("#log")).to_have_attribute("aria-busy", "false")
    # Paused: the backoff's own reconnect waits for the test, so only the button reconnects.
    await tab.page.clock.pause_at(await tab.page.evaluate("Date.now() / 1000 + 1"))
    await sockets[0].close(code=1001, reason="restart")
    retry = tab.page.get_by_role("button", name="Retry now")
    await retry.focus()
    await tab.page.keyboard.press("Enter")

    await expect(tab.page.locator("#status")).to_have_attribute("data-state", "open")
    await expect(retry).to_be_hidden()
    await expect(tab.page.locator(focused)).to_be_focused()
    assert len(sockets) == 2
    await assert_healthy(tab)


async def test_a_server_that_fails_right_after_hello_is_retried_with_growing_delays(
    open_tab, server
):
    import json

    tab = await signed_in(open_tab, server, "bob")
    opened = []

    def handler(ws):
        opened.append(asyncio.get_running_loop().time())
        ws.send(json.dumps(scripted_hello(0)))
        asyncio.get_running_loop().create_task(ws.close(code=1011, reason="internal error"))

    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await eventually(lambda: len(opened) >= 4, "four attempts", timeout=30)
    # Backoff ceilings 1, 2, 4 s, each wait half to all of its ceiling (static/chat/connection.js
    # backoffDelay): 0.5-1, 1-2 and 2-4 s. A counter reset by every hello would wait 0.5-1 s
    # each time. (A gap runs from one call of the route's handler to the next, which comes
    # after the page's wait: lower bounds only, with 50 ms to spare.)
    waits = [later - earlier for earlier, later in itertools.pairwise(opened[:4])]
    assert waits[1] >= 0.95, waits
    assert waits[2] >= 1.95, waits


async def test_a_deletion_that_overtakes_its_message_still_hides_the_body(open_tab, server):
    """The hub can hold a message for a gap fill while its `deleted` frame goes straight out."""
    import json

    tab = await signed_in(open_tab, server, "bob")

    def handler(ws):
        ws.send(json.dumps(scripted_hello(0)))
        ws.send(json.dumps({"type": "deleted", "room": "lobby", "seq": 1}))
        ws.send(json.dumps({"type": "message", **scripted_message(1)}))
        ws.send(json.dumps({"type": "message", **scripted_message(2)}))

    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await expect(tab.page.locator("[data-seq='2']")).to_have_count(1)
    first = tab.page.locator("[data-seq='1']")
    await expect(first).to_have_class(re.compile(r"\bdeleted\b"))
    await expect(first).not_to_contain_text("m1")
    await expect(tab.page.locator("[data-seq='2']")).to_contain_text("m2")


async def test_a_deletion_that_overtakes_the_first_page_still_hides_the_body(open_tab, server):
    """docs/protocol.md §5: a `deleted` about a message older than hello.last_seq can come before
    the `history` that shows it. Here a live message (4) comes first, then the deletion of 2,
    then the newest page, read before that deletion (2 still with its body)."""
    import json

    tab = await signed_in(open_tab, server, "bob")

    def handler(ws):
        def on_message(text):
            if json.loads(text)["type"] != "history":
                return
            ws.send(json.dumps({"type": "deleted", "room": "lobby", "seq": 2}))
            page = [scripted_message(s) for s in (1, 2, 3)]
            ws.send(json.dumps({"type": "history", "messages": page, "has_more": False}))

        ws.on_message(on_message)
        ws.send(json.dumps(scripted_hello(3)))
        ws.send(json.dumps({"type": "message", **scripted_message(4)}))

    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await expect(tab.page.locator("#log")).to_have_attribute("aria-busy", "false")
    assert await message_seqs(tab) == [1, 2, 3, 4]
    second = tab.page.locator("[data-seq='2']")
    await expect(second).to_have_class(re.compile(r"\bdeleted\b"))
    await expect(second).not_to_contain_text("m2")
    await expect(tab.page.locator("#messages .body")).to_have_text(
        ["m1", "This message was deleted.", "m3", "m4"]
    )


async def test_a_reconnected_page_catches_up_on_deletions_and_restorations(open_tab, server):
    """Shown: 1, 2 (deleted), 3. Away: 1 and 3 deleted, 2 restored; while the resync answer is
    on its way, a live `restored` for 1 comes first: newer, so the answer leaves 1 alone."""
    import json

    resyncs = []
    tombstone = {**scripted_message(2), "deleted": True}
    del tombstone["body"], tombstone["client_id"]

    def on_frame(ws, frame):
        if frame["type"] == "history":
            page = [scripted_message(1), tombstone, scripted_message(3)]
            ws.send(json.dumps({"type": "history", "messages": page, "has_more": False}))
        elif frame["type"] == "resync":
            resyncs.append(frame)
            ws.send(json.dumps({"type": "restored", "message": scripted_message(1)}))
            answer = {"from": 1, "to": 3, "deleted": [1, 3], "restored": [scripted_message(2)]}
            ws.send(json.dumps({"type": "resync", **answer}))

    tab, sockets = await lobby_on_a_scripted_socket(open_tab, server, last_seq=3, on_frame=on_frame)
    await expect(tab.page.locator("[data-seq='2']")).to_have_class(re.compile(r"\bdeleted\b"))
    assert resyncs == []  # a first load has nothing to resync
    await sockets[0].close(code=1001, reason="restart")
    await expect(tab.page.locator("[data-seq='3']")).to_have_class(re.compile(r"\bdeleted\b"))
    assert resyncs == [{"type": "resync", "from": 1, "to": 3, "deleted": [2]}]
    second = tab.page.locator("[data-seq='2']")
    await expect(second).not_to_have_class(re.compile(r"\bdeleted\b"))
    await expect(second).to_contain_text("m2")
    first = tab.page.locator("[data-seq='1']")
    await expect(first).not_to_have_class(re.compile(r"\bdeleted\b"))
    await expect(first).to_contain_text("m1")
    assert await message_seqs(tab) == [1, 2, 3]
    assert len(sockets) == 2


async def test_a_room_made_read_only_stops_the_composer_at_once(open_tab, server):
    import json

    tab, sockets = await lobby_on_a_scripted_socket(open_tab, server)
    await expect(tab.page.locator("#composer-input")).to_be_enabled()
    change = {"room": "lobby", "title": "Quiet lobby", "visibility": "read_only", "can_post": False}
    sockets[0].send(json.dumps({"type": "room", **change}))
    await expect(tab.page.locator("#composer-input")).to_be_disabled()
    await expect(tab.page.locator("#composer-notice")).to_contain_text("read-only")
    await expect(tab.page.locator("h1")).to_have_text("Quiet lobby")
    await expect(tab.page).to_have_title("Quiet lobby · Securechat")


async def test_a_room_frame_updates_the_mode_and_the_names_in_the_header(open_tab, server):
    """The header's Public/Read-only tag and the labels naming the room follow the `room` frame,
    like the title: a page must not say "Public" over a composer it refuses as read-only."""
    import json

    tab, sockets = await lobby_on_a_scripted_socket(open_tab, server)
    await expect(tab.page.locator(".room-heading .tag")).to_have_text("Public")
    change = {"room": "lobby", "title": "Quiet lobby", "visibility": "read_only", "can_post": False}
    sockets[0].send(json.dumps({"type": "room", **change}))
    await expect(tab.page.locator("#composer-input")).to_be_disabled()
    await expect(tab.page.locator(".room-heading .tag")).to_have_text("Read-only")
    await expect(tab.page.get_by_role("log")).to_have_accessible_name("Messages in Quiet lobby")
    await expect(tab.page.get_by_label("Message Quiet lobby")).to_be_disabled()


async def test_room_list_badges_follow_new_messages_while_shown(open_tab, garden, server_factory):
    server = server_factory(CHAT_UNREAD_REFRESH_SECONDS="1")
    alice = await signed_in(open_tab, server, "alice")
    await alice.page.goto("/")
    badge = alice.page.locator(".room-row[data-slug='lobby'] .unread")
    await expect(badge).to_have_text("2 unread")

    bob = await signed_in(open_tab, server, "bob")
    await open_room(bob, "lobby")
    await send(bob, "three")
    await expect(badge).to_have_text("3 unread")  # no reload: the list asked again by itself
    await assert_healthy(alice, bob)


async def test_lists_longer_than_a_page_are_shown_in_pages_and_kept_fresh(
    open_tab, garden, server_factory
):
    """A page of rooms past the first keeps its own badges fresh. The members drawer shows the
    member list's first page and the next on request; the users present that no page brought
    are asked for by name, in one request, never by loading every page."""
    from chat.serializers import LIST_LIMIT

    @sync_to_async
    def crowd():
        owner = get_user_model().objects.get(username="alice")
        Room.objects.bulk_create(
            Room(slug=f"a-{i:04d}", title="t", created_by=owner) for i in range(LIST_LIMIT)
        )
        users = get_user_model().objects.bulk_create(
            get_user_model()(username=f"zz-{i:04d}") for i in range(LIST_LIMIT + 1)
        )
        Membership.objects.bulk_create(Membership(room=garden, user=u) for u in users)
        # Past the first page, by name: known to alice's page only once present.
        make_member(garden, make_user("zzz-mod"), role=Membership.Role.MODERATOR)
        make_user("zzz-guest")

    await crowd()
    server = server_factory(CHAT_UNREAD_REFRESH_SECONDS="1")
    alice = await signed_in(open_tab, server, "alice", viewport=PHONE)
    page = alice.page
    await page.goto("/")
    await expect(page.locator(".room-row[data-slug='lobby']")).to_have_count(0)
    await page.get_by_role("link", name="More rooms").click()
    badge = page.locator(".room-row[data-slug='lobby'] .unread")
    await expect(badge).to_have_text("2 unread")

    bob = await signed_in(open_tab, server, "bob")
    await open_room(bob, "lobby")
    await send(bob, "three")
    await expect(badge).to_have_text("3 unread")  # the second page's refresh asks for it

    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/members/" in r.url else None)
    await open_room(alice, "garden")
    await page.get_by_role("button", name="Members").click()
    more = page.get_by_role("button", name="Show more members")
    await expect(more).to_be_visible()
    await expect(page.locator("[data-username='zz-0098']")).to_have_count(1)
    await expect(page.locator(f"[data-username='zz-{LIST_LIMIT:04d}']")).to_have_count(0)
    assert len(asked) == 1  # the first page only
    # Finding a member past the pages shown: one request for those whose name starts so.
    search = page.get_by_role("searchbox", name="Find a member by the start of their name")
    await search.fill("ZZZ-M")
    await expect(page.locator("#member-list .member")).to_have_count(1)
    await expect(page.locator("[data-username='zzz-mod'] .tag")).to_have_text(["moderator"])
    searches = [url for url in asked if "q=" in url]
    assert len(searches) == 1
    assert "q=ZZZ-M" in searches[0]
    await search.fill("nobody-by-that-name")
    await expect(page.locator("#members-empty")).to_have_text(
        "No member's name starts with “nobody-by-that-name”."
    )
    await search.fill("")
    await expect(page.locator("[data-username='zz-0098']")).to_have_count(1)
    await expect(more).to_be_visible()  # the whole list's next page again
    asked.clear()
    await more.focus()
    await page.keyboard.press("Enter")
    await expect(page.locator(f"[data-username='zz-{LIST_LIMIT:04d}']")).to_have_count(1)
    await expect(more).to_be_hidden()
    await expect(page.locator("#members-heading")).to_be_focused()
    assert len(asked) == 1
    asked.clear()

    moderator = await signed_in(open_tab, server, "zzz-mod")
    guest = await signed_in(open_tab, server, "zzz-guest")
    for tab in (moderator, guest):
        await open_room(tab, "garden")
    mod_row = page.locator("[data-username='zzz-mod']")
    guest_row = page.locator("[data-username='zzz-guest']")
    await expect(mod_row.locator(".tag")).to_have_text(["moderator"])
    await expect(guest_row.locator(".tag")).to_have_text(["guest"])
    assert [url for url in asked if "username=" in url]
    assert all("after=" not in url for url in asked)  # no page of the list again
    await assert_healthy(alice, bob, moderator, guest)


LONG_USERNAME = "christopher.montgomery@example-corp.com"


@pytest.fixture
def long_named_member(lobby):
    make_member(lobby, make_user(LONG_USERNAME))


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
async def test_a_long_username_does_not_push_the_manage_button_out_of_the_members(
    open_tab, long_named_member, server, viewport
):
    """An e-mail-like username is a valid one: its row ellipsises the name (the CSS says so)
    and keeps the Manage button in view, in the phone's drawer and the desktop's column."""
    owner = await signed_in(open_tab, server, "alice", viewport=viewport)
    await open_room(owner, "lobby")
    page = owner.page
    if viewport is PHONE:
        await page.get_by_role("button", name="Members").click()
    manage = page.get_by_role("button", name=f"Manage {LONG_USERNAME}")
    await expect(manage).to_be_visible()
    await expect(manage).to_be_in_viewport(ratio=1)
    panel = await page.locator("#members-panel").bounding_box()
    button = await manage.bounding_box()
    assert button["x"] + button["width"] <= panel["x"] + panel["width"]
    await manage.click()
    await expect(page.locator("#moderate-name")).to_have_text(LONG_USERNAME)


async def test_escape_in_the_member_search_clears_it_and_keeps_the_drawer_open(open_tab, server):
    """Escape in a search box clears it (the browser's own behaviour): the phone's drawer must
    not close under the reader at the same time and throw them back to the Members button. A
    second Escape, in the empty box, closes the drawer as from anywhere in it."""
    alice = await signed_in(open_tab, server, "alice", viewport=PHONE)
    await open_room(alice, "lobby")
    page = alice.page
    await page.get_by_role("button", name="Members").click()
    search = page.get_by_role("searchbox", name="Find a member by the start of their name")
    await search.fill("ca")
    await expect(page.locator("#member-list .member")).to_have_count(1)

    await search.press("Escape")
    await expect(search).to_have_value("")
    await expect(search).to_be_focused()
    await expect(page.locator("#members-toggle")).to_have_attribute("aria-expanded", "true")
    await expect(page.locator("#member-list .member")).to_have_count(3)

    await search.press("Escape")
    await expect(page.locator("#members-toggle")).to_have_attribute("aria-expanded", "false")
    await assert_healthy(alice)


async def test_a_search_says_no_member_matches_only_once_the_server_has_said_so(open_tab, server):
    """The search shows the members known that match at once, then asks the server for the
    rest (a big room's pages not loaded). While it asks, that none of the members known matches
    proves nothing: "No member's name starts with …" waits for the answer."""
    import json

    from chat.models import Room

    await sync_to_async(lambda: make_member(Room.objects.get(slug="lobby"), make_user("zed")))()
    alice = await signed_in(open_tab, server, "alice")
    answered = []

    async def zed_on_a_later_page_and_a_slow_search(route):
        response = await route.fetch()
        items = await response.json()
        if "q=ze" in route.request.url:
            await asyncio.sleep(1.5)
            answered.append(route.request.url)
        else:
            items = [member for member in items if member["username"] != "zed"]
        await route.fulfill(response=response, body=json.dumps(items))

    await alice.page.route("**/api/rooms/lobby/members/", zed_on_a_later_page_and_a_slow_search)
    await alice.page.route("**/api/rooms/lobby/members/?q=*", zed_on_a_later_page_and_a_slow_search)
    await open_room(alice, "lobby")
    page = alice.page
    await expect(page.locator(".member[data-username='carol']")).to_have_count(1)
    search = page.get_by_role("searchbox", name="Find a member by the start of their name")
    await search.fill("ze")
    await asyncio.sleep(0.8)  # the search is asked and not answered yet
    assert answered == []
    assert await page.locator("#member-list .member").count() == 0
    assert await page.locator("#members-empty").is_hidden()  # now, not eventually

    await expect(page.locator(".member[data-username='zed']")).to_have_count(1)
    await expect(page.locator("#members-empty")).to_be_hidden()
    await search.fill("zz")
    await expect(page.locator("#members-empty")).to_have_text("No member's name starts with “zz”.")
    await page.unroute_all(behavior="wait")
    await assert_healthy(alice)


async def test_a_member_removed_while_typing_is_taken_to_the_explanation(open_tab, server):
    """The composer hides under carol's cursor when she is removed: focus goes to what says why
    and offers the way back to the rooms, not to the top of the page."""
    owner, carol = await two_in_the_lobby(open_tab, server, second="carol")
    await carol.page.locator("#composer-input").fill("about to say")
    await carol.page.locator("#composer-input").focus()

    await owner.page.get_by_role("button", name="Manage carol").click()
    await owner.page.get_by_role("button", name="Remove from room").click()
    stopped = carol.page.locator("#stopped")
    await expect(stopped).to_contain_text("You were removed from this room.")
    await expect(stopped).to_be_focused()
    await carol.page.keyboard.press("Tab")
    await expect(carol.page.get_by_role("link", name="Back to rooms")).to_be_focused()
    await assert_healthy(owner, carol)


async def count_first_pages(tab) -> list:
    """Each request for the lobby's member list's first page (no query), recorded and passed on."""
    first_pages = []

    async def record(route):
        first_pages.append(route.request.url)
        await route.continue_()

    await tab.page.route("**/api/rooms/lobby/members/", record)
    return first_pages


async def test_a_reconnect_asks_only_about_the_users_who_came_meanwhile(open_tab, server):
    """After a server restart every page of a busy room says hello again at once. A page keeps
    what it knows of the users present: it asks for the list's first page again and about those
    who came while it was away, not about all 300 present again (three lookups from each page)."""
    import json

    tab = await signed_in(open_tab, server, "bob")
    present = [f"u-{n:04d}" for n in range(300)]
    sockets, asked = [], []

    def handler(ws):
        came = ["late-1", "late-2"] if sockets else []
        sockets.append(ws)
        ws.send(json.dumps({**scripted_hello(0), "presence": ["bob", *present, *came]}))

    await answer_lookups_with_guests(tab, asked)
    first_pages = await count_first_pages(tab)
    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    await expect(tab.page.locator(".member[data-username='u-0299'] .tag")).to_have_text(["guest"])
    assert sorted(asked) == present
    asked.clear()

    await sockets[0].close(code=1001, reason="restart")
    await expect(tab.page.locator(".member[data-username='late-2'] .tag")).to_have_text(["guest"])
    await expect(tab.page.locator(".member[data-username='u-0000'] .tag")).to_have_text(["guest"])
    await expect(tab.page.locator(".member[data-username='carol']")).to_have_count(1)
    await asyncio.sleep(0.5)  # a lookup the page would make of the others has gone out by now
    assert len(sockets) == 2
    assert sorted(asked) == ["late-1", "late-2"]
    assert len(first_pages) == 2
    await assert_healthy(tab)


@pytest.mark.parametrize(
    ("failure", "retried"),
    [
        ({"status": 503, "body": '{"detail": "down"}'}, True),
        ({"status": 429, "body": '{"detail": "slow down"}', "headers": {"Retry-After": "1"}}, True),
        (None, True),  # the request never reaches the server
        ({"status": 403, "body": '{"detail": "no"}'}, False),  # access lost: the socket says
    ],
    ids=["unavailable", "throttled", "unreachable", "forbidden"],
)
async def test_a_lookup_that_fails_is_made_again_later(open_tab, server, failure, retried):
    """zed is present past the first page; the server fails the lookup of him. Without a join
    to prompt another, the page used to leave him untagged until its next reconnect: it asks
    again after a short backoff (a 429's Retry-After), except when access is refused."""
    import json

    tab = await signed_in(open_tab, server, "bob")
    asked = []

    def handler(ws):
        ws.send(json.dumps({**scripted_hello(0), "presence": ["bob", "zed"]}))

    await answer_lookups_with_guests(tab, asked, fail_first=(failure,))
    await tab.page.route_web_socket(re.compile(r".*/ws/rooms/lobby/"), handler)
    await tab.page.goto("/rooms/lobby/")
    zed_tags = tab.page.locator(".member[data-username='zed'] .tag")
    if retried:
        await expect(zed_tags).to_have_text(["guest"])
        assert asked == ["zed", "zed"]
    else:
        await asyncio.sleep(3)  # longer than the first backoff (2 s at most)
        assert asked == ["zed"]
        await expect(zed_tags).to_have_count(0)
    await assert_healthy(tab)


async def test_a_first_page_of_members_that_fails_is_asked_for_again(open_tab, server):
    """The members list's first page fails once (the server is busy): the drawer used to stay
    without carol, a member not present, until the next reconnect."""
    tab = await signed_in(open_tab, server, "bob")
    failed = []

    async def fail_once(route):
        if not failed:
            failed.append(route.request.url)
            await route.fulfill(status=503, content_type="application/json", body="{}")
            return
        await route.continue_()

    await tab.page.route("**/api/rooms/lobby/members/", fail_once)
    await open_room(tab, "lobby")
    await expect(tab.page.locator(".member[data-username='carol']")).to_have_count(1)
    assert len(failed) == 1
    await assert_healthy(tab)


async def test_a_member_made_moderator_sees_the_members_as_a_moderator_does(
    open_tab, server, lobby
):
    """bob is promoted while his page is open (the `membership` frame; no new hello): the
    members his page knows were asked for as a member's, without bans. It asks for them again,
    so the banned member shows in his drawer as it does for every moderator's."""
    await sync_to_async(
        lambda: make_member(lobby, make_user("mallory"), banned_at=timezone.now())
    )()
    bob = await signed_in(open_tab, server, "bob")
    first_pages = await count_first_pages(bob)
    owner = await signed_in(open_tab, server, "alice")
    await open_room(bob, "lobby")
    await open_room(owner, "lobby")
    await expect(bob.page.locator(".member[data-username='carol']")).to_have_count(1)
    banned = bob.page.locator("#banned-list .member[data-username='mallory']")
    await expect(banned).to_have_count(0)

    await owner.page.get_by_role("button", name="Manage bob").click()
    await owner.page.get_by_role("button", name="Make moderator").click()
    await expect(banned).to_have_count(1)
    assert len(first_pages) == 2
    assert len(bob.sockets) == 1  # live, not through a reconnect's hello
    await assert_healthy(owner, bob)


async def test_room_list_shows_rooms_that_came_or_went_elsewhere_without_a_reload(
    open_tab, garden, lobby, server_factory
):
    """alice is added to a private room, loses another, and the garden is renamed while her list
    is open: the list shows it at its next refresh, says which rooms came and went, and keeps
    her focus on the lobby's link."""

    @sync_to_async
    def private_room(slug, title):
        room = make_room(slug, owner=make_user(f"{slug}-owner"), title=title, visibility="private")
        make_member(room, lobby.memberships.get(user__username="alice").user)
        return room

    attic = await private_room("attic", "Attic")
    server = server_factory(CHAT_UNREAD_REFRESH_SECONDS="1")
    alice = await signed_in(open_tab, server, "alice")
    page = alice.page
    await page.goto("/")
    await expect(page.locator(".room-row")).to_have_count(3)  # attic, garden, lobby
    lobby_link = page.locator(".room-row[data-slug='lobby'] .room-link")
    await lobby_link.focus()

    await private_room("den", "Den")
    await sync_to_async(Membership.objects.filter(room=attic).delete)()
    await sync_to_async(Room.objects.filter(slug="garden").update)(title="Walled garden")

    await expect(page.locator(".room-row .room-title")).to_have_text(
        ["Den", "Walled garden", "Lobby"]
    )
    await expect(page.get_by_role("status").filter(has_text="added")).to_have_text(
        "Den added to the list. Attic no longer in the list."
    )
    await expect(lobby_link).to_be_focused()
    await expect(page.locator(".room-row[data-slug='lobby'] .unread")).to_have_text("2 unread")
    await assert_healthy(alice)


async def test_room_list_keeps_focus_on_a_room_joined_elsewhere(open_tab, garden, server_factory):
    """alice's focus is on Join Garden when she joins it in another tab: the redrawn row has no
    Join button, and focus goes to the garden's link, not to the page."""
    server = server_factory(CHAT_UNREAD_REFRESH_SECONDS="1")
    alice = await signed_in(open_tab, server, "alice")
    page = alice.page
    await page.goto("/")
    await page.get_by_role("button", name="Join Garden").focus()

    await sync_to_async(
        lambda: make_member(garden, get_user_model().objects.get(username="alice"))
    )()

    await expect(page.get_by_role("button", name="Join Garden")).to_have_count(0)
    await expect(page.locator(".room-row[data-slug='garden'] .room-link")).to_be_focused()
    await assert_healthy(alice)
