"""The coordinator's exceptions: one base, one type per failure the caller can act on.

::

    CoordinatorError
    ├── DatabaseUnavailable   the database cannot be reached, started or migrated
    ├── SettingsError         a setting is missing or out of range
    ├── AuthError             no token, an unknown or revoked one (HTTP 401)
    │   └── Forbidden         a valid token of the wrong role (HTTP 403)
    ├── LeaseConflict         the batch is not leased to this caller with this token (409)
    ├── NotFound              no such batch (404)
    ├── Quarantined           a worker whose batches keep failing gets no lease (429)
    ├── InvalidReport         a completion report that cannot be true for the batch (422)
    ├── IngestError           a file that cannot be read; names the file and the line
    └── ArchiveError          the archive folder cannot be written, or a run is in progress
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base of every error the coordinator raises on purpose."""


class DatabaseUnavailable(CoordinatorError):
    """The database cannot be reached or started."""


class SettingsError(CoordinatorError):
    """A setting is missing or invalid."""


class AuthError(CoordinatorError):
    """The request carries no valid token."""


class Forbidden(AuthError):
    """The token is valid but its role may not do this."""


class LeaseConflict(CoordinatorError):
    """The batch is not leased to the caller under the lease token given."""


class NotFound(CoordinatorError):
    """No such batch."""


class Quarantined(CoordinatorError):
    """The worker's recent batches all failed: no lease for it until ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidReport(CoordinatorError):
    """A completion report that contradicts the batch."""


class IngestError(CoordinatorError):
    """An input file cannot be read. The message names the file and, if known, the line."""


class ArchiveError(CoordinatorError):
    """Finished batches cannot be archived now: the folder cannot be listed or written,
    another run holds the database's archive lock, or the hot rows disagree with each
    other. Nothing was deleted."""
