"""The page views through Django's test client: who may see what, escaping, CSP-safe markup."""

import math
from html.parser import HTMLParser

import pytest
from django.utils import timezone
from django.utils.html import escape

from chat.models import Membership, Room
from tests.factories import make_member, make_room, make_user

pytestmark = pytest.mark.django_db

HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    '"><svg onload=alert(1)>',
    "' onmouseover='alert(1)",
]


def user(username: str = "alice", **fields):
    # No password: these tests sign in with force_login, and hashing costs half a second.
    return make_user(username, password=None, **fields)


@pytest.fixture
def alice(client):
    alice = user("alice")
    client.force_login(alice)
    return alice


class InlineCode(HTMLParser):
    """Collects what a CSP without 'unsafe-inline' would refuse or what smells of injection."""

    def __init__(self):
        super().__init__()
        self.problems: list[str] = []

    def handle_starttag(self, tag, attrs):
        names = dict(attrs)
        if tag == "style":
            self.problems.append("<style>")
        if tag == "script" and "src" not in names and names.get("type") != "application/json":
            self.problems.append("inline <script>")
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.problems.append(f"{name}= on <{tag}>")
            if name in ("href", "src", "action") and (value or "").strip().lower().startswith(
                "javascript:"
            ):
                self.problems.append(f"javascript: URL on <{tag}>")


def inline_code(html: str) -> list[str]:
    parser = InlineCode()
    parser.feed(html)
    return parser.problems


@pytest.mark.parametrize("path", ["/", "/rooms/lobby/"])
def test_pages_redirect_to_sign_in_when_anonymous(client, path):
    make_room("lobby")
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"] == f"/login/?next={path}"


def test_room_page_is_404_when_the_room_is_unknown(client, alice):
    assert client.get("/rooms/nowhere/").status_code == 404


def test_room_page_is_404_when_the_room_is_archived(client, alice):
    make_room("old", archived_at=timezone.now())
    response = client.get("/rooms/old/")
    assert response.status_code == 404
    assert b"Nothing here" in response.content


def test_room_page_is_403_for_a_private_room_without_membership(client, alice):
    make_room("secret", visibility=Room.Visibility.PRIVATE, title="Quarterly numbers")
    response = client.get("/rooms/secret/")
    assert response.status_code == 403
    assert b"You can't open this room" in response.content
    assert b"Quarterly numbers" not in response.content  # not even the title leaks
    assert b"chat/room.js" not in response.content


def test_room_page_is_403_when_banned(client, alice):
    room = make_room("lobby", title="Lobby")
    make_member(room, alice, banned_at=timezone.now())
    assert client.get("/rooms/lobby/").status_code == 403


def test_room_page_hands_the_client_its_room_user_and_limit(client, alice, settings):
    settings.CHAT_MAX_MESSAGE_LENGTH = 500
    make_room("lobby", title="Lobby")
    response = client.get("/rooms/lobby/")
    assert response.status_code == 200
    assert b'data-room="lobby"' in response.content
    assert b'data-user="alice"' in response.content
    assert b'data-max-length="500"' in response.content
    assert b'type="module" src="/static/chat/room.js"' in response.content


@pytest.mark.parametrize(("member", "offered"), [(False, True), (True, False)])
def test_room_page_offers_to_join_a_public_room_only_to_non_members(client, alice, member, offered):
    room = make_room("lobby")
    if member:
        make_member(room, alice)
    assert (b'id="join"' in client.get("/rooms/lobby/").content) is offered


def test_room_list_shows_rooms_the_user_can_see_with_unread_and_join(client, alice):
    mine = make_room("mine", title="Mine", last_seq=7)
    make_member(mine, alice, last_read_seq=4)
    make_room("open", title="Open room")
    make_room("hidden", visibility=Room.Visibility.PRIVATE, title="Hidden room")
    banned = make_room("barred", title="Barred room")
    make_member(banned, alice, banned_at=timezone.now())

    content = client.get("/").content.decode()

    assert "Mine" in content
    assert "Open room" in content
    assert "Hidden room" not in content
    assert "Barred room" not in content
    assert 'data-unread-for="mine">' in content.replace("\n", "")
    assert '<span class="unread-count">3</span>' in content
    assert 'data-join="open"' in content
    assert 'data-join="mine"' not in content


def test_room_list_page_comes_in_pages_like_the_api(client, alice, monkeypatch):
    monkeypatch.setattr("chat.views.LIST_LIMIT", 2)
    for slug in ["a-room", "b-room", "c-room"]:
        make_room(slug)

    first = client.get("/").content.decode()
    assert 'data-slug="a-room"' in first
    assert 'data-slug="b-room"' in first
    assert 'data-slug="c-room"' not in first
    assert 'data-page-after=""' in first
    assert 'href="/?after=b-room" rel="next">More rooms' in first

    second = client.get("/?after=b-room").content.decode()
    assert 'data-slug="c-room"' in second
    assert 'data-slug="b-room"' not in second
    assert 'data-page-after="b-room"' in second  # the unread refresh asks for this page
    assert 'rel="next"' not in second
    assert 'href="/">First rooms' in second

    past = client.get("/?after=z").content.decode()
    assert "No more rooms." in past
    assert "No rooms yet." not in past


@pytest.mark.parametrize("after", ["<b>", "A-ROOM", "a" * 51, "-x"])
def test_room_list_page_starts_over_for_an_edited_after(client, alice, after):
    make_room("a-room")
    content = client.get("/", {"after": after}).content.decode()
    assert 'data-slug="a-room"' in content
    assert 'data-page-after=""' in content


def test_room_list_offers_no_join_for_private_rooms_staff_can_see(client):
    staff = user("root", is_staff=True)
    client.force_login(staff)
    make_room("hidden", visibility=Room.Visibility.PRIVATE, title="Hidden room")
    content = client.get("/").content.decode()
    assert "Hidden room" in content
    assert 'data-join="hidden"' not in content


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_room_titles_and_usernames_are_escaped(client, hostile):
    mallory = user(hostile)
    client.force_login(mallory)
    room = make_room("den", title=hostile)
    make_member(room, mallory, role=Membership.Role.OWNER)

    for path in ("/", "/rooms/den/"):
        content = client.get(path).content.decode()
        assert hostile not in content
        assert escape(hostile) in content
        assert inline_code(content) == []


@pytest.mark.parametrize("path", ["/", "/rooms/lobby/", "/rooms/secret/", "/rooms/nowhere/"])
def test_pages_have_no_inline_scripts_styles_or_handlers(client, alice, path):
    make_room("lobby")
    make_room("secret", visibility=Room.Visibility.PRIVATE)
    response = client.get(path)
    assert response.status_code in (200, 403, 404)
    assert inline_code(response.content.decode()) == []


@pytest.mark.parametrize(
    ("next_url", "goes_to"),
    [("/login/", "/"), ("/login/?next=/login/", "/"), ("/rooms/lobby/", "/rooms/lobby/")],
)
def test_a_signed_in_visitor_of_the_login_page_goes_on_never_to_it_again(client, next_url, goes_to):
    client.force_login(make_user("alice"))
    response = client.get("/login/", {"next": next_url})
    assert (response.status_code, response["Location"]) == (302, goes_to)


def test_login_page_is_inline_free_and_labelled_when_anonymous(client):
    response = client.get("/login/")
    content = response.content.decode()
    assert inline_code(content) == []
    assert "unsafe-inline" not in response["Content-Security-Policy"]
    assert '<label for="id_username">' in content
    assert '<label for="id_password">' in content


@pytest.mark.parametrize("path", ["/", "/rooms/lobby/"])
def test_pages_carry_a_csp_without_unsafe_inline(client, alice, path):
    make_room("lobby")
    policy = client.get(path)["Content-Security-Policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";") if part.strip())
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert "unsafe-inline" not in policy


def test_sign_out_refuses_get(client, alice):
    assert client.get("/logout/").status_code == 405
    assert client.get("/").status_code == 200  # still signed in


def test_sign_out_by_post_ends_the_session(client, alice):
    response = client.post("/logout/")
    assert response.status_code == 302
    assert response["Location"] == "/login/"
    assert client.get("/").status_code == 302


def test_pages_show_a_sign_out_form_that_posts(client, alice):
    content = client.get("/").content.decode()
    assert '<form method="post" action="/logout/"' in content
    assert 'name="csrfmiddlewaretoken"' in content


@pytest.mark.parametrize(
    ("seconds", "ms"),
    [(15.0, 15000), (2.5, 2500), (0.01, 1000), (0.0, 0), (-3.0, 0), (math.inf, 0), (math.nan, 0)],
)
def test_the_room_list_refreshes_every_second_or_more_or_never(
    alice, client, settings, seconds, ms
):
    settings.CHAT_UNREAD_REFRESH_SECONDS = seconds
    page = client.get("/")
    assert page.status_code == 200
    assert f'data-unread-refresh-ms="{ms}"' in page.content.decode()


@pytest.mark.parametrize(
    ("page_user", "status"),
    [(None, 200), ("bob", 200), ("alice", 401), ("%C3%A9lodie", 401), ("b%6Fb", 200)],
    ids=["no header", "the session's user", "another user", "another, encoded", "encoded"],
)
def test_an_api_request_from_a_page_opened_for_another_user_is_refused(client, page_user, status):
    """Signed out in another tab and in again as bob: alice's page must not act as bob."""
    client.force_login(make_user("bob"))
    headers = {} if page_user is None else {"HTTP_X_CHAT_USER": page_user}
    response = client.get("/api/rooms/", **headers)
    assert response.status_code == status
    if status == 401:
        assert response.json()["code"] == "user_changed"


def test_every_page_names_its_user_for_the_api_requests_it_makes(client):
    client.force_login(make_user("élodie"))
    page = client.get("/").content.decode()
    assert '<meta name="chat-user" content="élodie">' in page
