"""Old name of :mod:`clipservice.api.page`, kept only until ``app.py`` imports
the new one; then delete it."""

from clipservice.api.page import routes

__all__ = ["routes"]
