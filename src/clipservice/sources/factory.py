"""The one place a resolver is built from the settings.

The API node (in-process mode) and every ``clipservice worker`` resolve
sources the same way: the configured resolver (Vidfly, or the stream URLs as
given) behind the URL guard, which checks every URL it hands out.
"""

from __future__ import annotations

import aiohttp

from clipservice.config import Settings
from clipservice.sources.base import DirectResolver, Resolver
from clipservice.sources.guard import GuardedResolver, UrlGuard
from clipservice.sources.vidfly import VidflyResolver


def make_resolver(settings: Settings, http: aiohttp.ClientSession, guard: UrlGuard) -> Resolver:
    """The resolver of ``settings.resolver``, behind ``guard``.

    ``http`` is the session Vidfly is called with (its ``base_url`` is
    trusted, so it is not the guard's session).
    """
    inner: Resolver
    if settings.resolver.kind == "direct":
        inner = DirectResolver()
    else:
        inner = VidflyResolver(
            http,
            settings.resolver.base_url,
            settings.resolver.timeout_s,
            settings.resolver.max_height,
        )
    return GuardedResolver(inner, guard)
