"""Search over a real index: a shard post-processed by the committed tiny CLIP, indexed by
``knn.build``, searched through the engine, the HTTP API (uvicorn in a thread), the CLI
and the page in headless Chromium."""

from __future__ import annotations

import base64
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpu_postprocess.models import ModelSpec, load_clip, resolve_device
from gpu_postprocess.node import process_shard
from gpu_postprocess.pipeline import build_scorer
from gpu_postprocess.settings import OutputSettings, ScoringSettings, parse_thresholds
from gpu_postprocess.shardio import open_local_shard
from gpu_postprocess.watermark import WatermarkKind, WatermarkSettings
from knn.build import BuildSettings, build_index
from search.dedup import duplicates
from search.encoder import ClipEncoder
from search.engine import Query
from search.errors import QueryError
from search.service import SearchService, open_service
from tests.conftest import free_port, run_cli
from tests.gpu_shards import write_shard
from tests.gpu_tiny import TINY_MODEL, evaluation_rows, gap
from tests.test_dashboard import CHROMIUM, chromium, needs_chromium

STEM = "00000009"
DUPLICATED = (0, 2, 4)  # matched evaluation rows repeated (same image, caption) at the end
UNSAFE_EVERY = 3  # every third kept sample gets punsafe 0.8 (others 0.05)


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Post-processed output (tars + embeddings) of evaluation pairs plus duplicates, with
    punsafe scores as a farm with an NSFW model has them, and its index in ``index/``."""
    root = tmp_path_factory.mktemp("farm")
    rows, match = evaluation_rows()
    matched = [i for i, m in enumerate(match) if m]
    rows += [rows[matched[i]] for i in DUPLICATED]
    files = write_shard(root / "shards", 9, rows)
    settings = ScoringSettings(
        model=ModelSpec(TINY_MODEL), device="cpu", batch_size=16, workers=0,
        thresholds=parse_thresholds([f"*={gap()['threshold']}", f"en={gap()['threshold']}"]),
        watermark=WatermarkSettings(kind=WatermarkKind.OFF))
    shard = open_local_shard(Path(files.tar), Path(files.parquet))
    process_shard(build_scorer(settings), shard, 9, OutputSettings(out_dir=root / "out"))
    _score_punsafe(root / "out" / "embeddings" / "metadata" / f"metadata_{STEM}.parquet")
    build_index(root / "out", root / "index", BuildSettings(budget=2**30, eval_queries=20))
    return root


def _score_punsafe(path: Path) -> None:
    """The 32-d tiny CLIP has no NSFW model: give the rows the scores one would."""
    table = pq.read_table(path)
    punsafe = [0.8 if i % UNSAFE_EVERY == 0 else 0.05 for i in range(table.num_rows)]
    labels = ["UNSURE" if p > 0.5 else "UNLIKELY" for p in punsafe]
    table = table.set_column(table.column_names.index("punsafe"), "punsafe",
                             pa.array(punsafe, pa.float32()))
    table = table.set_column(table.column_names.index("NSFW"), "NSFW", pa.array(labels))
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def service(farm: Path) -> SearchService:
    clip = load_clip(ModelSpec(TINY_MODEL), resolve_device("cpu"))
    return open_service(farm / "index", ClipEncoder(clip))


def _kept(farm: Path) -> list[dict[str, object]]:
    path = farm / "out" / "embeddings" / "metadata" / f"metadata_{STEM}.parquet"
    return pq.read_table(path).to_pylist()


def _duplicate_urls() -> list[tuple[str, str]]:
    """(original, copy) URLs of the repeated samples (``write_shard`` names URLs by row)."""
    rows, match = evaluation_rows()
    matched = [i for i, m in enumerate(match) if m]
    return [(f"http://127.0.0.1/img/{matched[i]}.jpg", f"http://127.0.0.1/img/{len(rows) + j}.jpg")
            for j, i in enumerate(DUPLICATED)]


def test_dedup_collapses_connected_components_at_0_94() -> None:
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([np.cos(0.3), np.sin(0.3), 0.0])  # cos(a, b) = 0.955
    c = np.array([np.cos(0.6), np.sin(0.6), 0.0])  # cos(b, c) = 0.955, cos(a, c) = 0.825
    far = np.array([0.0, 0.0, 1.0])
    edge = np.array([0.94, np.sqrt(1 - 0.94**2), 0.0])  # cos(a, edge) = 0.94 exactly
    assert duplicates(np.stack([a, far, b, c])) == [2, 3]  # chain a~b~c: b and c go
    assert duplicates(np.stack([a, c])) == []
    assert duplicates(np.stack([a, edge]).astype(np.float32), 0.94 - 1e-6) == [1]
    assert duplicates(np.zeros((0, 3))) == []


def test_a_kept_samples_image_finds_itself_first(farm: Path, service: SearchService) -> None:
    kept = _kept(farm)
    target = kept[1]  # punsafe 0.05: shown in safe mode
    results = service.search(Query(k=5), url=str(target["url"]))
    assert results.hits[0].url == target["url"]
    assert results.hits[0].similarity == pytest.approx(1.0, abs=1e-3)
    assert results.hits[0].caption == target["caption"]
    assert results.hits[0].punsafe == pytest.approx(0.05)
    assert results.hits[0].pwatermark is None  # watermark off: empty, not invented
    sims = [h.similarity for h in results.hits]
    assert sims == sorted(sims, reverse=True)


def test_safe_mode_hides_unsafe_and_unscored_results(farm: Path,
                                                     service: SearchService) -> None:
    caption = str(_kept(farm)[0]["caption"])
    everything = service.search(Query(k=200, safe=False, dedup=False), text=caption)
    unsafe = [h for h in everything.hits if h.punsafe is not None and h.punsafe >= 0.5]
    assert unsafe and everything.unsafe_removed == 0
    safe = service.search(Query(k=200, dedup=False), text=caption)
    assert all(h.punsafe is not None and h.punsafe < 0.5 for h in safe.hits)
    assert safe.unsafe_removed == len(unsafe)
    assert [h.id for h in safe.hits] == [h.id for h in everything.hits if h not in unsafe]
    lenient = service.search(Query(k=200, dedup=False, punsafe_threshold=0.9), text=caption)
    assert len(lenient.hits) == len(everything.hits)


def test_near_duplicates_collapse_to_the_best_ranked(farm: Path, service: SearchService) -> None:
    pairs = _duplicate_urls()
    kept_urls = {row["url"] for row in _kept(farm)}
    assert all(a in kept_urls and b in kept_urls for a, b in pairs)
    plain = service.search(Query(k=200, safe=False, dedup=False), url=pairs[0][0])
    assert {h.url for h in plain.hits[:2]} == set(pairs[0])  # both, at cosine 1
    collapsed = service.search(Query(k=200, safe=False), url=pairs[0][0])
    urls = [h.url for h in collapsed.hits]
    assert urls[0] == plain.hits[0].url and plain.hits[1].url not in urls
    assert collapsed.duplicates_removed >= 1
    assert len(collapsed.hits) == len(plain.hits) - collapsed.duplicates_removed


def test_bad_queries_are_refused(service: SearchService) -> None:
    with pytest.raises(QueryError, match="exactly one"):
        service.search(Query())
    with pytest.raises(QueryError, match="exactly one"):
        service.search(Query(), text="a", url="http://x")
    with pytest.raises(QueryError, match="no indexed sample"):
        service.search(Query(), url="http://127.0.0.1/never-seen.jpg")
    with pytest.raises(QueryError, match="does not decode"):
        service.search(Query(), image=b"not an image")
    with pytest.raises(QueryError, match="k must be"):
        Query(k=0)


class Server:
    """``search.server``'s app under uvicorn in a thread of this process."""

    def __init__(self, service: SearchService) -> None:
        import uvicorn

        from search.server import create_app

        self.port = free_port()
        config = uvicorn.Config(create_app(service), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        with httpx.Client() as client:
            for _ in range(200):
                try:
                    client.get(f"{self.url}/healthz", timeout=1).raise_for_status()
                    return self
                except httpx.TransportError:
                    self.thread.join(0.05)
        raise AssertionError("search server did not start")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(service: SearchService) -> Iterator[Server]:
    with Server(service) as running:
        yield running


def test_api_answers_get_and_post_with_safe_mode_and_dedup(farm: Path, server: Server) -> None:
    kept = _kept(farm)
    caption = str(kept[0]["caption"])
    with httpx.Client(base_url=server.url, timeout=30) as client:
        unfiltered = client.get("/api/v1/search", params={
            "text": caption, "k": 200, "safe": "false", "dedup": "false"}).json()
        safe = client.get("/api/v1/search", params={"text": caption, "k": 200}).json()
        posted = client.post("/api/v1/search", json={"text": caption, "k": 200}).json()
        image = (farm / "out" / f"{STEM}.tar")
        with tarfile.open(image) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
            jpeg = tar.extractfile(member).read()  # type: ignore[union-attr]
        by_image = client.post("/api/v1/search", json={
            "image_base64": base64.b64encode(jpeg).decode(), "k": 3, "safe": False}).json()
        thumb = client.get(by_image["results"][0]["image"])
        errors = [client.get("/api/v1/search").status_code,
                  client.post("/api/v1/search", json={"image_base64": "@@@"}).status_code,
                  client.get("/api/v1/search", params={"text": "x", "k": 0}).status_code,
                  client.get("/api/v1/images/999999").status_code]
    assert len(unfiltered["results"]) == len(kept)  # k above the index: every sample
    assert set(unfiltered["results"][0]) == {"id", "url", "caption", "similarity", "punsafe",
                                             "pwatermark", "image"}
    assert safe == posted
    assert safe["unsafe_removed"] > 0 and safe["duplicates_removed"] > 0
    assert all(r["punsafe"] < 0.5 for r in safe["results"])
    assert len(safe["results"]) == (len(kept) - safe["unsafe_removed"]
                                    - safe["duplicates_removed"])
    assert by_image["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content == jpeg
    assert errors == [400, 400, 422, 404]


@needs_chromium
def test_search_page_in_headless_chromium_shows_results_with_thumbnails(
        farm: Path, server: Server, tmp_path: Path) -> None:
    caption = str(_kept(farm)[0]["caption"])
    with httpx.Client(base_url=server.url, timeout=30) as client:
        api = client.get("/api/v1/search", params={"text": caption, "k": 12}).json()
    dom = chromium(f"{server.url}/?{httpx.QueryParams({'text': caption, 'k': 12})}",
                   tmp_path, "--dump-dom")
    assert 'data-state="done"' in dom
    ids = [int(i) for i in _attr_values(dom, "data-id")]
    assert ids == [r["id"] for r in api["results"]] and ids
    loaded = _attr_values(dom, "data-loaded")
    assert len(loaded) == len(ids) and all(v.isdigit() and int(v) > 0 for v in loaded)
    for r in api["results"]:
        assert str(r["caption"]) in dom
    assert f"{len(ids)} results ({api['unsafe_removed']} unsafe hidden" in dom
    assert CHROMIUM.exists()


def _attr_values(dom: str, name: str) -> list[str]:
    import re

    return re.findall(rf'{name}="([^"]*)"', dom)


def test_cli_search_prints_the_results_as_json(farm: Path) -> None:
    url = str(_kept(farm)[1]["url"])
    proc = run_cli("search", str(farm / "index"), "--url", url, "-k", "3", "--model",
                   TINY_MODEL, "--device", "cpu", "--json", timeout=120)
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["results"][0]["url"] == url
    assert len(answer["results"]) == 3
    bad = run_cli("search", str(farm / "index"), "--model", TINY_MODEL, "--device", "cpu",
                  check=False)
    assert bad.returncode == 1 and "QueryError: give exactly one" in bad.stderr


def test_readme_documents_every_search_flag_and_envvar() -> None:
    from search.command import search_command, serve_search_command
    from tests.docs_text import docs_text

    doc = docs_text()
    for command in (search_command, serve_search_command):
        assert f"pairfarm {command.name}" in doc
        for param in command.params:
            if isinstance(param, click.Option):
                assert any(f"`{opt}" in doc for opt in param.opts), param.opts
                if param.envvar:
                    assert f"`{param.envvar}`" in doc, param.envvar
