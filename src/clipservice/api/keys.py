"""Typed keys for everything stored on the aiohttp application."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from clipservice.config import Settings
from clipservice.jobs.events import JobEvents
from clipservice.jobs.runner import LocalRunner
from clipservice.jobs.store import FileJobStore
from clipservice.metrics import Metrics

if TYPE_CHECKING:
    from clipservice.api.ops import Readiness

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", FileJobStore)
RUNNER = web.AppKey("runner", LocalRunner)
HTTP = web.AppKey("http", aiohttp.ClientSession)
EVENTS = web.AppKey[JobEvents]("events")
METRICS = web.AppKey("metrics", Metrics)
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
