"""Iterate a ``webdataset`` export with the webdataset library (run in ``.venv-tf``):
``python read_webdataset.py DIR OUT.npz``: every sample's key, caption, json and image."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import webdataset as wds


def main(folder: Path, out: Path) -> None:
    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb8")
    rows, images = [], {}
    for sample in dataset:
        images[f"image_{len(rows)}"] = sample["jpg"]
        rows.append({"key": sample["__key__"], "caption": sample["txt"],
                     "url": sample["json"]["url"], "shard": Path(sample["__url__"]).stem})
    np.savez(out, rows=np.array(json.dumps(rows)), **images)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
