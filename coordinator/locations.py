"""Where a reported shard may be: the storage locations the coordinator accepts.

A download report names its shard's files as fsspec URLs (``file:///srv/farm/00000001.tar``,
``s3://bucket/shards/00000001.tar``) or plain paths, and post-processing nodes later open
exactly those locations. So a location is accepted only when

- it starts with one of the configured prefixes (``--shard-prefix``; a plain path counts as
  ``file://`` + the path; the default ``file://`` and ``s3://`` allow the local farm and S3),
- it has no ``.`` or ``..`` path segment (a prefix cannot be left by walking up), and
- each file has its shard suffix: ``.tar``, ``.parquet``, ``.json`` (the stats file).

Error handling: ``check_shard`` raises ``InvalidReport`` (HTTP 422) naming the field.
"""

from __future__ import annotations

from coordinator.errors import InvalidReport, SettingsError
from pairfarm.protocol import ShardFiles

#: The local farm writes ``file://`` URLs; a farm of VMs writes to S3.
DEFAULT_SHARD_PREFIXES: tuple[str, ...] = ("file://", "s3://")

_SUFFIXES = {"tar": ".tar", "parquet": ".parquet", "stats": ".json"}


def parse_prefixes(values: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The prefixes of ``--shard-prefix`` / ``PAIRFARM_SHARD_PREFIXES``, each naming a
    scheme (``s3://``, ``file:///srv/farm/``); a bad one is a ``SettingsError``."""
    prefixes = tuple(p for value in values for p in value.replace(",", " ").split())
    for prefix in prefixes:
        scheme, sep, _ = prefix.partition("://")
        if not sep or not scheme.isascii() or not scheme.replace("+", "").isalnum():
            raise SettingsError(
                f"a shard prefix starts with a scheme (s3://, file:///srv/farm/), not {prefix!r}")
    if not prefixes:
        raise SettingsError("at least one shard prefix is needed (e.g. s3://)")
    return prefixes


def check_shard(shard: ShardFiles, prefixes: tuple[str, ...]) -> None:
    """Raise ``InvalidReport`` unless every file of ``shard`` is an allowed location."""
    for field, suffix in _SUFFIXES.items():
        _check_location(field, getattr(shard, field), suffix, prefixes)


def _check_location(field: str, location: str, suffix: str,
                    prefixes: tuple[str, ...]) -> None:
    url = location if "://" in location else f"file://{location}"
    if not url.startswith(prefixes):
        raise InvalidReport(f"shard.{field} {location!r} is outside the allowed shard "
                            f"locations {list(prefixes)} (--shard-prefix)")
    path = url.partition("://")[2]
    if any(segment in (".", "..") for segment in path.split("/")):
        raise InvalidReport(f"shard.{field} {location!r} has a '.' or '..' segment")
    if not path.endswith(suffix) or path.endswith("/" + suffix):
        raise InvalidReport(f"shard.{field} {location!r} is not a {suffix} file")
