"""Benchmark of the post-processing stage: end-to-end samples/s from a download shard to
every output, against the model-only ceiling and against clip-retrieval's inference.

    .venv/bin/python bench/bench_postprocess.py [--samples 512] [--batch-size 64]
        [--workers 1] [--device cpu] [--decode auto] [--model ViT-B-32 ...]
        [--clip-retrieval-python .venv-cr/bin/python] [--json out.json]

On one GPU (one short run: ViT-B/32 and ViT-L/14, both decode paths, ~5 minutes)::

    python bench/bench_postprocess.py --device cuda --model ViT-B-32 --model ViT-L-14 \
        --decode device --decode cpu --samples 8192 --batch-size 256 --workers 8 \
        --json bench/out/postprocess/gpu.json

Every model runs with random weights (``--pretrained none``: the same compute as the
real model; no weights can be downloaded here) on the same shard of 256x256 JPEGs on
local disk (built once per sample count and kept under ``bench/out/postprocess``):

- ceilings: the model alone in a tight loop on tensors decoded, preprocessed and moved
  to the device beforehand, under the run's precision (bf16 autocast on a GPU), twice:
  open_clip's own ``encode_image`` + ``encode_text``, and pairfarm's model calls
  (``ClipModel.encode``: the text tower trimmed to the longest caption);
- pairfarm: ``process_shard`` per ``--decode`` path: read the tar, decode + preprocess
  (Pillow in worker processes, or nvJPEG on the device a few batches ahead), both towers,
  NSFW tag, keep/drop, filtered tar + parquet + embeddings written;
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
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpu_postprocess.decode import decode_image  # noqa: E402
from gpu_postprocess.models import ModelSpec  # noqa: E402
from gpu_postprocess.node import process_shard  # noqa: E402
from gpu_postprocess.pipeline import Scorer, build_scorer  # noqa: E402
from gpu_postprocess.settings import (  # noqa: E402
    DecodeMode,
    OutputSettings,
    ScoringSettings,
    parse_thresholds,
)
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
    """The shard of ``n`` samples, built unless a previous run left it."""
    folder = OUT / f"shard-{n}"
    if (folder / f"{BATCH_ID:08d}_stats.json").is_file():
        return folder
    rng = np.random.default_rng(0)
    rows = [Row(caption=str(rng.choice(synthetic.TEMPLATES)).format(c="red", s="circle"),
                image=jpeg_256(rng)) for _ in range(n)]
    write_shard(folder, BATCH_ID, rows)
    return folder


def ceiling(scorer: Scorer, shard_dir: Path, batch_size: int) -> tuple[float, float]:
    """samples/s of (open_clip's own encode_image + encode_text, pairfarm's model calls)
    in a tight loop on tensors already on the device."""
    import torch

    shard = open_local_shard(shard_dir / f"{BATCH_ID:08d}.tar",
                             shard_dir / f"{BATCH_ID:08d}.parquet")
    clip = scorer.primary
    keys = shard.keys
    images = torch.stack([clip.preprocess(decode_image(shard.read(shard.image_member(k)[1])))
                          for k in keys]).to(clip.device)
    tokens = clip.tokenizer([str(c) for c in shard.column("caption")]).to(clip.device)

    def plain(img: torch.Tensor, tok: torch.Tensor) -> None:
        with torch.inference_mode(), clip.autocast():
            clip.model.encode_image(img)
            clip.model.encode_text(tok)

    rates = []
    for call in (plain, clip.encode):
        call(images[:batch_size], tokens[:batch_size])  # warm-up
        _sync(clip.device)
        start = time.perf_counter()
        for i in range(0, len(keys), batch_size):
            call(images[i:i + batch_size], tokens[i:i + batch_size])
        _sync(clip.device)
        rates.append(len(keys) / (time.perf_counter() - start))
    return rates[0], rates[1]


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def end_to_end(scorer: Scorer, shard_dir: Path) -> float:
    shard = open_local_shard(shard_dir / f"{BATCH_ID:08d}.tar",
                             shard_dir / f"{BATCH_ID:08d}.parquet")
    start = time.perf_counter()
    written = process_shard(scorer, shard, BATCH_ID, OutputSettings(out_dir=OUT / "pairfarm"))
    _sync(scorer.primary.device)
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto",
                        help="auto: bf16/fp16 autocast on a GPU, fp32 on the CPU")
    parser.add_argument("--model", action="append", default=None,
                        help="open_clip model, random weights (repeatable; ViT-B-32)")
    parser.add_argument("--decode", action="append", default=None,
                        choices=[m.value for m in DecodeMode],
                        help="decode path(s) of the end-to-end runs (repeatable; auto)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate the measurements this many times, keep each best "
                             "(a shared machine's load varies over a run)")
    parser.add_argument("--clip-retrieval-python", default=None,
                        help="python of a virtual environment with clip-retrieval installed "
                             "(ViT-B-32 only)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args()


def scorer_for(args: argparse.Namespace, model: str, decode: str) -> Scorer:
    return build_scorer(ScoringSettings(
        model=ModelSpec(model, None), device=args.device, precision=args.precision,
        batch_size=args.batch_size, workers=args.workers, decode=DecodeMode(decode),
        thresholds=parse_thresholds([]), watermark=WatermarkSettings(kind=WatermarkKind.OFF)))


def bench_model(args: argparse.Namespace, model: str, shard_dir: Path) -> dict[str, Any]:
    """Best of ``--repeat`` of each figure for one model: its ceilings, each decode path
    end to end, clip-retrieval's inference when asked."""
    decodes = args.decode or ["auto"]
    scorers = {d: scorer_for(args, model, d) for d in decodes}
    runs: dict[str, list[float]] = {"open_clip": [], "model": []}
    for i in range(args.repeat):
        open_clip_only, model_only = ceiling(scorers[decodes[0]], shard_dir, args.batch_size)
        runs["open_clip"].append(open_clip_only)
        runs["model"].append(model_only)
        for d, scorer in scorers.items():
            runs.setdefault(f"e2e_{d}", []).append(end_to_end(scorer, shard_dir))
        if args.clip_retrieval_python and model == "ViT-B-32":
            theirs = clip_retrieval(args.clip_retrieval_python, shard_dir, args.samples,
                                    args.batch_size, args.workers)
            if theirs is not None:
                runs.setdefault("cr", []).append(theirs)
        print(f"{model} run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()))
    best = {k: max(v) for k, v in runs.items()}
    best["precision"] = scorers[decodes[0]].primary.precision  # type: ignore[assignment]
    best["device_decode"] = {d: s.device_specs is not None  # type: ignore[assignment]
                             for d, s in scorers.items()}
    return best


def report(model: str, best: dict[str, Any], repeat: int) -> None:
    ceiling_ = best["model"]
    print(f"{model}, best of {repeat} (precision {best['precision']}):")
    print(f"  ceiling, open_clip encode_image+encode_text: {best['open_clip']:9.2f} samples/s")
    print(f"  ceiling, pairfarm's model calls            : {ceiling_:9.2f} samples/s")
    for key, rate in best.items():
        if key.startswith("e2e_"):
            d = key.removeprefix("e2e_")
            where = "device" if best["device_decode"][d] else "cpu"
            print(f"  pairfarm end-to-end, --decode {d:6} ({where:6}): {rate:9.2f} samples/s "
                  f"({rate / ceiling_:.0%} of pairfarm's ceiling, "
                  f"{rate / best['open_clip']:.0%} of open_clip's)")
    if "cr" in best:
        ours = max(v for k, v in best.items() if k.startswith("e2e_"))
        print(f"  clip-retrieval inference                   : {best['cr']:9.2f} samples/s  "
              f"(pairfarm / clip-retrieval = {ours / best['cr']:.2f}x)")


def main() -> None:
    args = parse_args()
    shard_dir = make_shard(args.samples)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, device {args.device} "
          f"({_device_name(args.device)}), {args.samples} samples, batch {args.batch_size}, "
          f"{args.workers} decode workers")
    results = {}
    for model in args.model or ["ViT-B-32"]:
        results[model] = bench_model(args, model, shard_dir)
        report(model, results[model], args.repeat)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "device": _device_name(args.device),
                                         "results": results}, indent=2))


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
