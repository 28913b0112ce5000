"""How much of the candidates table a lease samples (pure logic, no database).

``TABLESAMPLE SYSTEM (p)`` reads about p % of the table's pages and only then applies the
``WHERE``: with a fraction f of rows still unbatched, a sample yields about
``p/100 * rows * f`` usable rows. A fixed p therefore starves as the farm drains (at 99 %
done, ``SYSTEM(0.5)`` over 3M rows yields about 150 rows). ``SampleRate`` keeps an estimate
of f learned from the samples themselves and asks for
``p = 100 * oversample * want / (f * rows)``. When that p would read more than
``max_pct`` of the table, sampling costs more than it is worth and the lease takes its rows
from the partial index instead (``None``); the estimate then creeps back up so that a
later lease samples again if new candidates arrived.
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
    max_pct: float = 20.0
    fraction: float = 1.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def percent(self, want: int, table_rows: int) -> float | None:
        """The sample percentage for ``want`` rows, or None to use the index instead."""
        if table_rows <= 0 or want <= 0:
            return None
        with self._lock:
            fraction = max(self.fraction, MIN_FRACTION)
        pct = 100.0 * self.oversample * want / (fraction * table_rows)
        if pct > self.max_pct:
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
