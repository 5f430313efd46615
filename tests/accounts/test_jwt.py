import threading

import pytest
from django.db import connection
from rest_framework.test import APIClient
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken, OutstandingToken
from rest_framework_simplejwt.tokens import BlacklistMixin, RefreshToken

from accounts.tokens import FAMILY_CLAIM
from chat.models import SecurityEvent
from tests.factories import PASSWORD, make_room, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def api():
    return APIClient()


def login(api, username="alice", password=PASSWORD, **extra):
    return api.post(
        "/api/auth/token/", {"username": username, "password": password}, format="json", **extra
    )


def test_login_returns_access_and_refresh_and_audits(api):
    user = make_user("alice")
    response = login(api)
    assert response.status_code == 200
    assert set(response.json()) == {"access", "refresh"}
    event = SecurityEvent.objects.get(event=SecurityEvent.Event.LOGIN_SUCCEEDED)
    assert event.actor_id == user.pk
    assert event.ip == "127.0.0.1"


def test_failed_login_is_401_and_audited_without_the_password(api):
    make_user("alice")
    response = login(api, password="wrong-password-123")
    assert response.status_code == 401
    event = SecurityEvent.objects.get(event=SecurityEvent.Event.LOGIN_FAILED)
    assert event.details == {"username": "alice"}
    assert "wrong-password-123" not in str(event.__dict__)


def test_inactive_user_cannot_log_in(api):
    make_user("alice", is_active=False)
    assert login(api).status_code == 401


def test_access_token_lifetime_comes_from_settings(api, settings):
    from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

    make_user("alice")
    tokens = login(api).json()
    access, refresh = AccessToken(tokens["access"]), RefreshToken(tokens["refresh"])
    # simplejwt dates the access token's expiry from the login (the refresh token's creation);
    # its own iat can be a second later, so exp - iat is not the lifetime in every run.
    lifetime = settings.SIMPLE_JWT["ACCESS_TOKEN_LIFETIME"].total_seconds()
    assert access["exp"] == refresh["iat"] + lifetime
    assert (
        refresh["exp"] - refresh["iat"]
        == settings.SIMPLE_JWT["REFRESH_TOKEN_LIFETIME"].total_seconds()
    )


@pytest.mark.parametrize("endpoint", ["login", "refresh"])
def test_token_answers_are_never_cached(api, endpoint):
    """Access and refresh tokens outlive a ticket (which is answered no-store): an answer
    carrying them must not be kept by any cache either (as RFC 6749 5.1 asks of token answers)."""
    make_user("alice")
    response = login(api)
    if endpoint == "refresh":
        refresh = response.json()["refresh"]
        response = api.post("/api/auth/token/refresh/", {"refresh": refresh}, format="json")
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"


def test_refresh_rotates_and_blacklists_the_old_token(api):
    make_user("alice")
    first = login(api).json()["refresh"]
    response = api.post("/api/auth/token/refresh/", {"refresh": first}, format="json")
    assert response.status_code == 200
    assert response.json()["refresh"] != first
    again = api.post("/api/auth/token/refresh/", {"refresh": first}, format="json")
    assert again.status_code == 401


@pytest.mark.django_db(transaction=True)
def test_a_refresh_token_presented_twice_at_once_rotates_once(monkeypatch):
    """Both requests pass the blacklist check before either writes its entry (the interleaving
    any two requests in flight can have): one rotates, the other is refused as a reuse, so the
    login does not fork into two that a logout would end only one of."""
    make_user("alice")
    first = login(APIClient()).json()["refresh"]
    both_checked = threading.Barrier(2, timeout=10)
    check = BlacklistMixin.check_blacklist

    def check_then_wait(self):
        check(self)
        both_checked.wait()

    monkeypatch.setattr(BlacklistMixin, "check_blacklist", check_then_wait)
    answers = []

    def refresh():
        try:
            api = APIClient(raise_request_exception=False)
            answers.append(api.post("/api/auth/token/refresh/", {"refresh": first}, format="json"))
        finally:
            connection.close()

    threads = [threading.Thread(target=refresh) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answer.status_code for answer in answers) == [200, 401]
    [refused] = [answer for answer in answers if answer.status_code == 401]
    assert refused.json()["code"] == "token_not_valid"


def test_a_refresh_token_of_a_login_that_ended_is_refused(api, monkeypatch):
    """Even one that was never blacklisted (a branch of a login forked before the fix above)."""
    from accounts import services

    make_user("alice")
    refresh = login(api).json()["refresh"]
    family = RefreshToken(refresh)[FAMILY_CLAIM]
    services.login_end(
        user=make_user("bob"), credential=services.credential_for_jwt(family), jwt=True
    )
    answer = api.post("/api/auth/token/refresh/", {"refresh": refresh}, format="json")
    assert (answer.status_code, answer.json()["detail"]) == (401, "This login has ended.")


def _refresh(api, token):
    return api.post("/api/auth/token/refresh/", {"refresh": token}, format="json")


@pytest.mark.parametrize(
    ("grace_passed", "login_ended"), [(True, True), (False, False)], ids=["reuse", "race"]
)
def test_a_refresh_token_reused_after_its_rotation_ends_the_login(
    api, monkeypatch, grace_passed, login_ended
):
    """A thief rotates alice's refresh token first; alice's own refresh then presents the old
    one. Past the grace of two requests racing (two tabs), that is two holders of one login:
    the login ends, the thief's newer tokens with it. Within the grace it is only refused."""
    from datetime import timedelta

    from accounts import services

    if grace_passed:
        monkeypatch.setattr(services, "REFRESH_REUSE_GRACE", timedelta(0))
    make_user("alice")
    stolen = login(api).json()["refresh"]
    login_id = f"jwt:{RefreshToken(stolen)[FAMILY_CLAIM]}"
    thief = _refresh(api, stolen).json()

    for _ in range(2):  # the second reuse writes no second row
        refused = _refresh(api, stolen)
        assert (refused.status_code, refused.json()["code"]) == (401, "token_not_valid")

    reused = SecurityEvent.objects.filter(event=SecurityEvent.Event.REFRESH_REUSED)
    assert list(reused.values_list("target_name", "details")) == (
        [("alice", {"method": "jwt", "credential": login_id})] if login_ended else []
    )
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {thief['access']}")
    assert api.get("/api/rooms/").status_code == (401 if login_ended else 200)
    api.credentials()
    answer = _refresh(api, thief["refresh"])
    if login_ended:
        assert (answer.status_code, answer.json()["detail"]) == (401, "This login has ended.")
    else:
        assert answer.status_code == 200


def test_logout_with_a_refresh_token_already_rotated_ends_the_login(api):
    """alice's token was rotated by a thief: her logout with it still ends the login, so the
    thief's newer refresh token is refused for as long as it would have lived."""
    make_user("alice")
    stolen = login(api).json()["refresh"]
    login_id = f"jwt:{RefreshToken(stolen)[FAMILY_CLAIM]}"
    thief = _refresh(api, stolen).json()

    assert api.post("/api/auth/logout/", {"refresh": stolen}, format="json").status_code == 200
    answer = _refresh(api, thief["refresh"])
    assert (answer.status_code, answer.json()["detail"]) == (401, "This login has ended.")
    logout = SecurityEvent.objects.get(event=SecurityEvent.Event.LOGOUT)
    assert logout.details == {"method": "jwt", "rotated_token": True, "credential": login_id}
    from accounts.models import EndedLogin

    ended = EndedLogin.objects.get()
    assert ended.expires_at - ended.ended_at >= RefreshToken.lifetime


def test_logout_blacklists_the_refresh_token(api):
    make_user("alice")
    refresh = login(api).json()["refresh"]
    assert api.post("/api/auth/logout/", {"refresh": refresh}, format="json").status_code == 200
    assert BlacklistedToken.objects.count() == 1
    assert (
        api.post("/api/auth/token/refresh/", {"refresh": refresh}, format="json").status_code == 401
    )
    assert SecurityEvent.objects.filter(event=SecurityEvent.Event.LOGOUT).count() == 1


def test_logout_with_garbage_is_401(api):
    assert api.post("/api/auth/logout/", {"refresh": "garbage"}, format="json").status_code == 401


def test_refresh_tokens_are_stored_as_digests_only(api):
    make_user("alice")
    tokens = login(api).json()
    api.post("/api/auth/token/refresh/", {"refresh": tokens["refresh"]}, format="json")
    stored = list(OutstandingToken.objects.values_list("token", flat=True))
    assert stored
    assert all(t.startswith("sha256:") for t in stored)
    assert tokens["refresh"] not in stored


def test_password_change_revokes_access_and_refresh_tokens(api):
    user = make_user("alice")
    make_room("lobby")
    tokens = login(api).json()
    user.set_password("a-brand-new-password-77")
    user.save()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")
    assert api.post("/api/tickets/", {"room": "lobby"}, format="json").status_code == 401
    api.credentials()
    assert (
        api.post(
            "/api/auth/token/refresh/", {"refresh": tokens["refresh"]}, format="json"
        ).status_code
        == 401
    )


@pytest.mark.parametrize("kind", ["refresh", "ticket"])
def test_only_access_tokens_are_bearer_tokens(api, kind):
    from tests.factories import make_ticket

    user = make_user("alice")
    room = make_room("lobby")
    token = login(api).json()["refresh"] if kind == "refresh" else make_ticket(user, room)
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    response = api.get("/api/rooms/")
    assert response.status_code == 401
    assert response.json()["code"] == "token_not_valid"


@pytest.mark.parametrize(
    ("throttle", "rate", "vary"),
    [
        # Same username from many IPs: the per-username throttle stops the guessing.
        ("LoginUsernameThrottle", "login_user", "ip"),
        # Many usernames from one IP: the per-IP throttle stops the spraying.
        ("LoginIPThrottle", "login_ip", "username"),
    ],
)
def test_login_is_throttled_with_retry_after(api, monkeypatch, throttle, rate, vary):
    from accounts import throttling

    cls = getattr(throttling, throttle)
    monkeypatch.setattr(cls, "THROTTLE_RATES", {**cls.THROTTLE_RATES, rate: "3/min"})
    responses = []
    for i in range(4):
        username = f"user{i}" if vary == "username" else "alice"
        ip = f"198.51.100.{i}" if vary == "ip" else "203.0.113.5"
        responses.append(login(api, username=username, password="wrong-1", REMOTE_ADDR=ip))
    assert [r.status_code for r in responses] == [401, 401, 401, 429]
    assert int(responses[-1]["Retry-After"]) > 0
    assert responses[-1].json()["code"] == "throttled"


@pytest.mark.parametrize("way", ["api", "page"])
def test_ways_of_writing_a_username_share_its_login_limit(api, monkeypatch, way):
    """Whitespace, compatibility forms and case reach the same account (DRF strips, the forms
    also NFKC-normalise), so they count against one limit: a guesser who pads the name gets no
    fresh counter. Each guess from an address of its own, and the right password last."""
    from django.test import Client

    from accounts import throttling

    make_user("alice")
    cls = throttling.LoginUsernameThrottle
    monkeypatch.setattr(cls, "THROTTLE_RATES", {**cls.THROTTLE_RATES, "login_user": "3/min"})
    guesses = [" alice", "alice\t", "\uff41lice", "ALICE "]  # \uff41: a fullwidth "a"
    statuses = []
    for i, username in enumerate(guesses):
        right = i == len(guesses) - 1
        form = {"username": username, "password": PASSWORD if right else "wrong-1"}
        ip = f"198.51.100.{i}"
        if way == "api":
            statuses.append(api.post("/api/auth/token/", form, format="json", REMOTE_ADDR=ip))
        else:
            statuses.append(Client().post("/login/", form, REMOTE_ADDR=ip))
    assert [r.status_code for r in statuses][-1] == 429
    assert [r.status_code for r in statuses][:3] == ([401] * 3 if way == "api" else [200] * 3)


def test_a_numeric_username_is_limited_too(api, monkeypatch):
    """DRF's CharField takes a JSON number as its string: 123 signs in as "123"."""
    from accounts import throttling

    make_user("123")
    cls = throttling.LoginUsernameThrottle
    monkeypatch.setattr(cls, "THROTTLE_RATES", {**cls.THROTTLE_RATES, "login_user": "2/min"})
    codes = [
        login(api, username=123, password="wrong-1", REMOTE_ADDR=f"198.51.100.{i}").status_code
        for i in range(2)
    ]
    assert codes == [401, 401]
    assert login(api, username=123, REMOTE_ADDR="198.51.100.9").status_code == 429


def test_a_login_is_audited_as_the_account_that_signed_in(api):
    """The username as sent (" alice ") is not the account's: the audit row names alice."""
    alice = make_user("alice")
    assert login(api, username=" alice ").status_code == 200
    row = SecurityEvent.objects.filter(event=SecurityEvent.Event.LOGIN_SUCCEEDED).get()
    assert (row.actor_id, row.actor_name, row.target_id) == (alice.pk, "alice", alice.pk)


@pytest.mark.parametrize("path", ["/login/", "/admin/login/"], ids=["page", "admin"])
@pytest.mark.parametrize(
    ("throttle", "rate", "vary"),
    [("LoginUsernameThrottle", "login_user", "ip"), ("LoginIPThrottle", "login_ip", "username")],
)
def test_form_logins_share_the_api_login_limits(monkeypatch, path, throttle, rate, vary):
    """/login/ and /admin/login/ are no way around the limits of /api/auth/token/."""
    from django.test import Client

    from accounts import throttling

    make_user("alice", is_staff=True)
    cls = getattr(throttling, throttle)
    monkeypatch.setattr(cls, "THROTTLE_RATES", {**cls.THROTTLE_RATES, rate: "3/min"})
    browser = Client()
    statuses = []
    for i in range(3):
        username = f"user{i}" if vary == "username" else "alice"
        ip = f"198.51.100.{i}" if vary == "ip" else "203.0.113.5"
        form = {"username": username, "password": "wrong-1"}
        statuses.append(browser.post(path, form, REMOTE_ADDR=ip).status_code)
    assert statuses == [200, 200, 200]  # the form again, with its error
    # The fourth attempt is refused before the password is checked, even the right one.
    if vary == "ip":
        right, ip = {"username": "alice", "password": PASSWORD}, "198.51.100.3"
    else:
        right = {"username": "alice", "password": PASSWORD}
    refused = browser.post(path, right, REMOTE_ADDR=ip)
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) > 0
    assert b"Too many sign-in attempts" in refused.content
    assert "_auth_user_id" not in browser.session
    assert browser.get(path).status_code == 200  # only POSTs count


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("delete", "user_not_found"),
        ("deactivate", "user_inactive"),
        ("password", "password_changed"),
    ],
)
def test_an_access_token_is_refused_once_its_user_changes_behind_our_signals(api, change, code):
    """simplejwt's own user checks still decide (accounts.authentication.UsersByKey reads the
    user). QuerySet.update() skips the signals that would also end the login, so nothing else
    refuses the token first; the code says which check did."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password

    from accounts.serializers import TokenObtainPairSerializer

    user = make_user("alice")
    make_room("lobby")
    access = TokenObtainPairSerializer.get_token(user).access_token
    if change == "delete":  # a user id that names no row: as if deleted
        access["user_id"] = str(user.pk + 1000)
    else:
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {access}")
        assert api.get("/api/rooms/").status_code == 200
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {access}")
    users = get_user_model().objects.filter(pk=user.pk)
    if change == "deactivate":
        users.update(is_active=False)
    elif change == "password":
        users.update(password=make_password("a-brand-new-password-77"))
    response = api.post("/api/tickets/", {"room": "lobby"}, format="json")
    assert response.status_code == 401
    assert response.json()["code"] == code


@pytest.mark.parametrize("claim", [None, "", "abc", "12x", [1]], ids=repr)
def test_a_signed_token_whose_user_id_names_no_key_is_a_401_not_a_500(api, claim):
    from accounts.serializers import TokenObtainPairSerializer

    user = make_user("alice")
    make_room("lobby")
    access = TokenObtainPairSerializer.get_token(user).access_token
    access["user_id"] = claim
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {access}")
    response = api.post("/api/tickets/", {"room": "lobby"}, format="json")
    assert response.status_code == 401
    assert response.json()["code"] == "token_not_valid"


@pytest.mark.parametrize("ended", [False, True])
def test_the_token_s_user_and_its_login_s_end_are_read_in_one_statement(
    api, ended, django_assert_num_queries
):
    """Every JWT request reads them: one statement (chat.sql.get_each), not one each."""
    from rest_framework.request import Request
    from rest_framework.test import APIRequestFactory
    from rest_framework_simplejwt.exceptions import InvalidToken

    from accounts.authentication import ChatJWTAuthentication
    from accounts.models import EndedLogin

    user = make_user("alice")
    tokens = login(api).json()
    if ended:
        api.post("/api/auth/logout/", {"refresh": tokens["refresh"]}, format="json")
        assert EndedLogin.objects.filter(user=user).count() == 1
    header = f"Bearer {tokens['access']}"
    request = Request(APIRequestFactory().get("/api/rooms/", HTTP_AUTHORIZATION=header))
    with django_assert_num_queries(1):
        if ended:
            with pytest.raises(InvalidToken, match="ended"):
                ChatJWTAuthentication().authenticate(request)
        else:
            found, _ = ChatJWTAuthentication().authenticate(request)
    if not ended:
        assert (found, found.is_active) == (user, True)
