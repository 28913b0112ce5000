"""Run clip-retrieval's inference on one webdataset tar; write its timings as JSON.

Runs in clip-retrieval's own virtual environment (e.g. ``.venv-cr`` beside the
checkout), started by
``bench/bench_postprocess.py``. open_clip's ViT-B-32 is created with random weights (the
same compute; nothing here can download weights) by wrapping
``open_clip.create_model_and_transforms``; the time spent loading and warming the model
(``all_clip.load_clip``) is reported as ``load_s`` so the caller can subtract it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import all_clip
import numpy as np
import open_clip
from clip_retrieval.clip_inference import mapper, worker
from clip_retrieval.clip_inference.main import main as inference

LOAD_S = [0.0]


def _random_weights(create):  # type: ignore[no-untyped-def]
    def wrapped(name, pretrained=None, **kw):  # type: ignore[no-untyped-def]
        return create(name, pretrained=None, **kw)
    return wrapped


def _timed(load):  # type: ignore[no-untyped-def]
    def wrapped(*args, **kw):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return load(*args, **kw)
        finally:
            LOAD_S[0] += time.perf_counter() - start
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tar", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--result", required=True, help="JSON file for count and timings")
    args = parser.parse_args()
    open_clip.create_model_and_transforms = _random_weights(open_clip.create_model_and_transforms)
    timed = _timed(all_clip.load_clip)
    mapper.load_clip = timed
    worker.load_clip = timed
    shutil.rmtree(args.out, ignore_errors=True)
    start = time.perf_counter()
    inference(input_dataset=args.tar, output_folder=args.out, input_format="webdataset",
              batch_size=args.batch_size, num_prepro_workers=args.workers, enable_text=True,
              enable_image=True, enable_metadata=True, clip_model="open_clip:ViT-B-32",
              use_jit=False)
    total = time.perf_counter() - start
    embs = sorted(Path(args.out, "img_emb").glob("*.npy"))
    count = sum(np.load(p, mmap_mode="r").shape[0] for p in embs)
    Path(args.result).write_text(json.dumps({"count": count, "total_s": total,
                                             "load_s": LOAD_S[0]}))


if __name__ == "__main__":
    main()
