"""Errors that carry their HTTP status and a stable code.

Handlers raise :class:`ProblemError`; one middleware renders it (and every
aiohttp and pydantic error) as RFC 9457 problem JSON.
"""

from __future__ import annotations

from typing import Any


class ProblemError(Exception):
    """An error answered to the client as problem JSON."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        *,
        code: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.code = code
        self.errors = errors
        self.headers = headers or {}


class ClipFailure(Exception):
    """One clip failed with a stable error code (see the contract's list)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SourceError(ClipFailure):
    """The source could not be resolved or read (source_unavailable / source_forbidden)."""
