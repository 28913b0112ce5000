"""The worker's exceptions, drawn as one tree.

Every failure of a candidate URL is a ``FetchFailure`` carrying its named
``pairfarm.outcomes.Outcome``; library errors (httpx, httpcore, Pillow, zlib, brotli)
are converted into these at the edge where they are raised::

    WorkerError
    ├── FetchFailure             one candidate failed; ``.outcome`` names the class
    │   ├── SSRFBlocked          the target address is not public (ssrf_blocked)
    │   ├── DNSFailure           the name does not resolve or resolution timed out (dns)
    │   └── ImageRejected        the body is not an acceptable image (not_image, bomb, ...)
    ├── ShardWriteError          the shard could not be written to its storage
    └── SettingsError            a setting is invalid (bad CIDR, unknown resize mode, ...)
"""

from __future__ import annotations

from pairfarm.outcomes import Outcome


class WorkerError(Exception):
    """Base of every error the download worker raises."""


class FetchFailure(WorkerError):
    """One candidate ended in a failure outcome."""

    def __init__(self, outcome: Outcome, detail: str) -> None:
        super().__init__(f"{outcome.value}: {detail}")
        self.outcome = outcome
        self.detail = detail


class SSRFBlocked(FetchFailure):
    def __init__(self, detail: str) -> None:
        super().__init__(Outcome.SSRF_BLOCKED, detail)


class DNSFailure(FetchFailure):
    def __init__(self, detail: str) -> None:
        super().__init__(Outcome.DNS, detail)


class ImageRejected(FetchFailure):
    """The body was fetched but is not an image we keep."""


class ShardWriteError(WorkerError):
    """Writing a shard file failed (storage full, permission, network storage down)."""


class SettingsError(WorkerError):
    """A worker setting is invalid."""
