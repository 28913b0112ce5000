"""robots.txt fetches per 10k URLs: the extra requests robots.txt costs a farm.

No real LAION URL list ships with the repository, so the URLs come from a generated host
distribution shaped like a LAION-400M sample (stated, not measured): ``--big`` hosts with
hundreds of URLs each (CDNs such as i.pinimg.com), the rest over a long tail where a
host's share falls as 1/rank^``--zipf`` over ``--tail`` hosts. The real ``RobotsCache``
runs (one fetch per origin however many URLs wait, the batch's lookup, the sharing), with
a fetcher that answers at once and counts, and an in-memory stand-in for the
coordinator's store.

Reported per 10k URLs: distinct origins; fetches for one worker; for ``--workers``
workers with their own caches (no sharing); and with the farm's shared cache, workers
one after the other (each batch looked up after the previous shared) and all at once
(every batch looked up before any answer is shared: the worst case at a farm's start).

    python -m bench.robots_requests --urls 10000 --workers 2 --batch 5000
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

import trio
import trio.lowlevel

from pairfarm.protocol import RobotsCached, RobotsEntry, RobotsKind
from worker.robotstxt import Found, RobotsCache
from worker.settings import RobotsSettings


def host_list(urls: int, big: int, tail: int, zipf: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    hosts = []
    for i in range(big):
        hosts += [f"cdn{i}.example.com"] * rng.randint(100, 400)
    weights = [1 / (rank + 1) ** zipf for rank in range(tail)]
    hosts += [f"site{n}.example.org" for n in
              rng.choices(range(tail), weights=weights, k=urls - len(hosts))]
    rng.shuffle(hosts)
    return [f"https://{host}/img/{i}.jpg" for i, host in enumerate(hosts)]


class CountingFetcher:
    """Answers every robots.txt at once with allow-all rules; counts the fetches."""

    def __init__(self) -> None:
        self.fetches = 0

    async def fetch(self, origin: str) -> Found:
        self.fetches += 1
        await trio.lowlevel.checkpoint()
        return Found(kind=RobotsKind.RULES, status=200, body="User-agent: *\nAllow: /")


class MemoryStore:
    """The coordinator's ``robots_txt`` table, in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, RobotsEntry] = {}
        self.calls: Counter[str] = Counter()

    async def lookup(self, origins: list[str]) -> list[RobotsCached]:
        self.calls["lookup"] += 1
        return [RobotsCached(origin=o, kind=e.kind, status=e.status, body=e.body,
                             expires_in_s=e.ttl_s) for o in origins if (e := self.rows.get(o))]

    async def store(self, entries: list[RobotsEntry]) -> None:
        self.calls["store"] += 1
        self.rows.update((e.origin, e) for e in entries)


async def run_batch(cache: RobotsCache, fetcher: CountingFetcher, urls: list[str],
                    prepare: bool = True) -> None:
    if prepare:
        await cache.prepare(urls)
    async with trio.open_nursery() as nursery:
        for url in urls:
            nursery.start_soon(cache.check, url, fetcher)
    await cache.flush()


async def scenarios(urls: list[str], workers: int, batch: int) -> dict[str, int]:
    batches = [urls[i:i + batch] for i in range(0, len(urls), batch)]
    out: dict[str, int] = {"distinct origins": len({u.split("/")[2] for u in urls})}
    one = CountingFetcher()
    cache = RobotsCache(RobotsSettings(), "pairfarm")
    for part in batches:
        await run_batch(cache, one, part)
    out["1 worker"] = one.fetches
    alone = [CountingFetcher() for _ in range(workers)]
    caches = [RobotsCache(RobotsSettings(), "pairfarm") for _ in range(workers)]
    for n, part in enumerate(batches):
        await run_batch(caches[n % workers], alone[n % workers], part)
    out[f"{workers} workers, own caches"] = sum(f.fetches for f in alone)
    for mode in ("one after the other", "all at once"):
        store = MemoryStore()
        fetchers = [CountingFetcher() for _ in range(workers)]
        caches = [RobotsCache(RobotsSettings(), "pairfarm", store) for _ in range(workers)]
        if mode == "all at once":
            for n, part in enumerate(batches):
                await caches[n % workers].prepare(part)
        for n, part in enumerate(batches):
            await run_batch(caches[n % workers], fetchers[n % workers], part,
                            prepare=mode != "all at once")
        out[f"{workers} workers, shared, {mode}"] = sum(f.fetches for f in fetchers)
        out[f"  coordinator calls ({mode})"] = sum(store.calls.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=6, help="hosts with 100-400 URLs each")
    parser.add_argument("--tail", type=int, default=200_000, help="long-tail hosts")
    parser.add_argument("--zipf", type=float, default=0.6, help="long-tail exponent")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    urls = host_list(args.urls, args.big, args.tail, args.zipf, args.seed)
    result = trio.run(scenarios, urls, args.workers, args.batch)
    scale = 10_000 / len(urls)
    print(f"{len(urls)} URLs, {args.big} big hosts + long tail of {args.tail} "
          f"(zipf {args.zipf}), batches of {args.batch}; robots.txt fetches per 10k URLs:")
    for name, value in result.items():
        print(f"  {name:45s} {value * scale:8.0f}")


if __name__ == "__main__":
    main()
