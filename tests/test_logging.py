"""chatproject/logging.py: no credential reaches a log line, whatever form it is written in."""

import logging
import sys

import pytest

from chatproject.logging import RedactSecretsFilter

PASSPHRASE = "correct horse battery staple"  # the kind of password the validators encourage
PUNCTUATED = "tr0ub&dor,3}zq"


def logged(message: str, *args) -> str:
    """The line a redacting handler writes for `logger.exception(message, *args)` called while
    handling an error whose text is the same message."""
    try:
        raise ValueError(message % args)
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("tests", logging.ERROR, __file__, 1, message, args, exc_info)
    assert RedactSecretsFilter().filter(record)
    return logging.Formatter().format(record)


@pytest.mark.parametrize(
    ("args", "secrets"),
    [
        ({"username": "alice", "password": PASSPHRASE}, ["horse", "staple"]),
        ('{"username": "alice", "password": "' + PASSPHRASE + '"}', ["horse", "staple"]),
        (
            {"username": "alice", "old_password": PUNCTUATED, "new_password1": PUNCTUATED},
            ["dor,3", "zq"],
        ),
        (
            {"username": "alice", "sessionid": "s3ss10nk3yv4lu3", "csrftoken": "csrfv4lu3"},
            ["s3ss10n", "csrfv4"],
        ),
    ],
    ids=["passphrase-in-a-repr", "passphrase-in-json", "punctuation", "cookies-in-a-repr"],
)
def test_a_credential_in_a_record_and_its_traceback_is_scrubbed_whole(args, secrets):
    line = logged("request data: %r", args)
    assert "alice" in line  # the rest of the record is kept
    assert [s for s in secrets if s in line] == [], line
