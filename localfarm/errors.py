"""The local farm's exceptions."""

from __future__ import annotations


class FarmError(Exception):
    """Base of the local farm's errors."""


class ChildFailed(FarmError):
    """A process the farm needs exited with an error and could not be brought back."""


class StartupFailed(FarmError):
    """A part of the farm did not come up (database, coordinator, ingest)."""


class FarmBusy(FarmError):
    """Another ``pairfarm up`` runs on the same farm directory."""
