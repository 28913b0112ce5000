"""A byte budget shared by tasks: bounds the bodies held while they wait for a decoder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class ByteBudget:
    """At most ``total`` bytes held at once; a request above ``total`` takes all of it.

    Holders only wait for a decode thread, which always makes progress, so waiting here
    cannot deadlock.
    """

    def __init__(self, total: int) -> None:
        self._total = total
        self._free = total
        self._lot = trio.lowlevel.ParkingLot()

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        size = min(size, self._total)
        await trio.lowlevel.checkpoint()
        while self._free < size:
            await self._lot.park()
        self._free -= size
        try:
            yield
        finally:
            self._free += size
            self._lot.unpark_all()

    @property
    def free(self) -> int:
        return self._free
