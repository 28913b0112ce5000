"""Decoding JPEGs and preprocessing images on the model's device (nvJPEG on CUDA).

At GPU speed the CPU's Pillow decode, not the model, bounds post-processing. On the
device path the decode workers (``RawShardSamples`` in a ``DataLoader``) only read each
image's bytes from the tar, check its header and tokenize the caption; the bytes of plain
RGB JPEGs go to ``torchvision.io.decode_jpeg`` on the model's device in one batched call,
and ``preprocess`` resizes, crops and normalises them there (``ImageSpec``: the model's
torchvision preprocessing read as data). Anything else (PNG, WebP, CMYK or grayscale
JPEG, a JPEG without its end marker, one the device cannot decode) is decoded by Pillow on
the CPU exactly as on the CPU path, so only the JPEG decoder and the resize arithmetic
differ between the paths: on the CPU (libjpeg-turbo on both sides) the tensors agree with
Pillow + torchvision's PIL transforms within two 8-bit levels, a mean under a quarter
level (Pillow resizes in fixed point, torchvision in float and rounds), and within one
level of CLIP's reference tensor (``tests/test_gpu_device_decode.py``).

``Prefetcher`` overlaps the stages: a thread pulls raw batches from the decode workers,
decodes and preprocesses them on its own CUDA stream and hands them over through a queue
of ``depth`` batches (bounded memory), while the caller's thread runs the model.

Error handling: a sample that neither the device nor Pillow can decode gets
``decoded = False`` and zero tensors (dropped as ``decode_error``), as on the CPU path; an
error in the prefetch thread is raised in the caller's thread.

Resource handling: ``Prefetcher`` is a context manager; leaving it (also on an exception
in the caller) stops and joins its thread, which ends the ``DataLoader``'s iterator and
with it the worker processes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from gpu_postprocess.decode import ShardSamples, Transform, decode_image
from gpu_postprocess.errors import SettingsError
from gpu_postprocess.settings import DecodeMode

log = logging.getLogger(__name__)
JPEG_END = b"\xff\xd9"
#: transform steps that only convert a PIL image to a float tensor in [0, 1]
_TO_TENSOR = ("ToTensor", "MaybeToTensor", "MaybeConvertMode")


@dataclass(frozen=True)
class ImageSpec:
    """A torchvision preprocessing (Resize, CenterCrop, to tensor, Normalize) as data."""

    resize: tuple[int, ...]  # (s,): shortest side to s; (h, w): to exactly h x w
    interpolation: InterpolationMode
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]


def image_spec(transform: Any) -> ImageSpec | None:
    """``transform`` read as an ``ImageSpec``; None when it holds anything else."""
    steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    names = [type(s).__name__ for s in steps]
    core = [s for s, n in zip(steps, names, strict=True) if n not in _TO_TENSOR]
    if len(core) not in (2, 3) or not isinstance(core[0], T.Resize):
        return None
    if not isinstance(core[-1], T.Normalize) or not core[0].antialias:
        return None
    if len(core) == 3 and not isinstance(core[1], T.CenterCrop):
        return None
    size = core[0].size
    crop = tuple(core[1].size) if len(core) == 3 else None
    return ImageSpec(resize=(size,) if isinstance(size, int) else tuple(size),
                     interpolation=core[0].interpolation,
                     crop=None if crop is None else (int(crop[0]), int(crop[-1])),
                     mean=tuple(core[-1].mean), std=tuple(core[-1].std))


def resolve_decode(mode: DecodeMode, device: torch.device,
                   transforms: Sequence[Transform]) -> list[ImageSpec] | None:
    """The specs to preprocess with on the device, or None for the CPU path."""
    if mode == DecodeMode.CPU or (mode == DecodeMode.AUTO and device.type != "cuda"):
        return None
    specs = [image_spec(t) for t in transforms]
    if all(s is not None for s in specs):
        return [s for s in specs if s is not None]
    if mode == DecodeMode.DEVICE:
        raise SettingsError(f"--decode device: cannot run this preprocessing on the device: "
                            f"{transforms}")
    log.warning("decoding on the CPU: the preprocessing has steps the device path does not "
                "know: %s", transforms)
    return None


def preprocess(images: Sequence[torch.Tensor], spec: ImageSpec) -> torch.Tensor:
    """``[N, 3, H, W]`` float32 from uint8 ``[3, h, w]`` images (one device), as the
    spec's torchvision transform makes from the same pixels as a PIL image. Images of one
    size are resized in one call."""
    out: list[torch.Tensor | None] = [None] * len(images)
    for positions in _by_shape(images).values():
        stacked = torch.stack([images[i] for i in positions])
        for i, img in zip(positions, _resize_crop(stacked, spec), strict=True):
            out[i] = img
    batch = torch.stack([t for t in out if t is not None]).float().div_(255.0)
    mean = torch.tensor(spec.mean, device=batch.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=batch.device).view(1, -1, 1, 1)
    return batch.sub_(mean).div_(std)


def _by_shape(images: Sequence[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    return groups


def _resize_crop(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """uint8 in, uint8 out: torchvision resizes uint8 tensors in float and rounds, as
    Pillow's resize rounds to 8 bits."""
    resized = F.resize(images, list(spec.resize), interpolation=spec.interpolation,
                       antialias=True)
    return resized if spec.crop is None else F.center_crop(resized, list(spec.crop))


def device_decodable(data: bytes) -> bool:
    """Whether the device path takes ``data``: a complete baseline-or-progressive RGB
    JPEG within Pillow's pixel limit. Raises as ``decode_image`` does on what Pillow
    cannot open (garbage, decompression bombs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            return (img.format == "JPEG" and img.mode == "RGB"
                    and data.rstrip(b"\0").endswith(JPEG_END))


def decode_jpegs(raw: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 ``[3, h, w]`` images on ``device``, None where one does not decode. One
    batched call; when it fails, one call per image finds the culprits."""
    if not raw:
        return []
    try:
        return list(decode_jpeg(list(raw), mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        return [_decode_one(r, device) for r in raw]


def _decode_one(raw: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


@dataclass
class RawItem:
    """A sample as a decode worker leaves it: ``raw`` JPEG bytes for the device, or
    ``images`` already made on the CPU (``decoded`` False: none could be made)."""

    index: int
    tokens: torch.Tensor
    raw: torch.Tensor | None
    decoded: bool
    images: tuple[torch.Tensor, ...] | None


class RawShardSamples(ShardSamples):
    """``ShardSamples`` whose items are ``RawItem``: JPEGs left for the device."""

    def __getitem__(self, i: int) -> RawItem:  # type: ignore[override]
        tokens = self.tokenizer([self.captions[i]])[0]
        data = self._read(self.members[i])
        try:
            if device_decodable(data):
                raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return RawItem(i, tokens, raw, True, None)
            img = decode_image(data)
        except (OSError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning):
            return RawItem(i, tokens, None, False, None)
        return RawItem(i, tokens, None, True, tuple(t(img) for t in self.transforms))


def collate_raw(items: list[RawItem]) -> list[RawItem]:
    return items


@dataclass
class DeviceBatcher:
    """Turns a list of ``RawItem`` into the batch ``score_shard`` consumes:
    ``[index, decoded, tokens, *images]`` (images on ``device``, one per spec)."""

    device: torch.device
    specs: list[ImageSpec]
    transforms: list[Transform]
    shapes: list[tuple[int, ...]]

    def __call__(self, items: list[RawItem]) -> list[torch.Tensor]:
        pixels = self._decode(items)
        images = [self._images(items, pixels, k) for k in range(len(self.specs))]
        return [torch.tensor([it.index for it in items], dtype=torch.int64),
                torch.tensor([it.decoded for it in items], dtype=torch.bool),
                torch.stack([it.tokens for it in items]), *images]

    def _decode(self, items: list[RawItem]) -> dict[int, torch.Tensor]:
        """Position -> uint8 pixels on the device; a JPEG the device cannot decode is
        left to Pillow (``item.images`` / ``item.decoded`` set as the CPU path would)."""
        on_device = {j: it.raw for j, it in enumerate(items) if it.raw is not None}
        pixels = decode_jpegs(list(on_device.values()), self.device)
        decoded: dict[int, torch.Tensor] = {}
        for j, img in zip(on_device, pixels, strict=True):
            if img is None:
                items[j].images, items[j].decoded = self._on_cpu(on_device[j])
            else:
                decoded[j] = img
        return decoded

    def _images(self, items: list[RawItem], pixels: dict[int, torch.Tensor],
                k: int) -> torch.Tensor:
        out = torch.zeros((len(items), *self.shapes[k]), device=self.device)
        if pixels:
            out[list(pixels)] = preprocess(list(pixels.values()), self.specs[k])
        for j, it in enumerate(items):
            if it.images is not None:
                out[j] = it.images[k].to(self.device)
        return out

    def _on_cpu(self, raw: torch.Tensor) -> tuple[tuple[torch.Tensor, ...] | None, bool]:
        """Pillow's verdict on a JPEG the device could not decode."""
        try:
            img = decode_image(raw.numpy().tobytes())
        except (OSError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning):
            return None, False
        return tuple(t(img) for t in self.transforms), True


class Prefetcher:
    """Iterates ``convert(item)`` for each item of ``source``, computed ``depth`` items
    ahead in a thread (on a CUDA stream of its own when ``device`` is a GPU)."""

    def __init__(self, source: Iterable[Any], convert: Callable[[Any], list[torch.Tensor]],
                 device: torch.device, depth: int = 2) -> None:
        self._source, self._convert, self._device = source, convert, device
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        while self._thread.is_alive():
            self._drain()
            self._thread.join(timeout=0.05)
        self._drain()

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            return

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        while True:
            kind, value = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield self._received(value)

    def _received(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._device.type == "cuda":
            current = torch.cuda.current_stream(self._device)
            for t in batch:
                if t.is_cuda:
                    t.record_stream(current)
        return batch

    def _run(self) -> None:
        try:
            with self._stream():
                self._produce()
        except BaseException as exc:  # handed to the caller's thread, raised there
            self._put(("error", exc))

    def _produce(self) -> None:
        iterator = iter(self._source)
        try:
            for item in iterator:
                batch = self._convert(item)
                if self._device.type == "cuda":
                    torch.cuda.current_stream(self._device).synchronize()
                if not self._put(("item", batch)):
                    return
        finally:
            if hasattr(iterator, "close"):  # a generator
                iterator.close()
            del iterator  # a DataLoader's iterator shuts its worker processes down when freed
        self._put(("end", None))

    def _stream(self) -> Any:
        if self._device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(torch.cuda.Stream(self._device))

    def _put(self, entry: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

