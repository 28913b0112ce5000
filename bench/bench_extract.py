"""Benchmark of ``pairfarm extract`` against a straightforward warcio + json loop.

Writes synthetic WAT files sized like Common Crawl's (``--pages`` pages per file, 3 WAT
records per page, ~70 links per page of which ~12 are <img>), then measures on the same
files, in this one process run:

1. reading: records/s of fastwarc + orjson (what extract uses) vs warcio + json;
2. one core: ``extract.fileworker.process_file`` (the whole per-file pipeline: read, parse,
   filter, resolve, in-file dedup, language) vs the straightforward loop (warcio + json +
   the same filters + the same py3langid call per candidate), both in this process;
3. the whole run: ``run_extract`` with 1 and with ``--workers`` processes (process start,
   model load, run-wide dedup, Bloom filter, parquet shards included).

Usage: python bench/bench_extract.py [--files 2] [--pages 40000] [--workers N]
Files are cached under bench/out/ (gitignored) by size.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import random
import sys
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extract.watbuild import Img, WatBuilder, WatPage

OUT = Path(__file__).resolve().parent / "out"
VOCABULARY = {  # caption words per language, drawn with these weights
    "en": "a red car the old house in summer with blue sky small dog on beach photo of woman",
    "de": "ein rotes Auto das alte Haus im Sommer mit blauem Himmel kleiner Hund am Strand",
    "fr": "une voiture rouge la vieille maison en été avec ciel bleu petit chien sur la plage",
    "es": "un coche rojo la casa vieja en verano con cielo azul perro pequeño en la playa",
}
LANGUAGE_WEIGHTS = (0.55, 0.15, 0.15, 0.15)


def synthetic_caption(rng: random.Random) -> str:
    language = rng.choices(list(VOCABULARY), LANGUAGE_WEIGHTS)[0]
    return " ".join(rng.choices(VOCABULARY[language].split(), k=rng.randrange(2, 12)))


def synthetic_page(rng: random.Random, i: int) -> WatPage:
    host = f"site{rng.randrange(5000)}.example.com"
    page_url = f"https://{host}/articles/{i}/index.html"
    images = [synthetic_img(rng, host) for _ in range(rng.randrange(4, 20))]
    anchors = [f"/articles/{rng.randrange(10**6)}/" for _ in range(rng.randrange(30, 90))]
    base = f"https://cdn.{host}/assets/" if rng.random() < 0.05 else None
    return WatPage(page_url, images, base, anchors, title=synthetic_caption(rng))


def synthetic_img(rng: random.Random, host: str) -> Img:
    roll = rng.random()
    src = (f"/img/{rng.randrange(10**7)}.jpg" if roll < 0.5
           else f"https://{host}/media/{rng.randrange(10**7)}.png" if roll < 0.8
           else f"//static.{host}/{rng.randrange(10**5)}.webp" if roll < 0.95
           else "data:image/gif;base64,R0lGODlhAQABAAAAACw=")
    alt_roll = rng.random()
    alt = (None if alt_roll < 0.25 else "" if alt_roll < 0.35 else "logo" if alt_roll < 0.45
           else synthetic_caption(rng))
    return Img(src, alt)


def make_files(count: int, pages: int) -> list[Path]:
    OUT.mkdir(exist_ok=True)
    paths = []
    for n in range(count):
        path = OUT / f"synthetic-{pages}-{n}.wat.gz"
        if not path.exists():
            rng = random.Random(n)
            tmp = path.with_suffix(".tmp")
            with WatBuilder(tmp) as builder:
                for i in range(pages):
                    builder.page(synthetic_page(rng, i))
            tmp.rename(path)
        paths.append(path)
    return paths


def read_fastwarc(path: Path) -> int:
    import orjson

    from extract.wat import iter_payloads

    return sum(1 for payload in iter_payloads(str(path)) if orjson.loads(payload))


def read_warcio(path: Path) -> int:
    from warcio.archiveiterator import ArchiveIterator

    count = 0
    with path.open("rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type == "metadata":
                json.loads(record.content_stream().read())
                count += 1
    return count


def straightforward_loop(path: Path, labeller: object) -> tuple[int, int]:
    """What one writes first: warcio, json, dict lookups, urljoin, the same filters."""
    from warcio.archiveiterator import ArchiveIterator

    records = kept = 0
    seen: set[tuple[str, str]] = set()
    with path.open("rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type != "metadata":
                continue
            records += 1
            try:
                env = json.loads(record.content_stream().read())["Envelope"]
                meta = env["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]
            except (KeyError, ValueError):
                continue
            page = env["WARC-Header-Metadata"]["WARC-Target-URI"]
            base = urljoin(page, meta.get("Head", {}).get("Base") or page)
            for link in meta.get("Links", []):
                if link.get("path") != "IMG@/src" or not link.get("alt"):
                    continue
                alt = " ".join(html.unescape(link["alt"]).split())
                url = urljoin(base, link["url"])
                if len(alt) < 5 or urlsplit(url).scheme not in ("http", "https"):
                    continue
                if (url, alt) not in seen:
                    seen.add((url, alt))
                    labeller.label(alt)  # type: ignore[attr-defined]
                    kept += 1
    return records, kept


def timed(fn, *args):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--pages", type=int, default=40_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    from extract.dedup import KeyMode
    from extract.fileworker import FileSettings, labeller, process_file
    from extract.sources import HttpPolicy

    start = time.perf_counter()
    files = make_files(args.files, args.pages)
    size = sum(p.stat().st_size for p in files)
    print(f"files: {len(files)} x {args.pages} pages, {size / 2**20:.1f} MiB gzipped "
          f"(ready in {time.perf_counter() - start:.1f} s)")
    first = files[0]

    n, t_fw = timed(read_fastwarc, first)
    _, t_wi = timed(read_warcio, first)
    print(f"read+parse   fastwarc+orjson {n / t_fw:10,.0f} records/s   "
          f"warcio+json {n / t_wi:10,.0f} records/s   ratio {t_wi / t_fw:.2f}x")

    settings = FileSettings(5, 0.5, KeyMode.URL_ALT, HttpPolicy())
    labeller(0.5)  # load the model outside the timings
    result, t_ex = timed(process_file, str(first), settings)
    (records, kept), t_base = timed(straightforward_loop, first, labeller(0.5))
    ours_kept = result.table.num_rows
    assert records == result.counts.records and kept == ours_kept, (records, kept, ours_kept)
    print(f"one core     extract {records / t_ex:10,.0f} records/s {ours_kept / t_ex:9,.0f} "
          f"candidates/s   straightforward {records / t_base:10,.0f} records/s "
          f"{kept / t_base:9,.0f} candidates/s   ratio {t_base / t_ex:.2f}x")

    for workers in sorted({1, args.workers}):
        run_all(files, workers)


def run_all(files: list[Path], workers: int) -> None:
    import tempfile

    from rich.console import Console

    from extract.runner import run_extract
    from extract.settings import build_settings

    with tempfile.TemporaryDirectory() as out:
        settings = build_settings(
            sources=[str(p) for p in files], out_dir=Path(out), workers=workers,
            rows_per_shard=1_000_000, min_alt_chars=5, language_threshold=0.5,
            dedup_key="url+alt", bloom_path=None, use_bloom=True, bloom_capacity=10_000_000,
            bloom_fpr=0.01, ingest=False,
        )
        run = run_extract(settings, Console(file=open(os.devnull, "w")))  # noqa: SIM115
    c = run.counts
    print(f"whole run    {workers} worker(s), {len(files)} files: {c.records / run.elapsed_s:,.0f} "
          f"records/s, {c.kept / run.elapsed_s:,.0f} candidates/s "
          f"({c.records / run.elapsed_s / workers:,.0f} / "
          f"{c.kept / run.elapsed_s / workers:,.0f} per core), {run.elapsed_s:.1f} s, "
          f"{c.kept:,} kept of {c.images:,} images")
    print(json.dumps({"dropped": dict(c.dropped), "languages": dict(c.languages.most_common(5))}))


if __name__ == "__main__":
    main()
