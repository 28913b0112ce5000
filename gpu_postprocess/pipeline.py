"""Scoring a shard: CLIP embeddings, similarity, NSFW and watermark tags, keep/drop.

``build_scorer`` loads every model once per node; ``score_shard`` streams a shard's ``ok``
samples through the decode workers (``decode.make_loader``) and the models in batches
(``inference_mode``, autocast on GPU), and ``decide`` applies the per-language thresholds
to every row of the shard (failed downloads included, with their drop reason). On the
device path (``--decode``, ``device_decode``) the workers only read and tokenize, and the
JPEGs are decoded and preprocessed on the model's device a few batches ahead.

Languages routed by ``--text-model`` are scored by their own model (image and text
towers); the exported embeddings always come from the primary model, so that one
embedding folder holds one embedding space.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from gpu_postprocess import nsfw
from gpu_postprocess.decode import ShardSamples, Transform, make_loader
from gpu_postprocess.device_decode import (
    DeviceBatcher,
    ImageSpec,
    Prefetcher,
    RawShardSamples,
    collate_raw,
    resolve_decode,
)
from gpu_postprocess.errors import SettingsError
from gpu_postprocess.models import (
    ClipModel,
    ModelSpec,
    load_clip,
    resolve_device,
    resolve_precision,
)
from gpu_postprocess.scoring import DropReason, Thresholds, keep_mask, normalize_language
from gpu_postprocess.settings import ScoringSettings
from gpu_postprocess.shardio import Shard
from gpu_postprocess.watermark import EfficientNetWatermark, Watermark, load_watermark

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]


@dataclass
class Scorer:
    """The loaded models of a node."""

    primary: ClipModel
    routes: dict[str, ClipModel]
    thresholds: Thresholds
    nsfw: nsfw.NsfwDetector | None
    watermark: Watermark | None
    settings: ScoringSettings
    #: how the device preprocesses each of ``image_inputs``; None: decode on the CPU
    device_specs: list[ImageSpec] | None = None

    def model_for(self, language: str) -> ClipModel:
        """The model scoring ``language``: its own route, else English's (the primary
        unless routed), else the ``*`` route, else the primary model."""
        if language in self.routes:
            return self.routes[language]
        if language == "en":
            return self.primary
        return self.routes.get("*", self.primary)


def build_scorer(settings: ScoringSettings) -> Scorer:
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    primary = load_clip(settings.model, device, precision)
    routes = _load_routes(settings.text_models, primary, device, precision)
    detector = nsfw.detector_for_dim(primary.embed_dim, device) if settings.nsfw else None
    if settings.nsfw and detector is None:
        log.warning("no NSFW model for %d-d embeddings (shipped: 512 ViT-B/32, 768 ViT-L/14): "
                    "punsafe left empty", primary.embed_dim)
    scorer = Scorer(primary=primary, routes=routes, thresholds=settings.thresholds,
                    nsfw=detector, watermark=load_watermark(settings.watermark, device),
                    settings=settings)
    transforms, _ = image_inputs(scorer)
    scorer.device_specs = resolve_decode(settings.decode, device, transforms)
    return scorer


def _load_routes(text_models: dict[str, ModelSpec], primary: ClipModel, device: torch.device,
                 precision: str) -> dict[str, ClipModel]:
    loaded: dict[ModelSpec, ClipModel] = {primary.spec: primary}
    for spec in set(text_models.values()) - {primary.spec}:
        loaded[spec] = load_clip(spec, device, precision)
        if repr(loaded[spec].preprocess) != repr(primary.preprocess):
            raise SettingsError(f"--text-model {spec} preprocesses images differently from "
                                f"{primary.spec}; routed models must share the preprocessing")
    return {lang: loaded[spec] for lang, spec in text_models.items() if spec != primary.spec}


@dataclass
class ShardScores:
    """Scores of the ``ok`` rows of a shard, ``rows[j]`` being the shard row of entry j."""

    rows: npt.NDArray[np.int64]
    decoded: npt.NDArray[np.bool_]
    img_emb: F32
    text_emb: F32
    similarity: F32
    punsafe: F32  # NaN: not tagged
    pwatermark: F32  # NaN: not tagged
    languages: list[str] = field(default_factory=list)


def score_shard(scorer: Scorer, shard: Shard, *, on_batch: Callable[[int], None] | None = None,
                ) -> ShardScores:
    """Score every ``ok`` row of ``shard``. ``on_batch(n)`` is called after each batch of n
    samples (progress, lease checks: it may raise to abort)."""
    rows = np.array(shard.ok_rows(), dtype=np.int64)
    languages = [normalize_language(v) for v in shard.column("language")]
    captions = [str(c or "") for c in shard.column("caption")]
    acc = _Accumulator(len(rows), scorer.primary.embed_dim)
    with _batches(scorer, shard, rows, captions) as batches:
        for batch in batches:
            _score_batch(scorer, batch, rows, captions=captions, languages=languages, acc=acc)
            if on_batch is not None:
                on_batch(len(batch[0]))
    return acc.result(rows, languages)


@contextlib.contextmanager
def _batches(scorer: Scorer, shard: Shard, rows: npt.NDArray[np.int64],
             captions: list[str]) -> Iterator[Any]:
    """Batches ``[index, decoded, tokens, *images]``: decoded on the CPU by the loader's
    workers, or on the device a few batches ahead of the model."""
    transforms, shapes = image_inputs(scorer)
    keys = shard.keys
    members = [shard.image_member(keys[r])[1] for r in rows]
    kind = ShardSamples if scorer.device_specs is None else RawShardSamples
    dataset = kind(shard.tar_path, members, [captions[r] for r in rows],
                   transforms=transforms, tokenizer=scorer.primary.tokenizer, shapes=shapes)
    device = scorer.primary.device
    settings = scorer.settings
    try:
        if scorer.device_specs is None:
            yield make_loader(dataset, settings.batch_size, settings.workers,
                              device.type == "cuda")
            return
        loader = make_loader(dataset, settings.batch_size, settings.workers, False,
                             collate_fn=collate_raw)
        batcher = DeviceBatcher(device, scorer.device_specs, transforms, shapes)
        with Prefetcher(loader, batcher, device, settings.prefetch) as batches:
            yield batches
    finally:
        dataset.close()


def image_inputs(scorer: Scorer) -> tuple[list[Transform], list[tuple[int, ...]]]:
    """The image tensors each sample needs: CLIP's, and the EfficientNet watermark
    model's when it runs; their transforms and shapes."""
    transforms: list[Transform] = [scorer.primary.preprocess]
    shapes: list[tuple[int, ...]] = [_image_shape(scorer.primary)]
    if isinstance(scorer.watermark, EfficientNetWatermark):
        transforms.append(scorer.watermark.transform)
        shapes.append(scorer.watermark.input_shape)
    return transforms, shapes


def _image_shape(model: ClipModel) -> tuple[int, ...]:
    size = model.model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return (3, int(h), int(w))


class _Accumulator:
    def __init__(self, n: int, dim: int) -> None:
        self.decoded = np.zeros(n, dtype=bool)
        self.img = np.zeros((n, dim), dtype=np.float32)
        self.txt = np.zeros((n, dim), dtype=np.float32)
        self.sim = np.full(n, np.nan, dtype=np.float32)
        self.punsafe = np.full(n, np.nan, dtype=np.float32)
        self.pwatermark = np.full(n, np.nan, dtype=np.float32)

    def result(self, rows: npt.NDArray[np.int64], languages: list[str]) -> ShardScores:
        return ShardScores(rows=rows, decoded=self.decoded, img_emb=self.img, text_emb=self.txt,
                           similarity=self.sim, punsafe=self.punsafe,
                           pwatermark=self.pwatermark, languages=languages)


def _score_batch(scorer: Scorer, batch: list[torch.Tensor], rows: npt.NDArray[np.int64], *,
                 captions: list[str], languages: list[str], acc: _Accumulator) -> None:
    idx = batch[0].numpy()
    decoded = batch[1].numpy().astype(bool)
    images = batch[3]
    img, txt = scorer.primary.encode(images, batch[2])
    assert img is not None and txt is not None
    sim = (img * txt).sum(-1)
    _route(scorer, images, idx=idx, rows=rows, captions=captions, languages=languages,
           sim=sim)
    img_np = img.cpu().numpy()
    acc.decoded[idx] = decoded
    acc.img[idx] = img_np
    acc.txt[idx] = txt.cpu().numpy()
    acc.sim[idx] = np.where(decoded, sim.cpu().numpy(), np.nan)
    if scorer.nsfw is not None:
        acc.punsafe[idx] = np.where(decoded, scorer.nsfw.score(img_np), np.nan)
    if scorer.watermark is not None:
        acc.pwatermark[idx] = np.where(decoded, _watermark(scorer.watermark, batch, img_np),
                                       np.nan)


def _watermark(model: Watermark, batch: list[torch.Tensor], img_np: F32) -> F32:
    if isinstance(model, EfficientNetWatermark):
        return model.score_images(batch[4])
    return model.score_embeddings(img_np)


def _route(scorer: Scorer, images: torch.Tensor, *, idx: npt.NDArray[np.int64],
           rows: npt.NDArray[np.int64], captions: list[str], languages: list[str],
           sim: torch.Tensor) -> None:
    """Overwrite ``sim`` for the samples whose language has its own model."""
    if not scorer.routes:
        return
    chosen = [scorer.model_for(languages[rows[i]]) for i in idx]
    for model in {id(m): m for m in scorer.routes.values()}.values():
        sel = [j for j, m in enumerate(chosen) if m is model]
        if not sel:
            continue
        tokens = model.tokenizer([captions[rows[idx[j]]] for j in sel])
        img, txt = model.encode(images[sel], tokens)
        assert img is not None and txt is not None
        sim[torch.tensor(sel, device=sim.device)] = (img * txt).sum(-1).to(sim.device)


@dataclass
class Decisions:
    """One entry per shard row."""

    keep: npt.NDArray[np.bool_]
    reason: list[str]
    similarity: F32
    threshold: F32


def decide(shard: Shard, scores: ShardScores, thresholds: Thresholds) -> Decisions:
    n = shard.table.num_rows
    sim = np.full(n, np.nan, dtype=np.float32)
    sim[scores.rows] = scores.similarity
    thr = thresholds.for_languages(scores.languages or [None] * n)
    keep = np.zeros(n, dtype=bool)
    keep[scores.rows] = scores.decoded & keep_mask(scores.similarity, thr[scores.rows])
    reason = [DropReason.NOT_DOWNLOADED.value] * n
    for j, r in enumerate(scores.rows.tolist()):
        reason[r] = (DropReason.KEPT.value if keep[r] else
                     DropReason.LOW_SIMILARITY.value if scores.decoded[j] else
                     DropReason.DECODE_ERROR.value)
    return Decisions(keep=keep, reason=reason, similarity=sim, threshold=thr)
