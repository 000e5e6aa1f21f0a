"""Old name of :mod:`clipservice.api.appkeys`, kept only until ``app.py``,
``server.py`` and the tests that still import it move over; then delete it."""

from clipservice.api.appkeys import (
    EVENTS,
    GUARD,
    HTTP,
    METRICS,
    READINESS,
    RUNNER,
    SETTINGS,
    STORE,
    WEBHOOKS,
)

__all__ = [
    "EVENTS",
    "GUARD",
    "HTTP",
    "METRICS",
    "READINESS",
    "RUNNER",
    "SETTINGS",
    "STORE",
    "WEBHOOKS",
]
