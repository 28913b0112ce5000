"""Politeness per host: a concurrency limit and a backoff window for each host name.

Resource handling: one ``HostGate`` lives for one batch; it holds a semaphore and a
"not before" time per host seen in that batch.
"""

from __future__ import annotations

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
    from now (a server's ``Retry-After``), or to a jittered exponential delay when the
    server named none. A request whose deadline ends before the window opens fails at
    once with the outcome that closed the window, instead of holding a slot.
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
    async def slot(self, host: str) -> AsyncIterator[None]:
        state = self._host(host)
        await self._wait_window(host, state)
        async with state.slots:
            yield

    async def _wait_window(self, host: str, state: _Host) -> None:
        wait_until = state.not_before
        if wait_until <= trio.current_time():
            return
        deadline = trio.current_effective_deadline()
        if wait_until > deadline:
            raise FetchFailure(state.outcome, f"{host} asked to wait past this request's deadline")
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
