"""The coordinator's exceptions: one base, one type per failure the caller can act on."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base of every error the coordinator raises on purpose."""


class DatabaseUnavailable(CoordinatorError):
    """The database cannot be reached or started."""
