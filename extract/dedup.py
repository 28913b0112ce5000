"""Dedup: exact within a run, a persistent Bloom filter across runs.

A candidate's dedup key is its URL, or its URL and caption (``url+alt``, LAION's choice: the
same image under two different alt texts is two samples). The key is hashed once, in the
worker, to a 128-bit BLAKE2b digest held as a signed Python int: the run's exact set keeps
those ints, and the Bloom filter hashes them with ``_identity`` (rbloom needs a hash in the
signed 128-bit range that is the same in every process and every run, which Python's
``hash()`` of a str is not). Two different keys collide with probability ~n²/2¹²⁹:
nothing, at Common Crawl's scale.

The Bloom filter (rbloom, Rust, maintained) is sized by ``capacity`` and
``false_positive_rate`` when first created; the file keeps its bits and a sidecar
``<path>.json`` keeps those parameters and the key mode, so a later run reuses them. The
database still dedups URLs exactly at ingest: a Bloom false positive drops a candidate that
was new (rate reported), it never lets a duplicate through.

Resource handling: ``BloomStore.save`` writes both files under temporary names and renames
them, so a crash leaves the previous filter whole.

Error handling: an unreadable filter file, or one built for the other key mode, raises
``BloomFileError``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from extract.errors import BloomFileError

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
DEFAULT_CAPACITY = 100_000_000
DEFAULT_FPR = 0.01


class KeyMode(StrEnum):
    URL = "url"
    URL_ALT = "url+alt"


def dedup_key(url: str, caption: str, mode: KeyMode) -> int:
    """The 128-bit digest of a candidate's dedup key, as a signed int."""
    material = url if mode is KeyMode.URL else f"{url}\x00{caption}"
    digest = hashlib.blake2b(material.encode("utf-8", "surrogatepass"), digest_size=16)
    return int.from_bytes(digest.digest(), "little", signed=True)


class RunDedup:
    """The exact set of keys seen so far in this run."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def first_time(self, key: int) -> bool:
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def __len__(self) -> int:
        return len(self._seen)


def _identity(key: int) -> int:
    return key


@dataclass(frozen=True, slots=True)
class BloomParams:
    capacity: int
    false_positive_rate: float
    key_mode: KeyMode
    size_in_bits: int | None = None  # known once the filter exists


class BloomStore:
    """A persistent Bloom filter of dedup keys (``seen_before`` adds what it has not seen)."""

    def __init__(self, path: Path, params: BloomParams, *, loaded: bool, bloom: Any) -> None:
        self.path = path
        self.params = params
        self.loaded = loaded
        self._bloom = bloom
        self.added = 0

    @classmethod
    def open(cls, path: Path, params: BloomParams) -> BloomStore:
        """Load the filter at ``path`` (its stored parameters win), or create an empty one."""
        from rbloom import Bloom

        meta_path = _meta_path(path)
        if not path.exists():
            bloom = Bloom(params.capacity, params.false_positive_rate, _identity)
            return cls(path, params, loaded=False, bloom=bloom)
        stored = _read_meta(meta_path)
        if stored.key_mode is not params.key_mode:
            raise BloomFileError(
                f"{path} holds '{stored.key_mode}' keys; this run dedups on '{params.key_mode}'"
                " (use another --bloom file or the same --dedup-key)"
            )
        _warn_if_resized(path, stored, params)
        try:
            bloom = Bloom.load(str(path), _identity)
        except (OSError, ValueError) as exc:
            raise BloomFileError(f"cannot load the Bloom filter {path}: {exc}") from exc
        if bloom.size_in_bits != stored.size_in_bits:
            raise BloomFileError(
                f"{path} has {bloom.size_in_bits} bits, its parameters say {stored.size_in_bits}:"
                " the file is damaged or not a Bloom filter"
            )
        return cls(path, stored, loaded=True, bloom=bloom)

    def seen_before(self, key: int) -> bool:
        if key in self._bloom:
            return True
        self._bloom.add(key)
        self.added += 1
        return False

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        meta_tmp = self.path.with_name(self.path.name + ".json.tmp")
        try:
            self._bloom.save(str(tmp))
            meta_tmp.write_text(json.dumps(self._meta(), indent=1))
            os.replace(tmp, self.path)
            os.replace(meta_tmp, _meta_path(self.path))
        except OSError as exc:
            raise BloomFileError(f"cannot save the Bloom filter {self.path}: {exc}") from exc

    def report(self) -> dict[str, Any]:
        """Parameters, fill and the false-positive rate now (an estimate from the fill)."""
        items = float(self._bloom.approx_items)
        bits = int(self._bloom.size_in_bits)
        return {
            "path": str(self.path),
            "loaded_existing": self.loaded,
            "key": str(self.params.key_mode),
            "capacity": self.params.capacity,
            "configured_false_positive_rate": self.params.false_positive_rate,
            "size_bytes": bits // 8,
            "approx_items": round(items),
            "added_this_run": self.added,
            "estimated_false_positive_rate": estimated_fpr(bits, self.params.capacity, items),
            "over_capacity": items > self.params.capacity,
        }

    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "capacity": self.params.capacity,
            "false_positive_rate": self.params.false_positive_rate,
            "key": str(self.params.key_mode),
            "size_in_bits": int(self._bloom.size_in_bits),
            "hash": "blake2b-128",
        }


def estimated_fpr(bits: int, capacity: int, items: float) -> float:
    """(1 - e^(-k n / m))^k with the optimal k for the filter's capacity."""
    if items <= 0:
        return 0.0
    hashes = max(1, round(bits / capacity * math.log(2)))
    return float((1.0 - math.exp(-hashes * items / bits)) ** hashes)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_meta(meta_path: Path) -> BloomParams:
    try:
        meta = json.loads(meta_path.read_text())
        return BloomParams(
            int(meta["capacity"]), float(meta["false_positive_rate"]), KeyMode(meta["key"]),
            int(meta["size_in_bits"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BloomFileError(
            f"cannot read the Bloom filter's parameters {meta_path}: {exc}"
        ) from exc


def _warn_if_resized(path: Path, stored: BloomParams, asked: BloomParams) -> None:
    if (stored.capacity, stored.false_positive_rate) != (asked.capacity, asked.false_positive_rate):
        log.warning(
            "%s was created for %d items at FPR %g; keeping those (asked %d at %g)",
            path, stored.capacity, stored.false_positive_rate,
            asked.capacity, asked.false_positive_rate,
        )
