"""clip-retrieval's embedding folders, as the farm's post-processing writes them
(``pairfarm.shardformat.embedding_files``): ``img_emb/img_emb_{i}.npy``,
``text_emb/text_emb_{i}.npy`` (float16, L2-normalised, as the farm wrote them) and
``metadata/metadata_{i}.parquet``, row for row. Shared by the ``clip-retrieval`` and
``tfds-laion400m`` layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from export.errors import LayoutError
from export.files import Staged, write_npy, write_parquet
from export.source import Sample
from pairfarm.shardformat import embedding_files


class EmbeddingRows:
    """The image and text embedding rows of one output shard."""

    def __init__(self) -> None:
        self._img: list[np.ndarray] = []
        self._txt: list[np.ndarray] = []

    def add(self, sample: Sample) -> None:
        if sample.img_emb is None or sample.text_emb is None:
            raise LayoutError(f"batch {sample.batch_id} row {sample.row} has no embeddings")
        self._img.append(sample.img_emb)
        self._txt.append(sample.text_emb)

    def write(self, staged: Staged, dest: Path, index: int, metadata: pa.Table) -> None:
        files = embedding_files(str(index))
        write_npy(staged, dest / files["img_emb"], np.stack(self._img))
        write_npy(staged, dest / files["text_emb"], np.stack(self._txt))
        write_parquet(staged, dest / files["metadata"], metadata)


def width(sample: Sample) -> int:
    if sample.img_emb is None:
        raise LayoutError(f"batch {sample.batch_id} row {sample.row} has no embeddings")
    return int(sample.img_emb.shape[-1])
