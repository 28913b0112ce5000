"""A split-block Bloom filter over URL hashes (the layout of Apache Parquet's bloom
filters), vectorised with numpy.

The filter is an array of 32-byte blocks, each eight 32-bit words. A key sets one bit
in each word of one block: the block from the key's high 32 bits, the bits from its low
32 bits times eight odd constants (``SALT``), top five bits. A lookup reads one block
(one cache line), so testing 131k keys is one gather of 131k blocks.

The keys here are the dedup's URL hashes (``coordinator.ingest.urlhash``): the first 8
of their 16 bytes, big-endian, are the 64-bit key (SHA-256 bytes: already uniform).

False positives: with ``b`` bits per key, a block holds ~``b * n / 256`` keys' bits; at
16 bits a key the measured rate is ~0.1 % (``tests/test_waves.py`` holds it under
0.3 %), at 10 bits ~1 %. A filter never answers "absent" for a key it was built with.

Serialised as its words, little-endian (``to_bytes``); the block count is the length
over 32.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

SALT = np.array([0x47B6137B, 0x44974D91, 0x8824AD5B, 0xA2B7289D,
                 0x705495C7, 0x2DF1424B, 0x9EFC4947, 0x5C6BFB31], dtype=np.uint32)
BLOCK_BYTES = 32
#: filter bits per key unless asked otherwise
BITS_PER_KEY = 16

Keys = npt.NDArray[np.uint64]


def keys_of(hashes: Iterable[bytes] | bytes) -> Keys:
    """The 64-bit keys of 16-byte URL hashes (a list, or their concatenation)."""
    joined = hashes if isinstance(hashes, bytes) else b"".join(hashes)
    return np.frombuffer(joined, dtype=">u8")[::2].astype(np.uint64)


class SplitBlockBloom:
    """A split-block Bloom filter; ``add`` keys, then ask ``may_contain``."""

    def __init__(self, words: npt.NDArray[np.uint32]) -> None:
        if words.ndim != 2 or words.shape[1] != 8 or words.shape[0] < 1:
            raise ValueError(f"a filter is blocks of 8 words, not {words.shape}")
        self.words = words

    @classmethod
    def for_keys(cls, count: int, bits_per_key: int = BITS_PER_KEY) -> SplitBlockBloom:
        """An empty filter sized for ``count`` keys."""
        blocks = max(1, -(-max(count, 1) * bits_per_key // (BLOCK_BYTES * 8)))
        return cls(np.zeros((blocks, 8), dtype=np.uint32))

    @classmethod
    def from_bytes(cls, data: bytes) -> SplitBlockBloom:
        if not data or len(data) % BLOCK_BYTES:
            raise ValueError(f"a filter's length is a multiple of {BLOCK_BYTES} bytes, "
                             f"not {len(data)}")
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32).reshape(-1, 8)
        return cls(words)

    def to_bytes(self) -> bytes:
        return self.words.astype("<u4").tobytes()

    @property
    def blocks(self) -> int:
        return int(self.words.shape[0])

    def add(self, keys: Keys) -> None:
        lookup = Lookup.of(keys)
        flat = self.words.reshape(-1)
        block = self._blocks_of(lookup)
        first = block.astype(np.intp) * 8
        index = (first[:, None] + np.arange(8, dtype=np.intp)).reshape(-1)
        np.bitwise_or.at(flat, index, lookup.masks.view(np.uint32).reshape(-1))

    def may_contain(self, keys: Keys | Lookup) -> npt.NDArray[np.bool_]:
        """Per key: False where the key was certainly never added. Pass a ``Lookup`` to
        test the same keys against several filters (its masks are computed once)."""
        lookup = keys if isinstance(keys, Lookup) else Lookup.of(keys)
        if lookup.high.size == 0:
            return np.zeros(0, dtype=np.bool_)
        words = self.words.view(np.uint64)  # a block as 4 x 64 bits: fewer operations
        missing = np.invert(np.take(words, self._blocks_of(lookup), axis=0))
        np.bitwise_and(missing, lookup.masks, out=missing)
        any_missing = missing[:, 0] | missing[:, 1]
        any_missing |= missing[:, 2]
        any_missing |= missing[:, 3]
        found: npt.NDArray[np.bool_] = any_missing == 0
        return found

    def _blocks_of(self, lookup: Lookup) -> npt.NDArray[np.uint64]:
        blocks: npt.NDArray[np.uint64] = (lookup.high * np.uint64(self.blocks)) >> np.uint64(32)
        return blocks


class Lookup:
    """What testing keys against any filter needs: each key's high 32 bits (its block,
    once scaled by the filter's block count) and its eight one-bit word masks, as 4 x 64
    bits (~40 ms per 1M keys; a filter's test after that ~45 ms per 1M keys)."""

    def __init__(self, high: Keys, masks: npt.NDArray[np.uint64]) -> None:
        self.high = high
        self.masks = masks

    @classmethod
    def of(cls, keys: Keys) -> Lookup:
        low = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        bits = (low[:, None] * SALT[None, :]) >> np.uint32(27)
        masks = np.ascontiguousarray(np.left_shift(np.uint32(1), bits, dtype=np.uint32))
        return cls(keys >> np.uint64(32), masks.view(np.uint64))
