"""Read a ``tfds-laion400m`` export with TFDS's own ``laion400m`` builder (run in the
readers' venv, ``.venv-tf``): ``python read_tfds.py images|embeddings DIR OUT.npz``.

For each shard the builder's ``_generate_examples_one_shard`` yields the examples, exactly
as ``download_and_prepare`` runs it in a Beam pipeline (Beam itself is not installed), and
the builder's ``features`` encode each one (TFDS's own checks of shapes, dtypes and
labels). The embeddings config downloads LAION's files by name; here the same names map to
the export's files. Writes the examples to OUT.npz.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.vision_language.laion400m import laion400m


def embedding_paths(folder: Path, shards: int) -> dict[str, epath.Path]:
    paths = {}
    for i in range(shards):
        for name in laion400m._get_embeddings_file_names(i):
            sub = name.rsplit("_", 1)[0]  # img_emb, text_emb, metadata
            paths[name] = epath.Path(folder / sub / name)
    return paths


def main(config: str, folder: Path, out: Path) -> None:
    shards = len(list(folder.glob("*.tar")))
    chosen = {"images": laion400m.LAION400M_IMAGES_CONFIG,
              "embeddings": laion400m.LAION400M_EMBEDDINGS_CONFIG}[config]
    chosen.num_shards = shards  # as TFDS's own laion400m_test does
    with tempfile.TemporaryDirectory() as tmp:
        builder = laion400m.Laion400m(config=config, data_dir=tmp)
        dl = builder._make_download_manager(  # as download_and_prepare makes it
            download_dir=Path(tmp) / "dl",
            download_config=tfds.download.DownloadConfig(manual_dir=folder))
        paths = embedding_paths(folder, shards) if config == "embeddings" else {}
        features = builder.info.features
        rows, arrays = [], {}
        for i in range(shards):
            for key, example in builder._generate_examples_one_shard(dl, paths, i):
                features.encode_example(example)
                n = len(rows)
                rows.append({"key": key, "caption": example["caption"], "url": example["url"],
                             "similarity": float(example["similarity"]),
                             "nsfw": example["nsfw"]})
                if config == "images":
                    arrays[f"image_{n}"] = tf.io.decode_image(example["image"]).numpy()
                else:
                    arrays[f"image_embedding_{n}"] = np.asarray(example["image_embedding"])
                    arrays[f"text_embedding_{n}"] = np.asarray(example["text_embedding"])
    np.savez(out, rows=np.array(json.dumps(rows)), shards=np.array(shards), **arrays)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
