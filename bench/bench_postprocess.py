"""Benchmark of the post-processing stage: end-to-end samples/s from a download shard to
every output, against the model-only ceiling and against clip-retrieval's inference.

    .venv/bin/python bench/bench_postprocess.py [--samples 512] [--batch-size 64]
        [--workers 1] [--device cpu] [--clip-retrieval-python .venv-cr/bin/python]

All three run ViT-B-32 with random weights (``--pretrained none``: the same compute as the
real model; no weights can be downloaded here) on the same shard of 256x256 JPEGs:

- ceilings: the model alone in a tight loop on tensors decoded and preprocessed
  beforehand, twice: open_clip's own ``encode_image`` + ``encode_text``, and pairfarm's
  model calls (``ClipModel.encode``: the text tower trimmed to the longest caption);
- pairfarm: ``process_shard``: read the tar, decode + preprocess in worker processes,
  both towers, NSFW tag, keep/drop, filtered tar + parquet + embeddings written;
- clip-retrieval: ``clip_retrieval.clip_inference.main`` on the same tar (webdataset
  input, image + text + metadata), run in its own virtual environment by
  ``bench/clip_retrieval_runner.py``, model-loading time subtracted.

Prints one line per figure and the ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpu_postprocess.decode import decode_image  # noqa: E402
from gpu_postprocess.models import ModelSpec  # noqa: E402
from gpu_postprocess.node import process_shard  # noqa: E402
from gpu_postprocess.pipeline import Scorer, build_scorer  # noqa: E402
from gpu_postprocess.settings import OutputSettings, ScoringSettings, parse_thresholds  # noqa: E402
from gpu_postprocess.shardio import open_local_shard  # noqa: E402
from gpu_postprocess.watermark import WatermarkKind, WatermarkSettings  # noqa: E402
from localfarm import synthetic  # noqa: E402
from tests.gpu_shards import Row, write_shard  # noqa: E402

OUT = REPO / "bench" / "out" / "postprocess"
BATCH_ID = 1


def jpeg_256(rng: np.random.Generator) -> bytes:
    """A 256x256 JPEG with texture (about the size of a resized web image)."""
    sample = synthetic.matched(rng)
    img = sample.image.resize((256, 256), Image.Resampling.BICUBIC)
    noise = rng.integers(0, 40, size=(256, 256, 3), dtype=np.uint8)
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise - 20, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shard(n: int) -> Path:
    rng = np.random.default_rng(0)
    rows = [Row(caption=str(rng.choice(synthetic.TEMPLATES)).format(c="red", s="circle"),
                image=jpeg_256(rng)) for _ in range(n)]
    folder = OUT / "shard"
    write_shard(folder, BATCH_ID, rows)
    return folder


def ceiling(scorer: Scorer, shard_dir: Path, batch_size: int) -> tuple[float, float]:
    """samples/s of (open_clip's own encode_image + encode_text, pairfarm's model calls)
    in a tight loop on ready tensors."""
    import torch

    shard = open_local_shard(shard_dir / f"{BATCH_ID:08d}.tar",
                             shard_dir / f"{BATCH_ID:08d}.parquet")
    clip = scorer.primary
    keys = shard.keys
    images = torch.stack([clip.preprocess(decode_image(shard.read(shard.image_member(k)[1])))
                          for k in keys])
    tokens = clip.tokenizer([str(c) for c in shard.column("caption")])

    def plain(img: torch.Tensor, tok: torch.Tensor) -> None:
        with torch.inference_mode():
            clip.model.encode_image(img)
            clip.model.encode_text(tok)

    rates = []
    for call in (plain, clip.encode):
        call(images[:batch_size], tokens[:batch_size])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(keys), batch_size):
            call(images[i:i + batch_size], tokens[i:i + batch_size])
        rates.append(len(keys) / (time.perf_counter() - start))
    return rates[0], rates[1]


def end_to_end(scorer: Scorer, shard_dir: Path) -> float:
    shard = open_local_shard(shard_dir / f"{BATCH_ID:08d}.tar",
                             shard_dir / f"{BATCH_ID:08d}.parquet")
    start = time.perf_counter()
    written = process_shard(scorer, shard, BATCH_ID, OutputSettings(out_dir=OUT / "pairfarm"))
    elapsed = time.perf_counter() - start
    assert written.summary["kept"] + written.summary["dropped"] == shard.table.num_rows
    return shard.table.num_rows / elapsed


def clip_retrieval(python: str, shard_dir: Path, n: int, batch_size: int,
                   workers: int) -> float | None:
    runner = REPO / "bench" / "clip_retrieval_runner.py"
    cmd = [python, str(runner), "--tar", str(shard_dir / f"{BATCH_ID:08d}.tar"),
           "--out", str(OUT / "clip_retrieval"), "--batch-size", str(batch_size),
           "--workers", str(workers), "--result", str(OUT / "clip_retrieval.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"clip-retrieval failed:\n{proc.stderr[-3000:]}")
        return None
    result = json.loads((OUT / "clip_retrieval.json").read_text())
    assert result["count"] == n, result
    return float(n / (result["total_s"] - result["load_s"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate the measurements this many times, keep each best "
                             "(a shared machine's load varies over a run)")
    parser.add_argument("--clip-retrieval-python", default=None,
                        help="python of a virtual environment with clip-retrieval installed")
    args = parser.parse_args()
    shard_dir = make_shard(args.samples)
    settings = ScoringSettings(
        model=ModelSpec("ViT-B-32", None), device=args.device, batch_size=args.batch_size,
        workers=args.workers, thresholds=parse_thresholds([]),
        watermark=WatermarkSettings(kind=WatermarkKind.OFF))
    scorer = build_scorer(settings)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, device {args.device}, "
          f"{args.samples} samples, batch {args.batch_size}, {args.workers} decode workers")
    runs: dict[str, list[float]] = {"open_clip": [], "model": [], "e2e": [], "cr": []}
    for i in range(args.repeat):
        open_clip_only, model_only = ceiling(scorer, shard_dir, args.batch_size)
        runs["open_clip"].append(open_clip_only)
        runs["model"].append(model_only)
        runs["e2e"].append(end_to_end(scorer, shard_dir))
        if args.clip_retrieval_python:
            theirs = clip_retrieval(args.clip_retrieval_python, shard_dir, args.samples,
                                    args.batch_size, args.workers)
            if theirs is not None:
                runs["cr"].append(theirs)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items() if v))
    open_clip_only, model_only, ours = (max(runs[k]) for k in ("open_clip", "model", "e2e"))
    print(f"best of {args.repeat}:")
    print(f"ceiling, open_clip encode_image+encode_text: {open_clip_only:8.2f} samples/s")
    print(f"ceiling, pairfarm's model calls            : {model_only:8.2f} samples/s")
    print(f"pairfarm end-to-end                        : {ours:8.2f} samples/s  "
          f"({ours / model_only:.0%} of pairfarm's ceiling, "
          f"{ours / open_clip_only:.0%} of open_clip's)")
    if runs["cr"]:
        theirs = max(runs["cr"])
        print(f"clip-retrieval inference                   : {theirs:8.2f} samples/s  "
              f"(pairfarm / clip-retrieval = {ours / theirs:.2f}x)")


if __name__ == "__main__":
    main()
