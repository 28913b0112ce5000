"""Train the tiny CLIP used by the end-to-end tests, and write it as an open_clip ``local-dir:``.

    .venv/bin/python tools/train_tiny_clip.py [--out localfarm/demo_model] [--steps 300]

The model (``open_clip_config.json``) is a CLIP with a 2-layer 32-wide ViT on 32x32 images
and a 2-layer 16-wide text transformer over open_clip's standard tokenizer; it learns
coloured shapes (``localfarm/synthetic.py``) against unrelated captions on noise pictures. The
weights are stored in float16 (``open_clip_model.safetensors``, about 2 MB: most of it the
49408-token embedding table). ``pairfarm_gap.json`` records, for the evaluation pairs of
``synthetic.evaluation_pairs(EVAL_SEED, EVAL_PAIRS)`` scored by the saved fp16 weights, the
lowest matched and the highest mismatched similarity and the threshold in between.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from localfarm import synthetic

REPO = Path(__file__).resolve().parent.parent
EVAL_SEED = 1234
EVAL_PAIRS = 48
CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                       "patch_size": 8, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2,
                     "layers": 2, "mlp_ratio": 2.0},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711],
                       "interpolation": "bicubic", "resize_mode": "shortest"},
}


def batch(rng: np.random.Generator, size: int, preprocess, tokenizer):  # type: ignore[no-untyped-def]
    samples = [synthetic.training_sample(rng) for _ in range(size)]
    images = torch.stack([preprocess(s.image) for s in samples])
    return images, tokenizer([s.caption for s in samples])


def train(out: Path, steps: int, batch_size: int, seed: int) -> None:
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    name = f"local-dir:{out}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, load_weights=False)
    tokenizer = open_clip.get_tokenizer(name)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        images, tokens = batch(rng, batch_size, preprocess, tokenizer)
        img, txt, scale = model(images, tokens)
        logits = scale * img @ txt.T
        labels = torch.arange(len(images))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f}")
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s")
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    write_gap(out)


@torch.inference_mode()
def write_gap(out: Path) -> None:
    name = f"local-dir:{out}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    pairs = synthetic.evaluation_pairs(EVAL_SEED, EVAL_PAIRS)
    images = torch.stack([preprocess(Image.open(io.BytesIO(synthetic.jpeg_bytes(s.image))))
                          for s, _ in pairs])
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(tokenizer([s.caption for s, _ in pairs])), dim=-1)
    sim = (img * txt).sum(-1).numpy()
    is_match = np.array([m for _, m in pairs])
    lo, hi = float(sim[is_match].min()), float(sim[~is_match].max())
    gap = {"eval_seed": EVAL_SEED, "eval_pairs": EVAL_PAIRS, "matched_min": lo,
           "mismatched_max": hi, "threshold": (lo + hi) / 2}
    (out / "pairfarm_gap.json").write_text(json.dumps(gap, indent=2) + "\n")
    print(json.dumps(gap))
    if lo <= hi:
        raise SystemExit("no gap between matched and mismatched pairs: train longer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "localfarm" / "demo_model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    train(args.out, args.steps, args.batch_size, args.seed)


if __name__ == "__main__":
    main()
