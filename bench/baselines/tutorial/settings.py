"""Minimal standalone settings for the tutorial consumer: no database, the in-memory layer."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "bench-tutorial-only")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["daphne", "channels"]
ROOT_URLCONF = "bench.baselines.tutorial.urls"
ASGI_APPLICATION = "bench.baselines.tutorial.asgi.application"
DATABASES = {}
USE_TZ = True
# Exactly the tutorial's layer: default capacity (100 per channel) and expiry.
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
