"""Queries as CLIP embeddings: a caption through the text tower, an image through the
image tower, with the model the index's embeddings came from (``--model``).

Error handling: an image that does not decode raises ``QueryError``; a model whose
embedding width is not the index's raises ``SearchDataError`` when the engine starts.
"""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

from gpu_postprocess.decode import decode_image
from gpu_postprocess.models import ClipModel
from search.errors import QueryError, SearchDataError


class ClipEncoder:
    """Unit float32 vectors of texts and images; calls are serialised (one model)."""

    def __init__(self, clip: ClipModel) -> None:
        self.clip = clip
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.clip.embed_dim

    def check(self, index_dim: int) -> None:
        if index_dim != self.dim:
            raise SearchDataError(f"the index holds {index_dim}-d embeddings, model "
                                  f"{self.clip.spec} makes {self.dim}-d ones: give the "
                                  f"--model the farm post-processed with")

    def text(self, text: str) -> np.ndarray:
        if not text.strip():
            raise QueryError("empty text query")
        with self._lock:
            _, txt = self.clip.encode(None, self.clip.tokenizer([text]))
        assert txt is not None
        return txt[0].cpu().numpy()

    def image(self, data: bytes) -> np.ndarray:
        try:
            img = decode_image(data)
        except (OSError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as exc:
            raise QueryError(f"the image does not decode: {exc}") from exc
        with self._lock:
            emb, _ = self.clip.encode(self.clip.preprocess(img)[None], None)
        assert emb is not None
        return emb[0].cpu().numpy()
