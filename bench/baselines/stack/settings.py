"""The chat's settings, with the bench's do-nothing views in front of its URLs."""

from chatproject.settings import *  # noqa: F403

ROOT_URLCONF = "bench.baselines.stack.urls"
