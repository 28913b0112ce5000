"""How much of the pending table a lease samples (pure logic, no database).

``TABLESAMPLE SYSTEM (p)`` reads about p % of the table's pages. The table's planner row
count lags behind the deletes of the leases, and the pages that emptied stay until VACUUM
truncates the table's end, so with a fraction f of the counted rows still there, a sample
yields about ``p/100 * rows * f`` rows. A fixed p therefore starves as the farm drains (at
99 % done, ``SYSTEM(0.5)`` over 3M rows yields about 150 rows). ``SampleRate`` keeps an
estimate of f learned from the samples themselves and asks for
``p = 100 * sample / (f * rows)``, where ``sample`` is ``oversample`` times the rows
wanted, and at least ``want / page_share`` pages' worth of rows (``page_rows`` a page):
a batch takes at most ``page_share`` rows from a sampled page on average whatever the
rows' width, and no more pages are read than that and the margin need (rows of 16 ids
fill a page with ~43 of them: ~4x the rows wanted; rows carrying their candidates'
fragments with ~3: the margin alone). When that p would read more than
``max_rows`` rows' worth of pages, sampling costs more than it is worth (the pending rows
are too sparse) and the lease takes its rows from the primary key instead (``None``); the
estimate then creeps back up so that a later lease samples again if new candidates
arrived.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

MIN_FRACTION = 1e-9
MIN_PCT = 1e-4
#: after a lease served by the index, raise the estimate by this factor
RECOVERY = 1.25


@dataclass
class SampleRate:
    oversample: float = 1.5
    max_rows: int = 200_000
    #: 0: no spread rule (the margin alone)
    page_share: int = 0
    fraction: float = 1.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def percent(self, want: int, table_rows: int, capacity: int = 0,
                page_rows: int = 1) -> float | None:
        """The sample percentage for ``want`` rows, or None to use the index instead.

        ``capacity`` is the number of rows the table's pages hold when full: a sample
        reads p % of the pages, empty or not, so its cost is p % of the larger of the two.
        ``page_rows``: the rows a full page holds (for ``page_share``).
        """
        if table_rows <= 0 or want <= 0:
            return None
        with self._lock:
            fraction = max(self.fraction, MIN_FRACTION)
        spread = want / self.page_share * page_rows if self.page_share > 0 else 0.0
        sample = max(self.oversample * want, spread)
        pct = 100.0 * sample / (fraction * table_rows)
        pct = min(pct, 100.0)
        if pct / 100.0 * max(table_rows, capacity) > self.max_rows:
            return None
        return max(pct, MIN_PCT)

    def observe(self, pct: float, table_rows: int, got: int) -> None:
        """Learn from a sample at ``pct`` that found ``got`` unbatched rows."""
        sampled = pct / 100.0 * table_rows
        with self._lock:
            if got > 0:
                self.fraction = min(1.0, got / sampled)
            else:
                self.fraction = max(MIN_FRACTION, self.fraction / 10)

    def used_index(self) -> None:
        with self._lock:
            self.fraction = min(1.0, self.fraction * RECOVERY)
