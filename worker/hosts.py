"""Politeness per host: a concurrency limit and a backoff window for each host name.

Resource handling: one ``HostGate`` lives for one batch; it holds a semaphore and a
"not before" time per host seen in that batch.

Error handling: a request that cannot get its host's slot by the time it was given
(its queue bound) fails with ``host_busy``: it never sent a request, so it is not
charged with a ``timeout`` nor with the status another request of that host received.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from pairfarm.outcomes import Outcome
from worker.backoff import backoff_delay
from worker.errors import FetchFailure


@dataclass
class _Host:
    slots: trio.Semaphore
    not_before: float = 0.0
    strikes: int = 0
    outcome: Outcome = Outcome.HTTP_429


@dataclass
class HostGate:
    """At most ``per_host`` requests in flight per host; hosts that asked us to wait wait.

    ``back_off(host, retry_after)`` pushes the host's window to ``retry_after`` seconds
    from now (a server's ``Retry-After``, capped at ``max_delay``), or to a jittered
    exponential delay when the server named none. ``slot(host, until)`` waits for the
    window and a free slot until the time ``until``; a request that would still wait
    then (or whose ``until`` comes before the window opens) fails with ``host_busy``.
    """

    per_host: int
    base_delay: float = 1.0
    max_delay: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    _hosts: dict[str, _Host] = field(default_factory=dict)

    def _host(self, host: str) -> _Host:
        state = self._hosts.get(host)
        if state is None:
            state = self._hosts[host] = _Host(slots=trio.Semaphore(self.per_host))
        return state

    @asynccontextmanager
    async def slot(self, host: str, until: float = math.inf) -> AsyncIterator[None]:
        state = self._host(host)
        await self._enter(host, state, until)
        try:
            yield
        finally:
            state.slots.release()

    async def _enter(self, host: str, state: _Host, until: float) -> None:
        """A slot of ``host`` taken with its window open, or ``host_busy`` at ``until``."""
        with trio.move_on_at(until):
            while True:
                await self._wait_window(host, state, until)
                await state.slots.acquire()
                if state.not_before <= trio.current_time():
                    return
                state.slots.release()  # closed again while this request queued
        raise FetchFailure(Outcome.HOST_BUSY,
                           f"no free slot of {host} (--per-host {self.per_host}) in time")

    async def _wait_window(self, host: str, state: _Host, until: float) -> None:
        wait_until = state.not_before
        if wait_until <= trio.current_time():
            return
        if wait_until > until:
            raise FetchFailure(Outcome.HOST_BUSY,
                               f"{host} asked to wait ({state.outcome.value} to another "
                               f"request) past this request's queue bound")
        await trio.sleep_until(wait_until)

    def back_off(self, host: str, retry_after: float | None, outcome: Outcome) -> float:
        """Close ``host``'s window; returns the delay chosen."""
        state = self._host(host)
        if retry_after is None:
            delay = backoff_delay(state.strikes, base=self.base_delay, cap=self.max_delay,
                                  rng=self.rng)
        else:
            delay = min(retry_after, self.max_delay)
        state.strikes += 1
        state.outcome = outcome
        state.not_before = max(state.not_before, trio.current_time() + delay)
        return delay

    def recovered(self, host: str) -> None:
        self._host(host).strikes = 0

    def __len__(self) -> int:
        return len(self._hosts)
