"""Usernames: Django's characters, and none that a URL's path resolves away."""

import re

import pytest
from django.core.exceptions import ValidationError

from accounts.models import User
from tests.factories import PASSWORD, make_user

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("name", [".", ".."])
def test_a_username_that_is_a_dot_segment_is_refused(name):
    """/api/rooms/<slug>/members/../ is /api/rooms/<slug>/ to a browser, percent-encoded too."""
    with pytest.raises(ValidationError, match=re.escape('may not be "." or ".."')):
        User(username=name, password="x").full_clean()


@pytest.mark.parametrize("name", ["...", ".alice", "a..b", "alice.", "élodie", "a@b.c"])
def test_usernames_with_dots_are_still_fine(name):
    User(username=name, password="x").full_clean()


def test_the_admin_refuses_to_create_a_dot_segment_user(client):
    client.force_login(make_user("root", is_staff=True, is_superuser=True))
    form = {"username": "..", "password1": PASSWORD, "password2": PASSWORD}
    response = client.post("/admin/accounts/user/add/", {**form, "usable_password": "true"})
    assert response.status_code == 200  # the form again, with the error
    assert not User.objects.filter(username="..").exists()
    assert "may not be" in response.content.decode()
