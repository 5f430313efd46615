"""chatproject/logging.py: no credential reaches a log line, whatever form it is written in."""

import json
import logging
import os
import subprocess
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


LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
# Loggers that follow DJANGO_LOG_LEVEL: the project's (chat.*, accounts.*, chatproject.*) and
# Django's.
FOLLOWING = ["chat.hub", "chat.server", "accounts.throttling", "chatproject", "django.request"]
# Each logger writes its probe at every level; stdout gets the loggers that hold a handler
# without the redaction filter.
_PROBE = """
import json, logging, django
django.setup()
from chatproject.logging import RedactSecretsFilter
for name in %r:
    for level in %r:
        logging.getLogger(name).log(logging.getLevelName(level), "probe ticket=s3cr3t-t1ck3t")
loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
print(json.dumps([
    logger.name
    for logger in loggers
    for handler in getattr(logger, "handlers", [])
    if not any(isinstance(f, RedactSecretsFilter) for f in handler.filters)
]))
"""


def django_setup(code: str, log_level: str) -> subprocess.CompletedProcess:
    """`code` run in a fresh interpreter with DJANGO_LOG_LEVEL set: settings are read once."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "chatproject.settings",
            "DJANGO_LOG_LEVEL": log_level,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("log_level", "following", "security", "daphne"),
    [
        ("DEBUG", "DEBUG", "DEBUG", "WARNING"),
        ("debug", "DEBUG", "DEBUG", "WARNING"),
        ("INFO", "INFO", "INFO", "WARNING"),
        ("WARNING", "WARNING", "WARNING", "WARNING"),
        ("WARN", "WARNING", "WARNING", "WARNING"),  # Python's alias, which worked before
        ("ERROR", "ERROR", "WARNING", "ERROR"),
    ],
)
def test_django_log_level_sets_the_project_s_and_django_s_loggers(
    log_level, following, security, daphne
):
    """The lowest level each logger writes; chat.security's warnings are written at any
    level, and daphne's INFO and DEBUG never. Every line is scrubbed."""
    names = [*FOLLOWING, "chat.security", "daphne.server"]
    result = django_setup(_PROBE % (names, LEVELS), log_level)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if " probe " in line]
    assert lines, result.stderr
    assert [line for line in lines if not line.endswith(" probe ticket=[redacted]")] == []
    written: dict[str, list[str]] = {name: [] for name in names}
    for line in lines:
        level, name = line.split(" probe ")[0].split()[-2:]
        written[name].append(level)
    lowest = {name: levels[0] if levels else None for name, levels in written.items()}
    assert lowest == {
        **dict.fromkeys(FOLLOWING, following),
        "chat.security": security,
        "daphne.server": daphne,
    }
    # Above its lowest level, a logger writes every level.
    assert all(levels == LEVELS[LEVELS.index(levels[0]) :] for levels in written.values())
    assert json.loads(result.stdout) == []


def test_an_unknown_django_log_level_is_refused_by_name():
    result = django_setup("import django; django.setup()", "verbose")
    assert result.returncode != 0
    assert "ImproperlyConfigured: DJANGO_LOG_LEVEL must be one of DEBUG, INFO" in result.stderr
