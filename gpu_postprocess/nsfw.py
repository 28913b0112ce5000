"""LAION's CLIP-based NSFW detector, ported from autokeras to PyTorch.

The published models (``weights/nsfw_{b32,l14}.npz``, converted by ``tools/convert_nsfw.py``;
MIT, see ``weights/LICENSE-laion-nsfw.txt``) take a CLIP image embedding and give
``punsafe`` in [0, 1]. The graph is

    categorical lookup -> Normalization -> (Dense -> ReLU)* -> Dense 1 -> sigmoid

autokeras treated a few embedding columns as categorical: each value there is formatted
with ``'%f'``, looked up in a vocabulary (unknown -> 0) and the index replaces the value
before normalisation. That lookup is reproduced exactly here (on the CPU, in float64, as
TensorFlow saw the float64 input); a plain MLP port would differ by up to 0.33.

TFDS ``laion400m`` labels (``NsfwLabel``), cut points on ``punsafe``:
``UNLIKELY`` below 0.1, ``UNSURE`` in [0.1, 0.9), ``NSFW`` from 0.9, ``UNTAGGED`` when
there is no score (no image embedding, or no NSFW model for the embedding width).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from gpu_postprocess.errors import ModelLoadError

#: embedding width -> shipped weights file
SHIPPED: dict[int, str] = {512: "nsfw_b32.npz", 768: "nsfw_l14.npz"}
UNLIKELY_BELOW = 0.1
NSFW_FROM = 0.9


class NsfwLabel(StrEnum):
    UNLIKELY = "UNLIKELY"
    UNSURE = "UNSURE"
    NSFW = "NSFW"
    UNTAGGED = "UNTAGGED"


def nsfw_label(punsafe: float | None) -> NsfwLabel:
    """The TFDS 4-way label of one score (``None`` or NaN: ``UNTAGGED``)."""
    if punsafe is None or np.isnan(punsafe):
        return NsfwLabel.UNTAGGED
    if punsafe < UNLIKELY_BELOW:
        return NsfwLabel.UNLIKELY
    if punsafe < NSFW_FROM:
        return NsfwLabel.UNSURE
    return NsfwLabel.NSFW


@dataclass(frozen=True)
class CategoricalColumn:
    column: int
    vocabulary: dict[str, int]

    def encode(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        lookup = self.vocabulary.get
        return np.array([lookup(f"{v:f}", 0) for v in values.tolist()], dtype=np.float64)


class NsfwDetector(nn.Module):
    """Normalisation + MLP of the detector; ``score`` adds the categorical lookup."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, mean: torch.Tensor, variance: torch.Tensor,
                 layers: list[tuple[torch.Tensor, torch.Tensor]],
                 categorical: list[CategoricalColumn]) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("scale", torch.clamp(torch.sqrt(variance), min=1e-7))
        self.dense = nn.ModuleList(_linear(kernel, bias) for kernel, bias in layers)
        self.categorical = categorical
        self.dim = int(mean.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.mean) / self.scale
        for layer in self.dense[:-1]:
            h = torch.relu(layer(h))
        return torch.sigmoid(self.dense[-1](h))[:, 0]

    def encode_categorical(self, embeddings: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        x = np.array(embeddings, dtype=np.float64)
        for col in self.categorical:
            x[:, col.column] = col.encode(x[:, col.column])
        return x.astype(np.float32)

    @torch.inference_mode()
    def score(self, embeddings: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        """``punsafe`` of each row of (N, dim) image embeddings, as TensorFlow computes it."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}) embeddings, got {embeddings.shape}")
        device = self.mean.device
        x = torch.from_numpy(self.encode_categorical(embeddings)).to(device)
        return self(x).float().cpu().numpy()


def _linear(kernel: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(kernel.shape[0], kernel.shape[1])
    with torch.no_grad():
        layer.weight.copy_(kernel.T)
        layer.bias.copy_(bias)
    return layer


def load_detector(path: Path) -> NsfwDetector:
    """Load converted weights (the ``.npz`` written by ``tools/convert_nsfw.py``).

    Error handling: a missing or malformed file raises ``ModelLoadError``.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            return _from_arrays({k: npz[k] for k in npz.files})
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"cannot load NSFW weights {path}: {exc}") from exc


def _from_arrays(a: dict[str, np.ndarray]) -> NsfwDetector:
    layers = [(torch.from_numpy(a[f"dense_{i}_kernel"]), torch.from_numpy(a[f"dense_{i}_bias"]))
              for i in range(int(a["n_dense"]))]
    categorical = [
        CategoricalColumn(int(c), dict(zip(a[f"vocab_{c}_keys"].tolist(),
                                           a[f"vocab_{c}_values"].tolist(), strict=True)))
        for c in a["categorical_columns"].tolist()
    ]
    return NsfwDetector(torch.from_numpy(a["mean"]), torch.from_numpy(a["variance"]), layers,
                        categorical).eval()


def shipped_path(dim: int) -> Path | None:
    """The shipped weights for CLIP embeddings of width ``dim``, or None if there are none."""
    name = SHIPPED.get(dim)
    if name is None:
        return None
    return Path(str(resources.files("gpu_postprocess") / "weights" / name))


def detector_for_dim(dim: int, device: torch.device | str = "cpu") -> NsfwDetector | None:
    """The shipped detector for ``dim``-wide embeddings (None: no NSFW model for that width)."""
    path = shipped_path(dim)
    return None if path is None else load_detector(path).to(device)
