"""The pages at phone and desktop widths, with screenshots for the docs.

Always checks that nothing is wider than a 360 px phone screen. Screenshots go to a temporary
directory, or to docs/screenshots/ with SCREENSHOTS=1 (see docs/pages.md).
"""

import os
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from playwright.async_api import expect

from chat import services
from chat.models import Message
from tests.e2e.browser import (  # noqa: F401  (the *_fixture names are fixtures)
    DESKTOP,
    PHONE,
    assert_healthy,
    browser_fixture,
    open_room,
    open_tab_fixture,
    sign_in_fast,
)
from tests.factories import make_member, make_room, make_user

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CONVERSATION = [
    ("alice", "Morning all! Release 2.4 is planned for Thursday."),
    ("bob", "Morning. The migration script is ready for review."),
    ("bob", "It touches the audit tables, so a second pair of eyes would be great."),
    ("carol", "I can take it after standup."),
    ("dave", "Quick question: are we still freezing the API on Wednesday?"),
    ("alice", "Yes, Wednesday noon. Anything after that waits for 2.5."),
    (
        "carol",
        "Reviewed. Two small comments:\n1. batch the backfill in chunks of 10k\n"
        "2. add the index before the backfill, not after",
    ),
    ("bob", "Good catches, fixing both now."),
    ("dave", "(this message gets deleted)"),
    ("alice", "Release notes draft is in the shared folder. Please add your bits by tomorrow."),
    (
        "dave",
        "Done for the client changes: reconnect with backoff, resume after a restart, "
        "and the offline outbox.",
    ),
    ("bob", "Migration updated. Thanks Carol!"),
    ("carol", "Looks good to me now."),
]


@pytest.fixture
def busy_room(transactional_db):
    users = {name: make_user(name) for name in ("alice", "bob", "carol", "dave", "erin")}
    room = make_room("release", owner=users["alice"], title="Release planning")
    make_member(room, users["bob"], role="moderator")
    for name in ("carol", "dave", "erin"):
        make_member(room, users[name])
    make_member(make_room("lobby", title="Lobby", owner=users["bob"]), users["alice"])
    make_room("random", title="Random")
    make_room("team", title="Core team", visibility="private", owner=users["alice"])
    start = timezone.now().replace(hour=9, minute=2, second=0, microsecond=0)
    for number, (author, body) in enumerate(CONVERSATION, start=1):
        services.message_send(room=room, author=users[author], body=body, client_id=f"m{number}")
        Message.objects.filter(room=room, seq=number).update(
            created_at=start + timedelta(minutes=3 * number)
        )
    services.message_delete(actor=users["dave"], room=room, seq=9)
    room.refresh_from_db()
    services.room_mark_read(user=users["alice"], room=room, seq=10)
    return users


@pytest.fixture
def shots(tmp_path) -> Path:
    if os.environ.get("SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return DOCS_SCREENSHOTS
    return tmp_path


async def screenshot(page, path: Path, viewport: dict) -> None:
    # Nothing may be wider than the window: at 360 px, no sideways scrolling.
    assert await page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    data = await page.screenshot(path=path)
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (viewport["width"], viewport["height"])


@pytest.mark.parametrize(("viewport", "suffix"), [(DESKTOP, ""), (PHONE, "-phone")])
async def test_pages_fit_the_screen(open_tab, server_factory, busy_room, shots, viewport, suffix):
    server = server_factory()
    visitor = await open_tab(server, viewport=viewport)
    await visitor.page.goto("/login/")
    await screenshot(visitor.page, shots / f"sign-in{suffix}.png", viewport)

    others = []
    for name in ("bob", "carol"):  # online, and carol is typing
        other = await open_tab(server)
        await sign_in_fast(other, server, busy_room[name])
        await open_room(other, "release")
        others.append(other)
    alice = await open_tab(server, viewport=viewport)
    await sign_in_fast(alice, server, busy_room["alice"])
    page = alice.page
    await page.goto("/")
    await expect(page.locator(".room-row[data-slug='release'] .unread")).to_have_text("3 unread")
    await screenshot(page, shots / f"rooms{suffix}.png", viewport)

    await open_room(alice, "release")
    await expect(page.locator("#messages > li")).to_have_count(len(CONVERSATION))
    await expect(page.locator("#member-list .member.online")).to_have_count(3)
    await others[1].page.locator("#composer-input").press_sequentially("On it")
    await expect(page.locator("#typing")).to_have_text("carol is typing…")
    await page.locator("#composer-input").fill("Great work everyone, shipping Thursday!")
    await screenshot(page, shots / f"room{suffix}.png", viewport)

    if viewport is PHONE:
        await page.get_by_role("button", name="Members").click()
        await expect(page.locator("#members-panel")).to_be_visible()
        await expect(page.locator("#members-close")).to_be_focused()
        await screenshot(page, shots / "members-phone.png", viewport)
    await assert_healthy(visitor, alice, *others)
