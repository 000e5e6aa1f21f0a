"""Old name of :mod:`clipservice.api.sse`, kept only until ``app.py`` imports
the new one; then delete it."""

from clipservice.api.sse import routes

__all__ = ["routes"]
