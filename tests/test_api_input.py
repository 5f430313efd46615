"""Malformed requests to the REST API: each a 4xx in the API's error shape, never a 500.

What schemathesis (tests/test_api_fuzz.py) does not generate: JSON nested past the
interpreter's recursion limit, a lone surrogate where a choice is expected, paths the routes
refuse before any view runs.
"""

import pytest
from rest_framework.test import APIClient

from tests.asgi_http import call
from tests.factories import make_member, make_room, make_user

pytestmark = pytest.mark.django_db

# 2 KB of JSON: the json module raises RecursionError past about 1,000 levels.
DEEP = "[" * 1000 + "]" * 1000


def client_for(user=None) -> APIClient:
    api = APIClient(raise_request_exception=False)  # the 500 as a client would see it
    if user is not None:
        api.force_authenticate(user)
    return api


@pytest.fixture
def alice():
    alice, bob = make_user("alice"), make_user("bob")
    make_member(make_room("lobby", owner=alice), bob)
    return alice


@pytest.mark.parametrize(
    ("url", "signed_in"),
    [
        ("/api/auth/token/", False),
        ("/api/auth/token/refresh/", False),
        ("/api/auth/logout/", False),
        ("/api/rooms/", True),
        ("/api/tickets/", True),
        ("/api/rooms/lobby/messages/", True),
    ],
)
def test_json_nested_too_deeply_is_a_parse_error(alice, url, signed_in):
    api = client_for(alice if signed_in else None)
    response = api.post(url, data=DEEP, content_type="application/json")
    assert (response.status_code, response.json()["code"]) == (400, "parse_error")


@pytest.mark.django_db(transaction=True)
async def test_json_nested_too_deeply_is_a_parse_error_through_the_asgi_application():
    from chatproject.asgi import application

    sent = await call(
        application,
        "POST",
        "/api/auth/token/refresh/",
        DEEP.encode(),
        headers=[(b"content-type", b"application/json"), (b"content-length", b"2000")],
    )
    assert sent[0]["status"] == 400


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("post", "/api/rooms/", '{"slug": "new-room", "title": "t", "visibility": "\\ud800"}'),
        ("patch", "/api/rooms/lobby/", '{"visibility": "\\ud800"}'),
        ("post", "/api/rooms/lobby/members/", '{"username": "bob", "role": "\\ud800"}'),
        ("patch", "/api/rooms/lobby/members/bob/", '{"role": "\\ud800"}'),
    ],
)
def test_a_lone_surrogate_where_a_choice_is_expected_is_an_invalid_choice(alice, method, url, body):
    response = getattr(client_for(alice), method)(url, data=body, content_type="application/json")
    assert (response.status_code, response.json()["code"]) == (400, "invalid_choice")
    assert "\\ud800" in response.content.decode()  # quoted back, as JSON's escape


def test_answers_stay_utf8(alice):
    client_for(alice).post("/api/rooms/", {"slug": "cafe", "title": "Café ☕"}, format="json")
    response = client_for(alice).get("/api/rooms/cafe/")
    assert "Café ☕".encode() in response.content


@pytest.mark.parametrize(
    "url",
    [
        "/api/rooms/lobby/messages/9223372036854775808/",  # past the largest seq
        "/api/rooms/lobby/messages/-1/",
        "/api/rooms/lobby/members/a%20b/",
        "/api/rooms/No_Such!/",
        "/api/nothing-here/",
    ],
)
def test_a_path_the_api_routes_refuse_is_a_404_in_the_api_s_error_shape(alice, url):
    response = client_for(alice).delete(url)
    assert (response.status_code, response["Content-Type"]) == (404, "application/json")
    assert response.json() == {"detail": "Not found.", "code": "not_found"}


def test_a_page_that_does_not_exist_is_still_an_html_404(client):
    response = client.get("/no-such-page/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")
