"""Our security system checks, the documented production environment, and production headers."""

import os
import re
import secrets
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from channels.routing import ProtocolTypeRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.conf import settings
from django.core.checks import registry
from django.test import override_settings

from accounts.middleware import StrictOriginMiddleware, TicketAuthMiddleware
from chat import checks
from chat.consumers import RoomConsumer
from chatproject.asgi import application
from tests import envdoc
from tests.asgi_http import call
from tests.factories import PASSWORD, make_user

ROOT = Path(__file__).resolve().parent.parent

# --- the documented production environment -------------------------------------------------------


def documented_production_env() -> dict[str, str]:
    """deploy/env.example, the documented production environment, its empty keys filled in."""
    env = {}
    for line in (ROOT / "deploy" / "env.example").read_text().splitlines():
        if re.match(r"[A-Z][A-Z0-9_]*=", line):
            name, value = line.split("=", 1)
            env[name] = value
    keys = ["DJANGO_SECRET_KEY", "CHAT_AUDIT_HMAC_KEY", "JWT_SIGNING_KEY"]
    assert [name for name in keys if env.get(name) == ""] == keys, "keys must be placeholders"
    env.update({name: secrets.token_urlsafe(50) for name in keys})
    return env


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # Only PATH from this process: the test run's own DJANGO_* variables must not leak in.
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_env_example_documents_every_setting_with_its_real_default():
    settings_py = (ROOT / "chatproject" / "settings.py").read_text()
    example = (ROOT / "deploy" / "env.example").read_text()
    assert envdoc.problems(settings_py, example) == []
    assert "CHAT_SLOW_CLIENT_TIMEOUT" in envdoc.settings_defaults(settings_py)


SETTINGS_SNIPPET = """
RATE = env.float("CHAT_RATE", default=5.0)
SIZE = env.int("CHAT_SIZE", default=64 * 1024)
SPEED = env.str("CHAT_SPEED", default="60/min")
ON = env.bool("CHAT_ON", default=True)
URL = env.str("REDIS_URL", default="")
"""
DOCUMENTED = "#CHAT_RATE=5\n#CHAT_SIZE=65536\n#CHAT_SPEED=60/min\n#CHAT_ON=1\nREDIS_URL=redis://x\n"


@pytest.mark.parametrize(
    ("example", "problem"),
    [
        pytest.param(
            DOCUMENTED.replace("#CHAT_ON=1\n", ""), "undocumented: ['CHAT_ON']", id="missing"
        ),
        pytest.param(
            DOCUMENTED + "#CHAT_GONE=1\n", "not read by settings.py: ['CHAT_GONE']", id="stale"
        ),
        pytest.param(
            DOCUMENTED.replace("CHAT_SIZE=65536", "CHAT_SIZE=6553"),
            "#CHAT_SIZE=6553 but settings.py defaults to 65536",
            id="wrong-number",
        ),
        pytest.param(
            DOCUMENTED.replace("60/min", "6/min"),
            "#CHAT_SPEED=6/min but settings.py defaults to '60/min'",
            id="wrong-string",
        ),
        pytest.param(
            DOCUMENTED.replace("#CHAT_ON=1", "#CHAT_ON=0"),
            "#CHAT_ON=0 but settings.py defaults to True",
            id="wrong-bool",
        ),
    ],
)
def test_env_example_check_catches_drift(example, problem):
    assert envdoc.problems(SETTINGS_SNIPPET, DOCUMENTED) == []
    assert envdoc.problems(SETTINGS_SNIPPET, example) == [problem]


def test_documented_production_env_passes_deploy_checks():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=documented_production_env())
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_listed_hosts_may_be_separated_by_a_comma_and_a_space():
    # "a, b" is how people write lists: the second host must not be " b", which matches no
    # request (400 for every request to it), nor the second CSRF origin " https://b".
    env = {
        **documented_production_env(),
        "DJANGO_ALLOWED_HOSTS": "chat.example.com, www.example.com",
        "DJANGO_CSRF_TRUSTED_ORIGINS": "https://chat.example.com, https://www.example.com",
    }
    code = "from django.conf import settings as s; print(s.ALLOWED_HOSTS, s.CSRF_TRUSTED_ORIGINS)"
    result = manage("shell", "-v", "0", "-c", code, env=env)
    assert result.returncode == 0, result.stderr
    hosts = ["chat.example.com", "www.example.com", "127.0.0.1", "localhost", "[::1]"]
    origins = ["https://chat.example.com", "https://www.example.com"]
    assert result.stdout.strip() == f"{hosts} {origins}"


def test_deploy_checks_fail_on_in_memory_layer_in_production():
    env = documented_production_env()
    del env["REDIS_URL"]
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode == 1
    assert "chat.W001" in result.stderr


def test_plain_checks_allow_in_memory_layer_in_production(tmp_path):
    """`manage.py serve` runs these: DEBUG off on the embedded default must still start."""
    env = documented_production_env()
    del env["REDIS_URL"], env["DATABASE_URL"]
    env["CHAT_DATA_DIR"] = str(tmp_path)
    result = manage("check", "--fail-level", "WARNING", env=env)
    assert result.returncode == 0, result.stderr


def test_channel_layer_check_is_registered_for_deploy_only():
    plain = registry.registry.get_checks(include_deployment_checks=False)
    deploy = registry.registry.get_checks(include_deployment_checks=True)
    assert set(checks.CHECKS) <= set(plain)
    assert checks.check_channel_layer not in plain
    assert checks.check_channel_layer in deploy


# --- each check fires on its bad configuration ---------------------------------------------------

# Applications that lack part of the WebSocket guard, for chat.E001.
APP_WITHOUT_ORIGIN_CHECK = ProtocolTypeRouter(
    {"websocket": TicketAuthMiddleware(RoomConsumer.as_asgi())}
)
# channels' own validator ignores scheme and port: not the strict check.
APP_WITH_HOST_ORIGIN_VALIDATOR = ProtocolTypeRouter(
    {"websocket": AllowedHostsOriginValidator(TicketAuthMiddleware(RoomConsumer.as_asgi()))}
)
APP_WITHOUT_TICKET_AUTH = ProtocolTypeRouter(
    {"websocket": StrictOriginMiddleware(RoomConsumer.as_asgi())}
)
# The HTTP side alone: not a router at all.
HTTP_ONLY = application.application_mapping["http"]
APP_WITHOUT_WEBSOCKET = ProtocolTypeRouter({"http": HTTP_ONLY})

SECRET = "production-secret-key-" + "s" * 50


def production_settings(**changes):
    """A production configuration every check accepts, with `changes` on top."""
    values = {
        "DEBUG": False,
        "ASGI_APPLICATION": "chatproject.asgi.application",
        "ALLOWED_HOSTS": ["chat.example.com"],
        "CHAT_ALLOWED_ORIGINS": ["https://chat.example.com"],
        "CHAT_TRUSTED_PROXIES": ["127.0.0.1", "10.0.0.0/8"],
        "SECURE_PROXY_SSL_HEADER": ("HTTP_X_FORWARDED_PROTO", "https"),
        "USE_X_FORWARDED_HOST": False,
        "USE_X_FORWARDED_PORT": False,
        "CHAT_MAX_FRAME_BYTES": 64 * 1024,
        "CHAT_MAX_MESSAGE_LENGTH": 4000,
        "SECRET_KEY": SECRET,
        "CHAT_AUDIT_HMAC_KEY": "production-audit-key-" + "a" * 40,
        "SIMPLE_JWT": {**settings.SIMPLE_JWT, "SIGNING_KEY": "production-jwt-key-" + "j" * 40},
        "CHANNEL_LAYERS": {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer"}},
    }
    values.update(changes)
    return override_settings(**values)


def run_all_checks() -> list[str]:
    return [m.id for check in checks.CHECKS + checks.DEPLOY_CHECKS for m in check()]


def test_production_settings_pass_every_check():
    with production_settings():
        assert run_all_checks() == []


def _jwt_key(key: str) -> dict:
    return {**settings.SIMPLE_JWT, "SIGNING_KEY": key}


def _throttle_rate(scope: str, rate: str) -> dict:
    rates = {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], scope: rate}
    return {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}


BAD_CONFIGURATIONS = [
    pytest.param(
        "chat.E001",
        {"ASGI_APPLICATION": "tests.test_security_checks.APP_WITHOUT_ORIGIN_CHECK"},
        id="no-origin-check",
    ),
    pytest.param(
        "chat.E001",
        {"ASGI_APPLICATION": "tests.test_security_checks.APP_WITH_HOST_ORIGIN_VALIDATOR"},
        id="channels-host-validator",
    ),
    pytest.param(
        "chat.E001",
        {"ASGI_APPLICATION": "tests.test_security_checks.APP_WITHOUT_TICKET_AUTH"},
        id="no-ticket-auth",
    ),
    pytest.param(
        "chat.E001",
        {"ASGI_APPLICATION": "tests.test_security_checks.APP_WITHOUT_WEBSOCKET"},
        id="no-websocket-route",
    ),
    pytest.param(
        "chat.E001", {"ASGI_APPLICATION": "tests.test_security_checks.HTTP_ONLY"}, id="not-a-router"
    ),
    pytest.param("chat.E002", {"ALLOWED_HOSTS": ["*"]}, id="hosts-star"),
    pytest.param("chat.E002", {"ALLOWED_HOSTS": [".example.com"]}, id="hosts-leading-dot"),
    pytest.param(
        "chat.E002",
        {"ALLOWED_HOSTS": ["chat.example.com", "*.example.com"]},
        id="hosts-star-subdomain",
    ),
    pytest.param("chat.E004", {"CHAT_ALLOWED_ORIGINS": []}, id="origins-empty"),
    pytest.param("chat.E004", {"CHAT_ALLOWED_ORIGINS": ["*"]}, id="origins-star"),
    pytest.param(
        "chat.E004",
        {"CHAT_ALLOWED_ORIGINS": ["https://*.example.com"]},
        id="origins-star-subdomain",
    ),
    pytest.param(
        "chat.E004", {"CHAT_ALLOWED_ORIGINS": ["https://.example.com"]}, id="origins-leading-dot"
    ),
    pytest.param(
        "chat.E004", {"CHAT_ALLOWED_ORIGINS": ["chat.example.com"]}, id="origins-no-scheme"
    ),
    pytest.param(
        "chat.E004", {"CHAT_ALLOWED_ORIGINS": ["https://chat.example.com/chat"]}, id="origins-path"
    ),
    pytest.param("chat.E004", {"CHAT_ALLOWED_ORIGINS": ["null"]}, id="origins-null"),
    # Browsers send an internationalised name as punycode (https://xn--bcher-kva.example):
    # written in Unicode, the entry matched no browser's Origin and refused every socket.
    pytest.param(
        "chat.E004", {"CHAT_ALLOWED_ORIGINS": ["https://bücher.example"]}, id="origins-unicode"
    ),
    pytest.param(
        "chat.E004",
        {"CHAT_ALLOWED_ORIGINS": ["https://chat.example.com", "ftp://chat.example.com"]},
        id="origins-ftp",
    ),
    pytest.param("chat.E005", {"CHAT_MAX_FRAME_BYTES": 0}, id="frame-zero"),
    pytest.param("chat.E005", {"CHAT_MAX_FRAME_BYTES": -1}, id="frame-negative"),
    pytest.param("chat.E005", {"CHAT_MAX_FRAME_BYTES": 16 * 1024 * 1024 + 1}, id="frame-huge"),
    pytest.param("chat.E008", {"CHAT_MAX_MESSAGE_LENGTH": 0}, id="length-zero"),
    pytest.param("chat.E008", {"CHAT_MAX_MESSAGE_LENGTH": -4000}, id="length-negative"),
    pytest.param("chat.E013", {"CHAT_READ_RATE": 0.0}, id="read-rate-zero"),
    pytest.param("chat.E013", {"CHAT_READ_BURST": 0}, id="read-burst-zero"),
    pytest.param("chat.E013", {"CHAT_MESSAGE_RATE": -5.0}, id="message-rate-negative"),
    pytest.param("chat.E013", {"CHAT_MESSAGE_BURST": 0}, id="message-burst-zero"),
    pytest.param("chat.E014", {"CHAT_HEARTBEAT": 0.0}, id="heartbeat-zero"),
    pytest.param("chat.E014", {"CHAT_HEARTBEAT": float("nan")}, id="heartbeat-nan"),
    pytest.param("chat.E014", {"CHAT_PRESENCE_LEASE": 59.9}, id="lease-under-two-heartbeats"),
    pytest.param(
        "chat.E014",
        {"CHAT_HEARTBEAT": 1.0, "CHAT_PRESENCE_LEASE": float("nan")},
        id="lease-nan",
    ),
    *(
        pytest.param("chat.E015", {"REST_FRAMEWORK": _throttle_rate("login_ip", rate)}, id=name)
        for name, rate in [
            ("rate-in-words", "20 per minute"),
            ("rate-no-period", "20"),
            ("rate-unknown-period", "20/week"),
            ("rate-not-a-number", "twenty/min"),
            ("rate-negative", "-1/min"),
            ("rate-empty", ""),
        ]
    ),
    *(
        pytest.param("chat.E016", {name: value}, id=f"{name.lower()}-{value}")
        for name, value in [
            ("CHAT_TICKET_LIFETIME", timedelta(0)),
            ("CHAT_MAX_SOCKETS_PER_USER", 0),
            ("CHAT_HISTORY_LIMIT", -1),
            ("CHAT_PING_INTERVAL", 0),
            ("CHAT_SECURITY_ALERT_WINDOW", 0),
            ("CHAT_AUTH_TIMEOUT", float("inf")),
            ("CHAT_ABUSE_WINDOW", float("nan")),
            ("CHAT_SLOW_CLIENT_MAX_BYTES", True),
        ]
    ),
    pytest.param("chat.E006", {"CHAT_TRUSTED_PROXIES": []}, id="ssl-header-no-proxies"),
    pytest.param(
        "chat.E006",
        {"CHAT_TRUSTED_PROXIES": [], "SECURE_PROXY_SSL_HEADER": None, "USE_X_FORWARDED_HOST": True},
        id="forwarded-host-no-proxies",
    ),
    pytest.param(
        "chat.E006",
        {"CHAT_TRUSTED_PROXIES": [], "SECURE_PROXY_SSL_HEADER": None, "USE_X_FORWARDED_PORT": True},
        id="forwarded-port-no-proxies",
    ),
    pytest.param("chat.E007", {"CHAT_TRUSTED_PROXIES": ["proxy.internal"]}, id="proxy-hostname"),
    pytest.param("chat.E007", {"CHAT_TRUSTED_PROXIES": ["10.0.0.0/33"]}, id="proxy-bad-prefix"),
    pytest.param("chat.E007", {"CHAT_TRUSTED_PROXIES": ["127.0.0.1", "*"]}, id="proxy-star"),
    pytest.param("chat.W002", {"CHAT_TRUSTED_PROXIES": ["0.0.0.0/0"]}, id="proxy-all-ipv4"),
    pytest.param("chat.W002", {"CHAT_TRUSTED_PROXIES": ["127.0.0.1", "::/0"]}, id="proxy-all-ipv6"),
    pytest.param(
        "chat.W002", {"CHAT_TRUSTED_PROXIES": ["::ffff:0:0/96"]}, id="proxy-all-ipv4-mapped"
    ),
    pytest.param("chat.E009", {"CHAT_AUDIT_HMAC_KEY": SECRET}, id="audit-key-is-secret-key"),
    pytest.param("chat.E010", {"CHAT_AUDIT_HMAC_KEY": "a" * 31}, id="audit-key-short"),
    pytest.param("chat.E011", {"SIMPLE_JWT": _jwt_key("j" * 31)}, id="jwt-key-short"),
    pytest.param("chat.E011", {"SIMPLE_JWT": _jwt_key("")}, id="jwt-key-empty"),
    pytest.param("chat.W003", {"SIMPLE_JWT": _jwt_key(SECRET)}, id="jwt-key-is-secret-key"),
    pytest.param(
        "chat.W004",
        {"CHAT_ALLOWED_ORIGINS": ["https://chat.example.com", "http://chat.example.com"]},
        id="plain-http-origin",
    ),
    pytest.param(
        "chat.E012",
        {"MIDDLEWARE": [m for m in settings.MIDDLEWARE if "UntrustedProxy" not in m]},
        id="proxy-header-middleware-missing",
    ),
    pytest.param(
        "chat.E012",
        {"MIDDLEWARE": [*settings.MIDDLEWARE[1:], settings.MIDDLEWARE[0]]},
        id="proxy-header-middleware-not-first",
    ),
    pytest.param(
        "chat.W001",
        {"CHANNEL_LAYERS": {"default": {"BACKEND": checks.IN_MEMORY_LAYER}}},
        id="in-memory-layer",
    ),
    pytest.param(
        "chat.W001",
        {"CHANNEL_LAYERS": {"default": {"BACKEND": "chat.layers.InMemoryChannelLayer"}}},
        id="in-memory-layer-of-the-embedded-default",
    ),
]


@pytest.mark.parametrize(("check_id", "changes"), BAD_CONFIGURATIONS)
def test_check_fires_on_bad_configuration(check_id, changes):
    with production_settings(**changes):
        assert run_all_checks() == [check_id]


@pytest.mark.parametrize(
    "changes",
    [
        {"ALLOWED_HOSTS": ["*"]},
        {"CHAT_ALLOWED_ORIGINS": []},
        {"CHAT_ALLOWED_ORIGINS": ["https://*.example.com"]},
        {"CHAT_AUDIT_HMAC_KEY": SECRET},
        {"CHAT_AUDIT_HMAC_KEY": "short"},
        {"SIMPLE_JWT": _jwt_key("short")},
        {"SIMPLE_JWT": _jwt_key(SECRET)},
        {"CHAT_ALLOWED_ORIGINS": ["http://chat.example.com"]},
        {"CHANNEL_LAYERS": {"default": {"BACKEND": checks.IN_MEMORY_LAYER}}},
    ],
)
def test_production_only_checks_are_silent_in_development(changes):
    with production_settings(DEBUG=True, **changes):
        assert run_all_checks() == []


@pytest.mark.parametrize("installed", ["4.2.1", "4.1.2", "4.0.0", "3.0.2"])
def test_daphne_check_fires_below_the_floor(monkeypatch, installed):
    monkeypatch.setattr(checks, "version", lambda name: installed)
    with production_settings():
        assert run_all_checks() == ["chat.E003"]


@pytest.mark.parametrize("installed", ["4.2.2", "4.2.3", "4.10.0", "5.0"])
def test_daphne_check_accepts_the_floor_and_later(monkeypatch, installed):
    monkeypatch.setattr(checks, "version", lambda name: installed)
    with production_settings():
        assert run_all_checks() == []


# --- production response headers ----------------------------------------------------------------


def production_http():
    """What DJANGO_HTTPS=1 (the production default) turns on in chatproject/settings.py."""
    return override_settings(
        SECURE_SSL_REDIRECT=True,
        SESSION_COOKIE_SECURE=True,
        CSRF_COOKIE_SECURE=True,
        SECURE_HSTS_SECONDS=31536000,
        SECURE_HSTS_INCLUDE_SUBDOMAINS=True,
        SECURE_HSTS_PRELOAD=True,
    )


def csp_directives(header: str) -> dict[str, list[str]]:
    directives = {}
    for part in header.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


def test_production_redirects_http_to_https(client):
    with production_http():
        response = client.get("/login/?next=/")
    assert response.status_code == 301
    assert response["Location"] == "https://testserver/login/?next=/"


def test_processes_can_be_scraped_and_health_checked_on_loopback_in_production():
    """docs/deploy.md: Prometheus scrapes 127.0.0.1:8001/metrics directly, over plain http."""
    script = (
        "from django.test import Client\n"
        "for host in ('127.0.0.1:8001', '[::1]:8002', 'localhost:8001', 'evil.example'):\n"
        "    print(host, Client().get('/metrics', HTTP_HOST=host).status_code)\n"
        "print('page', Client().get('/login/', HTTP_HOST='127.0.0.1:8001').status_code)\n"
    )
    result = manage("shell", "--verbosity", "0", "-c", script, env=documented_production_env())
    assert result.returncode == 0, result.stderr
    status = dict(line.split() for line in result.stdout.splitlines())
    assert status == {
        "127.0.0.1:8001": "200",
        "[::1]:8002": "200",
        "localhost:8001": "200",
        "evil.example": "400",  # not an allowed host
        "page": "301",  # everything else still goes to https
    }


def test_production_pages_send_security_headers(client):
    with production_http():
        response = client.get("/login/", secure=True)
    assert response.status_code == 200
    assert response["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["Cross-Origin-Opener-Policy"] == "same-origin"
    policy = csp_directives(response["Content-Security-Policy"])
    assert policy["script-src"] == ["'self'"]
    assert "'unsafe-inline'" not in policy["style-src"]
    assert policy["object-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"]


@pytest.mark.parametrize("path", ["/static/chat/api.js", "/static/no-such-file.js"])
async def test_production_static_files_are_https_only_with_the_security_headers(path):
    """Served by the app itself when no proxy is in front (docs/deploy.md, TLS at daphne):
    Django's static handler skips every middleware, so a file went out over plain http, and
    without HSTS or nosniff over https."""
    with production_http():
        plain = await call(application, "GET", path)
        secure = await call(application, "GET", path, scheme="https")
    assert plain[0]["status"] == 301
    assert dict(plain[0]["headers"])[b"Location"] == f"https://testserver{path}".encode()
    headers = {name.lower(): value for name, value in secure[0]["headers"]}
    assert secure[0]["status"] == (200 if "chat" in path else 404)
    assert headers[b"strict-transport-security"].startswith(b"max-age=31536000")
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"referrer-policy"] == b"same-origin"


@pytest.mark.django_db
def test_production_login_sets_secure_httponly_samesite_session_cookie(client):
    make_user("alice")
    with production_http():
        response = client.post("/login/", {"username": "alice", "password": PASSWORD}, secure=True)
    assert response.status_code == 302
    session = response.cookies["sessionid"]
    assert session.value
    assert session["secure"] is True
    assert session["httponly"] is True
    assert session["samesite"] == "Lax"
    assert response.cookies["csrftoken"]["secure"] is True
