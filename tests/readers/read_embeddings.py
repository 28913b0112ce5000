"""Read a ``clip-retrieval`` export with embedding-reader (run in ``.venv-tf``):
``python read_embeddings.py DIR OUT.npz``: every embedding with its metadata row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from embedding_reader import EmbeddingReader


def main(folder: Path, out: Path) -> None:
    reader = EmbeddingReader(embeddings_folder=str(folder / "img_emb"),
                             metadata_folder=str(folder / "metadata"),
                             meta_columns=["key", "url", "caption"],
                             file_format="parquet_npy")
    embeddings, rows = [], []
    for emb, meta in reader(batch_size=50, start=0, end=reader.count, parallel_pieces=1,
                            max_piece_size=50, show_progress=False):
        embeddings.append(emb)
        rows += meta[["key", "url", "caption"]].to_dict("records")
    np.savez(out, embeddings=np.concatenate(embeddings), rows=np.array(json.dumps(rows)),
             count=np.array(reader.count), dimension=np.array(reader.dimension))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
