"""``pairfarm search`` (one query, in this process) and ``pairfarm serve-search`` (the API
and page). Both load the index ``pairfarm index`` wrote and the CLIP model the farm
post-processed with; errors of the component become a one-line ``ClickException``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from search.errors import SearchError

DEFAULT_PORT = 8765


def _model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("index_dir", type=click.Path(file_okay=False, exists=True,
                                                    path_type=Path)),
        click.option("--model", envvar="PAIRFARM_MODEL", default="ViT-B-32", show_default=True,
                     help="open_clip model the embeddings were made with (local-dir:/hf-hub:)."),
        click.option("--pretrained", envvar="PAIRFARM_PRETRAINED", default="openai",
                     show_default=True, help="Its pretrained tag or checkpoint; 'none': random."),
        click.option("--device", envvar="PAIRFARM_DEVICE", default="auto", show_default=True,
                     help="auto (CUDA if present), cuda, cuda:N or cpu."),
        click.option("--source", envvar="PAIRFARM_SEARCH_SOURCE",
                     type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Embeddings folder the index was built from (default: as recorded "
                          "in its index.json); needed for near-duplicate collapse."),
        click.option("--images", envvar="PAIRFARM_SEARCH_IMAGES",
                     type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Folder of the post-processed shards' tars (default: beside the "
                          "embeddings)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except SearchError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


def _service(kw: dict[str, Any]) -> Any:
    from gpu_postprocess.errors import PostprocessError
    from gpu_postprocess.models import ModelSpec, load_clip, resolve_device
    from search.encoder import ClipEncoder
    from search.service import open_service

    pretrained = None if kw["pretrained"] in (None, "", "none") else kw["pretrained"]
    try:
        clip = load_clip(ModelSpec(kw["model"], pretrained), resolve_device(kw["device"]))
    except PostprocessError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    return open_service(kw["index_dir"], ClipEncoder(clip), source=kw["source"],
                        images=kw["images"])


@click.command("search")
@_model_options
@click.option("--text", default=None, help="Search by caption.")
@click.option("--url", default=None, help="Search by the image of the kept sample with this URL.")
@click.option("--image", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Search by an image file.")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="Results.")
@click.option("--safe/--unsafe", default=True, show_default=True,
              help="Safe mode: hide results with punsafe at or above --punsafe-threshold "
                   "(or without a score).")
@click.option("--punsafe-threshold", type=click.FloatRange(0, 1), default=0.5,
              show_default=True, help="Safe mode's punsafe cut.")
@click.option("--dedup/--no-dedup", default=True, show_default=True,
              help="Collapse near-duplicates (cosine >= 0.94, as clip-retrieval).")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
def search_command(**kw: Any) -> None:
    """Search INDEX_DIR by text, image file or a kept sample's URL; print the results."""
    from search.engine import Query

    with _errors():
        query = Query(k=kw["k"], safe=kw["safe"], punsafe_threshold=kw["punsafe_threshold"],
                      dedup=kw["dedup"])
        image = None if kw["image"] is None else kw["image"].read_bytes()
        results = _service(kw).search(query, text=kw["text"], url=kw["url"], image=image)
    if kw["as_json"]:
        click.echo(json.dumps({"results": [vars(h) for h in results.hits],
                               "candidates": results.candidates,
                               "unsafe_removed": results.unsafe_removed,
                               "duplicates_removed": results.duplicates_removed}))
        return
    for h in results.hits:
        click.echo(f"{h.similarity:.3f}  {h.url}  {h.caption}")


@click.command("serve-search")
@_model_options
@click.option("--host", envvar="PAIRFARM_SEARCH_HOST", default="127.0.0.1", show_default=True,
              help="Address to bind.")
@click.option("--port", envvar="PAIRFARM_SEARCH_PORT", type=click.IntRange(0, 65535),
              default=DEFAULT_PORT, show_default=True, help="Port to bind.")
def serve_search_command(**kw: Any) -> None:
    """Serve GET/POST /api/v1/search, the samples' images and a search page at /."""
    import uvicorn

    from search.server import create_app

    with _errors():
        app = create_app(_service(kw))
    uvicorn.run(app, host=kw["host"], port=kw["port"], log_level="info")
