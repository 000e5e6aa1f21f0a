"""Typed keys for everything stored on the aiohttp application."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from clipservice.config import Settings
from clipservice.jobs.events import JobEvents
from clipservice.jobs.runner import LocalRunner
from clipservice.jobs.store import FileJobStore
from clipservice.jobs.webhooks import WebhookSender

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", FileJobStore)
RUNNER = web.AppKey("runner", LocalRunner)
HTTP = web.AppKey("http", aiohttp.ClientSession)
EVENTS = web.AppKey[JobEvents]("events")
WEBHOOKS = web.AppKey("webhooks", WebhookSender)
