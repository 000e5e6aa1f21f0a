"""Typed keys for everything stored on the aiohttp application."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from clipservice.config import Settings
from clipservice.jobs.runner import LocalRunner
from clipservice.jobs.store import FileJobStore
from clipservice.sources.guard import UrlGuard

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", FileJobStore)
RUNNER = web.AppKey("runner", LocalRunner)
HTTP = web.AppKey("http", aiohttp.ClientSession)
GUARD = web.AppKey("guard", UrlGuard)
