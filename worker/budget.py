"""Memory budgets shared by tasks: bodies being read or waiting to be decoded, and pixels.

``ByteBudget`` lends bytes first come, first served: a request waits until the bytes
are free *and* every earlier request has been served, so a large request cannot be
starved by a stream of small ones. ``Reservation`` is one holder's share, grown and
shrunk as a body is read, given back once.

``BodyBudget`` bounds the response bodies a worker holds, from before their first byte
until their decode ends (see its docstring for why it cannot deadlock).

Resource handling: a reservation is given back by ``release()`` (idempotent); a task
cancelled while it waits takes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

#: what a body takes before its first byte, at most (most images are smaller)
UNKNOWN_START = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 128 * 1024


@functools.cache
def return_freed_memory() -> bool:
    """Make glibc serve every allocation over 128 KB with its own mapping, given back
    to the system when freed; True when it could.

    glibc raises that threshold by itself (up to 32 MB) each time such a block is
    freed, after which bodies and Pillow's 16 MB pixel blocks come from heaps that keep
    their pages: each decode thread's heap then holds the largest image it ever
    decoded. Measured on 30 RGBA PNGs of 23 MP, two decode threads: peak RSS 509 MB
    without this, 322 MB with it. Setting it once also stops the raising.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1)


@dataclass(eq=False)
class _Waiter:
    size: int
    granted: trio.Event = field(default_factory=trio.Event)


class ByteBudget:
    """At most ``total`` bytes lent at once, in arrival order; a request above ``total``
    is cut to ``total`` (it runs alone)."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._free = total
        self._waiters: deque[_Waiter] = deque()

    async def take(self, size: int) -> int:
        """Wait for ``size`` bytes (at most ``total``); returns the bytes taken."""
        size = min(size, self._total)
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._waiters and size <= self._free:
            self._free -= size
            await trio.lowlevel.cancel_shielded_checkpoint()
            return size
        waiter = _Waiter(size)
        self._waiters.append(waiter)
        try:
            await waiter.granted.wait()
        except BaseException:  # cancelled while queued: take nothing, re-raised below
            self._leave(waiter)
            raise
        return size

    def _leave(self, waiter: _Waiter) -> None:
        if waiter.granted.is_set():
            self.give(waiter.size)
        else:
            self._waiters.remove(waiter)
            self._serve()

    def give(self, size: int) -> None:
        self._free += size
        self._serve()

    def _serve(self) -> None:
        while self._waiters and self._waiters[0].size <= self._free:
            waiter = self._waiters.popleft()
            self._free -= waiter.size
            waiter.granted.set()

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        taken = await self.take(size)
        try:
            yield
        finally:
            self.give(taken)

    @property
    def free(self) -> int:
        return self._free

    @property
    def total(self) -> int:
        return self._total


class Reservation:
    """Bytes one body holds in a ``ByteBudget``."""

    def __init__(self, budget: ByteBudget, size: int = 0) -> None:
        self._budget = budget
        self.size = size

    async def grow_to(self, size: int) -> None:
        if size > self.size:
            self.size += await self._budget.take(size - self.size)

    def shrink_to(self, size: int) -> None:
        if size < self.size:
            self._budget.give(self.size - size)
            self.size = size

    def release(self) -> None:
        self.shrink_to(0)


class BodyBudget:
    """The bytes of response bodies in memory, each capped at ``cap``, for ``readers``
    concurrent readers.

    Every body takes ``start`` bytes (or its declared length, when smaller) before its
    first byte is read. Once it has received more, it takes the rest of its declared
    length (the cap when none is declared) at once, one body at a time (the
    ``_growing`` lock). So a server dripping a large body holds ``start`` bytes, not
    its declared length, and the only holders that wait while holding bytes are the
    bodies waiting to grow, ``start`` bytes each: since ``total >= cap + readers *
    start`` the one growing always gets what it asks once the other holders (bodies
    being read or decoded, which finish on their own) give theirs back. Half-read
    bodies can never hold the whole budget while each waits for more. Bodies shrink to
    their size once read.
    """

    def __init__(self, total: int, cap: int, readers: int) -> None:
        if total < 2 * cap:
            raise ValueError(f"a body budget of {total} bytes cannot hold two {cap} byte bodies")
        self.cap = cap
        self.start = max(1, min(UNKNOWN_START, (total - cap) // readers))
        self._bytes = ByteBudget(total)
        self._growing = trio.Lock()

    async def reserve(self, length: int | None) -> Reservation:
        """A reservation for the start of a body of ``length`` bytes (``None``: unknown)."""
        reservation = Reservation(self._bytes)
        await reservation.grow_to(min(self.start, self.cap if length is None else length))
        return reservation

    async def grow(self, reservation: Reservation, length: int | None) -> None:
        """``reservation`` grown to ``length`` (the cap when ``None``); one at a time."""
        async with self._growing:
            await reservation.grow_to(self.cap if length is None else min(length, self.cap))

    @property
    def free(self) -> int:
        return self._bytes.free
