"""Parallel decoding and preprocessing of a shard's images, for a torch ``DataLoader``.

``ShardSamples`` is a map-style dataset over the ``ok`` rows of a shard: item ``i`` reads
its image from the tar (one seek + read), decodes it with Pillow, applies every transform
(CLIP's preprocessing, and the watermark model's when it runs) and tokenizes the caption.
The ``DataLoader`` runs it in worker processes, so the model never waits on decoding.

Error handling: an image that Pillow cannot decode does not stop the shard; its item has
``decoded = False`` and zero tensors, and the sample is dropped as ``decode_error``.

Resource handling: each worker process opens the tar once, lazily (never before the fork).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from gpu_postprocess.shardio import Member

Transform = Callable[[Image.Image], torch.Tensor]


def decode_image(data: bytes) -> Image.Image:
    """RGB image from encoded bytes (raises ``OSError``/``ValueError`` when corrupt)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.load()
    return img.convert("RGB")


class ShardSamples(Dataset[tuple[Any, ...]]):
    """Items: ``(index, decoded, tokens, *transformed_images)``."""

    def __init__(self, tar_path: Path, members: Sequence[Member], captions: Sequence[str], *,
                 transforms: Sequence[Transform],
                 tokenizer: Callable[[list[str]], torch.Tensor],
                 shapes: Sequence[tuple[int, ...]]) -> None:
        if len(members) != len(captions):
            raise ValueError("one caption per member")
        self.tar_path = tar_path
        self.members = list(members)
        self.captions = list(captions)
        self.transforms = list(transforms)
        self.tokenizer = tokenizer
        self.shapes = list(shapes)
        self._file: BinaryIO | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.members)

    def _tar(self) -> BinaryIO:
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.tar_path, "rb")  # noqa: SIM115 (kept for the worker's life)
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        """Close this process's tar handle (workers' handles end with their process)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read(self, member: Member) -> bytes:
        f = self._tar()
        f.seek(member.offset)
        return f.read(member.size)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        tokens = self.tokenizer([self.captions[i]])[0]
        try:
            img = decode_image(self._read(self.members[i]))
        except (OSError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning):
            return (i, False, tokens, *(torch.zeros(s) for s in self.shapes))
        return (i, True, tokens, *(t(img) for t in self.transforms))


def make_loader(dataset: ShardSamples, batch_size: int, workers: int,
                pin_memory: bool, collate_fn: Callable[[list[Any]], Any] | None = None,
                ) -> DataLoader[tuple[Any, ...]]:
    """Batches in dataset order; ``workers`` decode processes (0: decode in this process);
    ``collate_fn`` as the ``DataLoader``'s (None: its default)."""
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"prefetch_factor": 4, "multiprocessing_context": "fork"}
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory, collate_fn=collate_fn, **extra)
