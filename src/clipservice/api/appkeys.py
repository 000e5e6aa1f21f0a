"""Typed keys for everything stored on the aiohttp application."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from clipservice.config import Settings
from clipservice.jobs.base import Runner
from clipservice.jobs.events import JobEvents
from clipservice.jobs.store import JobStore
from clipservice.jobs.webhooks import WebhookSender
from clipservice.metrics import Metrics
from clipservice.sources.guard import UrlGuard
from clipservice.storage import ClipStorage

if TYPE_CHECKING:
    from clipservice.api.ops import Readiness

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey[JobStore]("store")
RUNNER = web.AppKey[Runner]("runner")
HTTP = web.AppKey("http", aiohttp.ClientSession)
GUARD = web.AppKey("guard", UrlGuard)
EVENTS = web.AppKey[JobEvents]("events")
WEBHOOKS = web.AppKey("webhooks", WebhookSender)
METRICS = web.AppKey("metrics", Metrics)
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
# Where clip outputs live (storage.kind): GET /api/clips/{file} answers from it.
STORAGE = web.AppKey[ClipStorage]("storage")
