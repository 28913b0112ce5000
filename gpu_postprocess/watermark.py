"""Watermark tagging: LAION's EfficientNet-B3 detector, or a probe on the CLIP embedding.

- ``EfficientNetWatermark``: timm ``efficientnet_b3`` with LAION's head
  (1536 -> 625 -> ReLU -> Dropout 0.3 -> 256 -> ReLU -> 2) on 256x256 squashed images with
  ImageNet normalisation; ``pwatermark = softmax(logits)[:, 0]``. Weights come from a local
  file, or are fetched once from LAION's published release into the cache folder when the
  network allows.
- ``ClipProbeWatermark``: a linear or MLP probe on the L2-normalised CLIP image embedding,
  from an ``.npz`` (``n_dense``, ``dense_{i}_kernel`` [in, out], ``dense_{i}_bias``); one
  output: sigmoid, two outputs: ``softmax[:, 0]``.

Without weights there is no watermark model: ``load_watermark`` returns None, says so in
the log, and the ``pwatermark`` column stays empty (null), never invented.

Error handling: unreadable weights raise ``ModelLoadError``; a failed fetch is logged and
treated as "no weights".
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torchvision import transforms as T

from gpu_postprocess.errors import ModelLoadError

log = logging.getLogger(__name__)

LAION_RELEASE_URL = (
    "https://github.com/LAION-AI/LAION-5B-WatermarkDetection/releases/download/1.0/model.pt"
)
CACHE_NAME = "laion_watermark_model_v1.pt"
IMAGE_SIZE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WatermarkKind(StrEnum):
    AUTO = "auto"  # EfficientNet if its weights are found or fetched, else none
    EFFICIENTNET = "efficientnet"
    CLIP_PROBE = "clip-probe"
    OFF = "off"


@dataclass(frozen=True, kw_only=True)
class WatermarkSettings:
    kind: WatermarkKind = WatermarkKind.AUTO
    weights: Path | None = None
    url: str | None = LAION_RELEASE_URL
    cache_dir: Path | None = None
    fetch_timeout_s: float = 60.0


def efficientnet_head() -> nn.Sequential:
    return nn.Sequential(nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(p=0.3),
                         nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2))


def build_efficientnet() -> nn.Module:
    import timm

    model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    model.classifier = efficientnet_head()
    return model


def efficientnet_transform() -> T.Compose:
    return T.Compose([T.Resize((IMAGE_SIZE, IMAGE_SIZE)), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class EfficientNetWatermark:
    """Scores preprocessed images (``efficientnet_transform``), batch by batch."""

    needs_images = True
    input_shape = (3, IMAGE_SIZE, IMAGE_SIZE)

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.transform = efficientnet_transform()

    @torch.inference_mode()
    def score_images(self, images: torch.Tensor) -> npt.NDArray[np.float32]:
        logits = self.model(images.to(self.device, non_blocking=True))
        return torch.softmax(logits.float(), dim=1)[:, 0].cpu().numpy()


class ClipProbeWatermark:
    """Scores L2-normalised CLIP image embeddings."""

    needs_images = False

    def __init__(self, layers: list[nn.Linear], device: torch.device) -> None:
        self.layers = nn.ModuleList(layers).to(device).eval()
        self.device = device
        self.dim = layers[0].in_features

    @torch.inference_mode()
    def score_embeddings(self, emb: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        h = torch.as_tensor(np.asarray(emb, dtype=np.float32), device=self.device)
        for layer in self.layers[:-1]:
            h = torch.relu(layer(h))
        out = self.layers[-1](h)
        p = torch.sigmoid(out[:, 0]) if out.shape[1] == 1 else torch.softmax(out, dim=1)[:, 0]
        return p.float().cpu().numpy()


def load_probe(path: Path, device: torch.device) -> ClipProbeWatermark:
    try:
        with np.load(path, allow_pickle=False) as npz:
            layers = [_linear(npz[f"dense_{i}_kernel"], npz[f"dense_{i}_bias"])
                      for i in range(int(npz["n_dense"]))]
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"cannot load watermark probe {path}: {exc}") from exc
    if not layers:
        raise ModelLoadError(f"watermark probe {path} has no layers")
    return ClipProbeWatermark(layers, device)


def _linear(kernel: np.ndarray, bias: np.ndarray) -> nn.Linear:
    layer = nn.Linear(kernel.shape[0], kernel.shape[1])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.asarray(kernel, dtype=np.float32).T))
        layer.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))
    return layer


def load_efficientnet(path: Path, device: torch.device) -> EfficientNetWatermark:
    model = build_efficientnet()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    except (OSError, RuntimeError, KeyError, AttributeError, ValueError,
            pickle.UnpicklingError) as exc:
        raise ModelLoadError(f"cannot load watermark weights {path}: {exc}") from exc
    return EfficientNetWatermark(model, device)


def fetch(url: str, dest: Path, timeout_s: float) -> Path | None:
    """Download ``url`` to ``dest`` (via ``dest.part``, renamed when complete); None if
    the network does not allow it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=timeout_s) as resp:
            resp.raise_for_status()
            with open(part, "wb") as f:
                for chunk in resp.iter_bytes(1 << 20):
                    f.write(chunk)
    except (httpx.HTTPError, OSError) as exc:
        log.warning("cannot fetch watermark weights from %s: %s", url, exc)
        part.unlink(missing_ok=True)
        return None
    part.replace(dest)
    return dest


def _efficientnet_weights(settings: WatermarkSettings) -> Path | None:
    if settings.weights is not None:
        return settings.weights
    if settings.cache_dir is None:
        return None
    cached = settings.cache_dir / CACHE_NAME
    if cached.is_file():
        return cached
    if settings.url is None:
        return None
    return fetch(settings.url, cached, settings.fetch_timeout_s)


Watermark = EfficientNetWatermark | ClipProbeWatermark


def load_watermark(settings: WatermarkSettings, device: torch.device) -> Watermark | None:
    """The configured watermark model, or None (logged) when it is off or has no weights."""
    if settings.kind == WatermarkKind.OFF:
        return None
    if settings.kind == WatermarkKind.CLIP_PROBE:
        if settings.weights is None:
            log.warning("watermark: clip-probe needs --watermark-weights; pwatermark left empty")
            return None
        return load_probe(settings.weights, device)
    path = _efficientnet_weights(settings)
    if path is None:
        log.warning("watermark: no EfficientNet weights (give --watermark-weights or allow "
                    "the fetch from %s); pwatermark left empty", settings.url)
        return None
    return load_efficientnet(path, device)
