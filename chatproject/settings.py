"""Settings for the chat project, read from the environment with safe development defaults."""

import os
import socket
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# A developer's .env (written by `make setup`) fills in what the real environment leaves unset.
if (BASE_DIR / ".env").is_file():
    env.read_env(BASE_DIR / ".env", overwrite=False)


def _stripped(values: list[str]) -> list[str]:
    """A comma-separated list as people write it: "a, b" is ["a", "b"] (env.list keeps " b")."""
    return [value.strip() for value in values if value.strip()]


# ---------------------------------------------------------------------------------------------
# Core
# ---------------------------------------------------------------------------------------------

# Off unless asked for: a forgotten variable must fail safe, never serve debug pages.
DEBUG = env.bool("DJANGO_DEBUG", default=False)

SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. Production (DJANGO_DEBUG off) refuses to start without "
            "a secret key: generate one with `python -c 'import secrets; "
            "print(secrets.token_urlsafe(50))'`, or set DJANGO_DEBUG=1 for local development."
        )
    SECRET_KEY = "django-insecure-development-only-key-never-use-in-production"  # noqa: S105

_LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ALLOWED_HOSTS = _stripped(
    env.list("DJANGO_ALLOWED_HOSTS", default=_LOOPBACK_HOSTS if DEBUG else [])
)
# Each daphne process is scraped (/metrics) and health-checked (/healthz) on its own loopback
# port, not through the proxy: those requests name the loopback address. Absolute URLs built
# from a loopback Host point nowhere an attacker could use.
ALLOWED_HOSTS += [host for host in _LOOPBACK_HOSTS if host not in ALLOWED_HOSTS]

# ---------------------------------------------------------------------------------------------
# Applications
# ---------------------------------------------------------------------------------------------

INSTALLED_APPS = [
    # daphne first so that `runserver` is the ASGI server and Twisted's reactor is set up early.
    "daphne",
    "chatproject.apps.ChatAdminConfig",  # django.contrib.admin with the OTP-aware site
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "rest_framework_simplejwt",
    "rest_framework_simplejwt.token_blacklist",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_otp.plugins.otp_static",
    "csp",
    "accounts",
    "chat",
]

MIDDLEWARE = [
    # First: what later middleware believes about scheme and host must come from a trusted proxy.
    "chatproject.middleware.UntrustedProxyHeadersMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
]

ROOT_URLCONF = "chatproject.urls"
ASGI_APPLICATION = "chatproject.asgi.application"
WSGI_APPLICATION = None  # ASGI only: WebSockets need it, and one server keeps deployments simple.

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "csp.context_processors.nonce",
            ],
        },
    },
]

# ---------------------------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------------------------

DATA_DIR = Path(env.str("CHAT_DATA_DIR", default=str(BASE_DIR / "var")))

DATABASES = {"default": env.db_url("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["OPTIONS"] = {
        # WAL lets readers run beside the single writer; IMMEDIATE takes the write lock at BEGIN
        # so two writers queue on the busy timeout instead of failing with "database is locked".
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A file, not memory: end-to-end tests run daphne in another process on this database.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / f"test-db-{os.getpid()}.sqlite3")}
else:
    # One test database per test process, so concurrent test runs never share one.
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Django's backend with its health check made once per idle spell (chatproject/postgresql).
    DATABASES["default"]["ENGINE"] = "chatproject.postgresql"
    # libpq waits for an unreachable server as long as the OS does: a health probe or request
    # stuck on connecting would hold its thread for minutes.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", env.int("DATABASE_CONNECT_TIMEOUT", default=5)
    )
# Persistent connections, on every engine: a new connection per database_sync_to_async call
# costs more than the query (and closing SQLite's last connection checkpoints the WAL, with an
# fsync). Health checks drop connections the server closed meanwhile.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=600)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# PostgreSQL: a connection used this recently, and left open, is not checked again.
DATABASE_HEALTH_CHECK_IDLE = env.float("DATABASE_HEALTH_CHECK_IDLE", default=1.0)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# ---------------------------------------------------------------------------------------------
# Redis: cache, channel layer and the shared limits/presence state
# ---------------------------------------------------------------------------------------------

REDIS_URL = env.str("REDIS_URL", default="")
# redis-py's default pool (100) raises "Too many connections" under connection bursts, which
# surfaces as HTTP 500 on the ticket endpoint; size it explicitly.
REDIS_MAX_CONNECTIONS = env.int("REDIS_MAX_CONNECTIONS", default=500)
# Separates deployments (and test runs) that share one Redis server.
CHAT_REDIS_PREFIX = env.str("CHAT_REDIS_PREFIX", default="chat")

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": f"{CHAT_REDIS_PREFIX}:cache",
            "OPTIONS": {"max_connections": REDIS_MAX_CONNECTIONS},
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "chat.layers.RedisChannelLayer",
            "CONFIG": {
                # socket_timeout above channels_redis's 5 s blocking pop: redis-py's default
                # equals it, so an idle receive times out and looks like a lost Redis.
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "max_connections": REDIS_MAX_CONNECTIONS,
                        "socket_timeout": 15,
                        "socket_connect_timeout": 5,
                    }
                ],
                "prefix": f"{CHAT_REDIS_PREFIX}:asgi",
                # Only one channel per process receives room traffic (the hub, see chat/hub.py),
                # so its queue is sized for a busy process, not for one socket.
                "capacity": 1000,
                "channel_capacity": {"chathub.*": 20000},
                # A room event older than this is useless live: clients resume from history.
                "expiry": 30,
                # Hubs re-join their groups every CHAT_HUB_REFRESH seconds, well inside this.
                "group_expiry": 86400,
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {
        "default": {
            # Channels' in-memory layer, its expiry sweep amortised (chat/layers.py).
            "BACKEND": "chat.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": 20000, "expiry": 30},
        }
    }

# ---------------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------------

AUTH_USER_MODEL = "accounts.User"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "rooms"
LOGOUT_REDIRECT_URL = "login"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

REST_FRAMEWORK = {
    # JWT first: its WWW-Authenticate header is what turns "not authenticated" into a 401.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.ChatJWTAuthentication",  # refuses logged-out logins
        "accounts.authentication.ChatSessionAuthentication",  # refuses another user's page
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["chatproject.rest.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "chatproject.rest.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Every API view not limited otherwise; see accounts/throttling.py.
    "DEFAULT_THROTTLE_CLASSES": ["accounts.throttling.ApiThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "api": env.str("CHAT_API_RATE", default="600/min"),
        "rest_messages": env.str("CHAT_API_MESSAGE_RATE", default="60/min"),
        "room_create": env.str("CHAT_ROOM_CREATE_RATE", default="20/hour"),
        "tickets": env.str("CHAT_TICKET_RATE", default="60/min"),
        "login_ip": env.str("CHAT_LOGIN_RATE_PER_IP", default="20/min"),
        "login_user": env.str("CHAT_LOGIN_RATE_PER_USERNAME", default="10/min"),
    },
    "EXCEPTION_HANDLER": "accounts.api.exception_handler",
}

SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(seconds=env.int("JWT_ACCESS_LIFETIME", default=300)),
    "REFRESH_TOKEN_LIFETIME": timedelta(seconds=env.int("JWT_REFRESH_LIFETIME", default=86400)),
    "ROTATE_REFRESH_TOKENS": True,
    "BLACKLIST_AFTER_ROTATION": True,
    "UPDATE_LAST_LOGIN": True,
    "ALGORITHM": "HS256",
    "SIGNING_KEY": env.str("JWT_SIGNING_KEY", default=SECRET_KEY),
    "LEEWAY": 0,
    "AUTH_HEADER_TYPES": ("Bearer",),
    "TOKEN_OBTAIN_SERIALIZER": "accounts.serializers.TokenObtainPairSerializer",
    "TOKEN_REFRESH_SERIALIZER": "accounts.serializers.TokenRefreshSerializer",
    # Access tokens carry a hash of the password hash: a password change revokes them at once.
    "CHECK_REVOKE_TOKEN": True,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Secure chat API",
    "DESCRIPTION": "REST API of the chat. The WebSocket protocol is described in docs/protocol.md.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI from our own static files (no CDN), started by a script file, not inline code,
    # so the docs page works under the strict Content-Security-Policy.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
}

# ---------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------

# Exact scheme://host[:port] origins allowed to open WebSockets. No wildcards, ever.
CHAT_ALLOWED_ORIGINS = _stripped(
    env.list(
        "CHAT_ALLOWED_ORIGINS",
        default=["http://127.0.0.1:8000", "http://localhost:8000"] if DEBUG else [],
    )
)
# Reverse proxies (IPs or CIDRs) whose X-Forwarded-For entries we believe. Empty: the socket peer.
CHAT_TRUSTED_PROXIES = _stripped(env.list("CHAT_TRUSTED_PROXIES", default=[]))

CHAT_TICKET_LIFETIME = timedelta(seconds=env.int("CHAT_TICKET_LIFETIME", default=30))
CHAT_AUTH_TIMEOUT = env.float("CHAT_AUTH_TIMEOUT", default=5.0)
CHAT_MAX_MESSAGE_LENGTH = env.int("CHAT_MAX_MESSAGE_LENGTH", default=4000)
CHAT_MAX_FRAME_BYTES = env.int("CHAT_MAX_FRAME_BYTES", default=64 * 1024)
CHAT_HISTORY_LIMIT = env.int("CHAT_HISTORY_LIMIT", default=100)
# The room list refreshes its unread badges this often while it is shown (0: only when shown
# again); one GET /api/rooms/ per open list.
CHAT_UNREAD_REFRESH_SECONDS = env.float("CHAT_UNREAD_REFRESH_SECONDS", default=15.0)

CHAT_MESSAGE_RATE = env.float("CHAT_MESSAGE_RATE", default=5.0)
CHAT_MESSAGE_BURST = env.int("CHAT_MESSAGE_BURST", default=20)
CHAT_TYPING_INTERVAL = env.float("CHAT_TYPING_INTERVAL", default=2.0)
# A socket's database reads (history, resync pages): answered at most this often, after a
# burst; more wait their turn (chat.consumers.RoomConsumer._paced_read).
CHAT_READ_RATE = env.float("CHAT_READ_RATE", default=10.0)
CHAT_READ_BURST = env.int("CHAT_READ_BURST", default=30)
# Refused frames (error answers) tolerated within CHAT_ABUSE_WINDOW seconds; one more closes 4429.
CHAT_ABUSE_LIMIT = env.int("CHAT_ABUSE_LIMIT", default=20)
CHAT_ABUSE_WINDOW = env.float("CHAT_ABUSE_WINDOW", default=10.0)
CHAT_MAX_SOCKETS_PER_USER = env.int("CHAT_MAX_SOCKETS_PER_USER", default=10)
CHAT_CONNECT_RATE_PER_IP = env.int("CHAT_CONNECT_RATE_PER_IP", default=60)  # per minute
CHAT_MAX_CONNECTION_AGE = env.float("CHAT_MAX_CONNECTION_AGE", default=3600.0)
# Every HEARTBEAT seconds a process renews its sockets' leases (slots, presence) for
# PRESENCE_LEASE seconds, re-joins its channel-layer groups, closes sockets past their maximum
# age and announces the users whose leases lapsed (a crashed process's): they are gone from the
# lists within PRESENCE_LEASE + HEARTBEAT. The lease must outlast two heartbeats (chat.E014).
CHAT_HEARTBEAT = env.float("CHAT_HEARTBEAT", default=30.0)
CHAT_PRESENCE_LEASE = env.float("CHAT_PRESENCE_LEASE", default=90.0)

# daphne keepalive: a socket idle for PING_INTERVAL gets a ping; no pong within PING_TIMEOUT
# closes it. Both feed `manage.py serve`.
CHAT_PING_INTERVAL = env.int("CHAT_PING_INTERVAL", default=20)
CHAT_PING_TIMEOUT = env.int("CHAT_PING_TIMEOUT", default=30)
# A client that stops reading is dropped (close 1008) once its socket has been backed up this
# long, or has this much queued meanwhile: memory per slow reader stays bounded.
CHAT_SLOW_CLIENT_TIMEOUT = env.float("CHAT_SLOW_CLIENT_TIMEOUT", default=10.0)
CHAT_SLOW_CLIENT_MAX_BYTES = env.int("CHAT_SLOW_CLIENT_MAX_BYTES", default=1024 * 1024)

# Audit rows are chained with HMAC-SHA256 under this key (see chat/audit.py).
CHAT_AUDIT_HMAC_KEY = env.str("CHAT_AUDIT_HMAC_KEY", default="")
if not CHAT_AUDIT_HMAC_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "CHAT_AUDIT_HMAC_KEY is not set. It signs the audit chain; production refuses to "
            "start without it (a random value of 32+ bytes, kept apart from DJANGO_SECRET_KEY)."
        )
    CHAT_AUDIT_HMAC_KEY = "development-only-audit-key"
# Audit rows queued by sockets are written in batches at most this often (seconds).
CHAT_AUDIT_FLUSH_INTERVAL = env.float("CHAT_AUDIT_FLUSH_INTERVAL", default=0.05)
# Audit rows the database would not take at shutdown wait here for the next start (chat/spool.py).
CHAT_AUDIT_SPOOL_DIR = DATA_DIR / "audit-spool"
# Rejections from one IP within the window that raise a chat.security WARNING.
CHAT_SECURITY_ALERT_THRESHOLD = env.int("CHAT_SECURITY_ALERT_THRESHOLD", default=20)
CHAT_SECURITY_ALERT_WINDOW = env.int("CHAT_SECURITY_ALERT_WINDOW", default=300)

# Which server process held a connection, for the audit trail.
CHAT_INSTANCE_NAME = env.str("CHAT_INSTANCE_NAME", default=f"{socket.gethostname()}:{os.getpid()}")

# /metrics: open to loopback only, or to a bearer token when set.
CHAT_METRICS_TOKEN = env.str("CHAT_METRICS_TOKEN", default="")

# ---------------------------------------------------------------------------------------------
# HTTP security
# ---------------------------------------------------------------------------------------------

SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_AGE = env.int("DJANGO_SESSION_COOKIE_AGE", default=14 * 24 * 3600)

# TLS terminates at the reverse proxy or at daphne itself (`-e ssl:`): production is https only.
_HTTPS = env.bool("DJANGO_HTTPS", default=not DEBUG)
SECURE_SSL_REDIRECT = _HTTPS
# Scrapes and health checks reach each process over plain http on loopback (see ALLOWED_HOSTS).
SECURE_REDIRECT_EXEMPT = [r"^metrics$", r"^healthz$"]
SESSION_COOKIE_SECURE = _HTTPS
CSRF_COOKIE_SECURE = _HTTPS
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=31536000 if _HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _HTTPS
SECURE_HSTS_PRELOAD = env.bool("DJANGO_HSTS_PRELOAD", default=False)
# Believed only from peers in CHAT_TRUSTED_PROXIES (chatproject.middleware drops it otherwise,
# and chat.E006 refuses the setting without trusted proxies).
if env.bool("DJANGO_BEHIND_PROXY", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = _stripped(env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[]))

# No inline scripts or styles anywhere: every script is a static ES module.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "font-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
    },
}

# Staff sign in to the admin with a second factor (TOTP), and need it for their staff powers in
# the rooms too (chat.permissions.has_staff_powers). On by default outside development.
CHAT_ADMIN_REQUIRE_OTP = env.bool("CHAT_ADMIN_REQUIRE_OTP", default=not DEBUG)
# django-otp's device admins show no TOTP key or backup code once a device exists (its default
# showed both, and a QR code of the key, to anyone with the view permission).
OTP_ADMIN_HIDE_SENSITIVE_DATA = True

# ---------------------------------------------------------------------------------------------
# Internationalisation and static files
# ---------------------------------------------------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env.str("DJANGO_STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
# The reverse proxy serves STATIC_ROOT in production (deploy/); without one, chatproject/asgi.py
# serves /static/ itself, before Django's middleware, so pages never pay for it.

# ---------------------------------------------------------------------------------------------
# Logging: secrets never reach a log line (see chatproject/logging.py)
# ---------------------------------------------------------------------------------------------

# DJANGO_LOG_LEVEL is the level of the project's loggers (chat.*, accounts.*, chatproject.*, which
# have none of their own), of Django's (which Django's defaults would keep at INFO) and of any
# library's left unset. Two floors: chat.security's warnings (refused logins, rejections from
# one address) are written at any level, and daphne says nothing below WARNING (its INFO and
# DEBUG are start-up and per-frame chatter; its access log is `manage.py serve -v`'s).
LOG_LEVEL = env.str("DJANGO_LOG_LEVEL", default="INFO").upper()
# Python's own aliases, which logging took as they are before the names were checked here.
LOG_LEVEL = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(LOG_LEVEL, LOG_LEVEL)
_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
if LOG_LEVEL not in _LOG_LEVELS:
    raise ImproperlyConfigured(f"DJANGO_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact": {"()": "chatproject.logging.RedactSecretsFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["redact"],
        },
    },
    # Every logger's records reach the root's handler, and its filter: no logger has its own.
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"level": LOG_LEVEL},
        "daphne": {"level": max(LOG_LEVEL, "WARNING", key=_LOG_LEVELS.index)},
        "chat.security": {"level": min(LOG_LEVEL, "WARNING", key=_LOG_LEVELS.index)},
    },
}
