"""The exceptions of the extract component, one tree::

    ExtractError
    ├── SettingsError      a flag or environment value is invalid
    ├── SourceError        a WAT file or URL cannot be read (missing, not a WARC, HTTP error)
    │   └── TruncatedSource  the file ends inside a record (a cut download, a truncated gzip)
    ├── CorruptRecord      one record's payload is not WAT JSON (counted and skipped)
    ├── BloomFileError     the persistent Bloom filter cannot be read, written or reused
    └── IngestError        ``pairfarm ingest`` is missing or failed on a shard

Library errors (``OSError`` from fastwarc, ``httpx.HTTPError``, ``orjson.JSONDecodeError``)
are converted into these at the module that calls the library.
"""

from __future__ import annotations


class ExtractError(Exception):
    """Base of every error this component raises on purpose."""


class SettingsError(ExtractError):
    """A setting is invalid; the message names the flag."""


class SourceError(ExtractError):
    """A WAT source cannot be read; the file is reported, the run goes on."""


class TruncatedSource(SourceError):
    """The source ends inside a record; what came before it is kept."""


class CorruptRecord(ExtractError):
    """A record's payload is not WAT JSON; it is counted and skipped."""


class BloomFileError(ExtractError):
    """The Bloom filter file is unreadable or was built for another dedup key."""


class IngestError(ExtractError):
    """``pairfarm ingest`` is not installed or exited non-zero on a shard."""
