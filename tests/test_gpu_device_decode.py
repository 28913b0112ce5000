"""The device decode path (``--decode device``): its functions on CPU tensors against the
Pillow path and CLIP's reference tensor, its routing and fallbacks, the prefetch thread,
and ``score_shard`` through it. The same path on CUDA (nvJPEG) is tested when a GPU is
present."""

from __future__ import annotations

import io
import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from gpu_postprocess.decode import decode_image
from gpu_postprocess.device_decode import (
    DeviceBatcher,
    ImageSpec,
    Prefetcher,
    RawItem,
    RawShardSamples,
    decode_jpegs,
    image_spec,
    preprocess,
    resolve_decode,
)
from gpu_postprocess.errors import SettingsError
from gpu_postprocess.models import ModelSpec
from gpu_postprocess.pipeline import build_scorer, score_shard
from gpu_postprocess.settings import DecodeMode, ScoringSettings
from gpu_postprocess.shardio import open_local_shard
from gpu_postprocess.watermark import WatermarkKind, WatermarkSettings, efficientnet_transform
from tests.gpu_shards import Row, write_shard
from tests.gpu_tiny import TINY_MODEL, evaluation_rows
from tests.test_gpu_preprocess import REF

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: one 8-bit level after CLIP's normalisation (the widest: the smallest std), plus rounding
ONE_LEVEL = 1 / 255 / min(CLIP_STD) + 1e-6
#: nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a few levels apart
CUDA_MAX, CUDA_MEAN = 0.12, 0.01
CLIP_224 = open_clip.image_transform(224, is_train=False)
CPU = torch.device("cpu")
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason="../shared/reference missing")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def jpeg(size: tuple[int, int], seed: int, *, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue()


def raw(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def on_device(datas: list[bytes], transform: T.Compose,
              device: torch.device = CPU) -> torch.Tensor:
    spec = image_spec(transform)
    assert spec is not None
    pixels = decode_jpegs([raw(d) for d in datas], device)
    assert all(p is not None for p in pixels)
    return preprocess([p for p in pixels if p is not None], spec).cpu()


def on_cpu(datas: list[bytes], transform: T.Compose) -> torch.Tensor:
    return torch.stack([transform(decode_image(d)) for d in datas])


def test_image_spec_reads_clips_and_the_watermark_models_preprocessing() -> None:
    assert image_spec(CLIP_224) == ImageSpec(
        resize=(224,), interpolation=InterpolationMode.BICUBIC, crop=(224, 224),
        mean=(0.48145466, 0.4578275, 0.40821073), std=CLIP_STD)
    assert image_spec(efficientnet_transform()) == ImageSpec(
        resize=(256, 256), interpolation=InterpolationMode.BILINEAR, crop=None,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    flipped = T.Compose([*CLIP_224.transforms[:2], T.RandomHorizontalFlip(),
                         *CLIP_224.transforms[2:]])
    assert image_spec(flipped) is None
    assert image_spec(T.Compose([T.ToTensor()])) is None


def test_resolve_decode_picks_the_path_and_refuses_what_the_device_cannot_run() -> None:
    cpu, flipped = torch.device("cpu"), T.Compose([T.RandomHorizontalFlip(), *CLIP_224.transforms])
    assert resolve_decode(DecodeMode.AUTO, cpu, [CLIP_224]) is None  # auto on a CPU: Pillow
    assert resolve_decode(DecodeMode.CPU, cpu, [CLIP_224]) is None
    assert resolve_decode(DecodeMode.DEVICE, cpu, [CLIP_224]) == [image_spec(CLIP_224)]
    with pytest.raises(SettingsError, match="cannot run this preprocessing"):
        resolve_decode(DecodeMode.DEVICE, cpu, [CLIP_224, flipped])


@needs_ref
def test_device_preprocessing_matches_the_clip_reference_within_one_level() -> None:
    expected = np.load(REF / "expected_preprocessed_image.npy")
    got = on_device([(REF / "franz-kafka.jpg").read_bytes()], CLIP_224).numpy()
    assert got.shape == expected.shape == (1, 3, 224, 224) and got.dtype == expected.dtype
    diff = np.abs(got - expected)
    assert diff.max() <= ONE_LEVEL
    assert diff.mean() < 1e-3


@pytest.mark.parametrize("transform", [CLIP_224, efficientnet_transform()],
                         ids=["clip", "watermark"])
def test_a_batch_of_mixed_sizes_matches_pillow_within_two_levels(transform: T.Compose) -> None:
    sizes = [(256, 256), (320, 200), (256, 256), (150, 400), (224, 224), (97, 300)]
    datas = [jpeg(s, i) for i, s in enumerate(sizes)]
    ours, theirs = on_device(datas, transform), on_cpu(datas, transform)
    assert ours.shape == theirs.shape == (len(sizes), *theirs.shape[1:])
    std = torch.tensor(image_spec(transform).std).view(1, 3, 1, 1)  # type: ignore[union-attr]
    levels = (ours - theirs).abs() * std * 255  # back in 8-bit levels
    assert levels.max() <= 2 + 1e-3  # Pillow's fixed-point resize against float + round
    assert levels.mean(dim=(1, 2, 3)).max() < 0.25


def test_decode_jpegs_marks_what_does_not_decode_and_keeps_the_rest() -> None:
    good = jpeg((64, 48), 0)
    pixels = decode_jpegs([raw(good), raw(b"\xff\xd8\xff\xe0 not a jpeg \xff\xd9"), raw(good)],
                          torch.device("cpu"))
    assert pixels[1] is None
    assert pixels[0] is not None and pixels[2] is not None
    assert tuple(pixels[0].shape) == (3, 48, 64)
    assert decode_jpegs([], torch.device("cpu")) == []


def test_workers_send_rgb_jpegs_to_the_device_and_decode_the_rest_with_pillow(
        tmp_path: Path) -> None:
    good = jpeg((64, 48), 1)
    cases = {"rgb jpeg": good, "png": jpeg((40, 40), 2, fmt="PNG"),
             "gray jpeg": jpeg((40, 40), 3, mode="L"), "cmyk jpeg": jpeg((40, 40), 4, mode="CMYK"),
             "truncated": good[: len(good) // 2], "garbage": b"not an image at all"}
    dataset = RawShardSamples(_tar(tmp_path, cases), _members(tmp_path, cases),
                              list(cases), transforms=[CLIP_224],
                              tokenizer=open_clip.get_tokenizer("ViT-B-32"),
                              shapes=[(3, 224, 224)])
    try:
        items = {name: dataset[i] for i, name in enumerate(cases)}
    finally:
        dataset.close()
    assert items["rgb jpeg"].raw is not None and items["rgb jpeg"].images is None
    assert items["rgb jpeg"].raw.numpy().tobytes() == good
    for name in ("png", "gray jpeg", "cmyk jpeg"):
        assert items[name].raw is None and items[name].decoded
        assert items[name].images is not None and items[name].images[0].shape == (3, 224, 224)
    for name in ("truncated", "garbage"):  # Pillow's verdict, as on the CPU path
        assert items[name].raw is None and not items[name].decoded
    assert items["png"].tokens.shape == (77,)


def _tar(tmp_path: Path, cases: dict[str, bytes]) -> Path:
    path = tmp_path / "images.bin"
    path.write_bytes(b"".join(cases.values()))
    return path


def _members(tmp_path: Path, cases: dict[str, bytes]) -> list[object]:
    from gpu_postprocess.shardio import Member

    offsets = np.cumsum([0, *map(len, cases.values())])
    return [Member(offset=int(o), size=len(d)) for o, d in zip(offsets, cases.values(),
                                                                   strict=False)]


def test_the_batcher_leaves_what_the_device_cannot_decode_to_pillow() -> None:
    spec = image_spec(CLIP_224)
    assert spec is not None
    batcher = DeviceBatcher(torch.device("cpu"), [spec], [CLIP_224], [(3, 224, 224)])
    good, png = jpeg((300, 200), 5), jpeg((50, 50), 6, fmt="PNG")
    tokens = torch.zeros(77, dtype=torch.int64)
    items = [RawItem(7, tokens, raw(good), True, None),
             RawItem(8, tokens, raw(b"\xff\xd8 broken \xff\xd9"), True, None),
             RawItem(9, tokens, None, True, (CLIP_224(decode_image(png)),)),
             RawItem(10, tokens, None, False, None)]
    index, decoded, toks, images = batcher(items)
    assert index.tolist() == [7, 8, 9, 10]
    assert decoded.tolist() == [True, False, True, False]
    assert toks.shape == (4, 77) and images.shape == (4, 3, 224, 224)
    assert (images[0] - CLIP_224(decode_image(good))).abs().max() <= 2 * ONE_LEVEL
    assert torch.equal(images[2], CLIP_224(decode_image(png)))
    assert not images[1].any() and not images[3].any()


def test_prefetcher_yields_in_order_and_runs_at_most_depth_ahead() -> None:
    pulled: list[int] = []
    too_far = threading.Event()

    def source() -> Iterator[int]:
        for i in range(20):
            pulled.append(i)
            if len(pulled) > 1 + 2 + 1:  # consumed 1, depth 2, one in the thread's hands
                too_far.set()
            yield i

    with Prefetcher(source(), lambda i: [torch.tensor([i])], torch.device("cpu"),
                    depth=2) as batches:
        it = iter(batches)
        assert next(it)[0].item() == 0
        assert not too_far.wait(0.3)
        assert [b[0].item() for b in it] == list(range(1, 20))


def test_prefetcher_raises_the_threads_error_and_stops_when_left_early() -> None:
    def failing(i: int) -> list[torch.Tensor]:
        if i == 3:
            raise ValueError("batch 3 is bad")
        return [torch.tensor([i])]

    seen = []
    with pytest.raises(ValueError, match="batch 3 is bad"), \
            Prefetcher(iter(range(10)), failing, torch.device("cpu")) as batches:
        seen.extend(b[0].item() for b in batches)
    assert seen == [0, 1, 2]

    endless_closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            endless_closed.set()

    prefetcher = Prefetcher(endless(), lambda i: [torch.tensor([i])], torch.device("cpu"))
    with prefetcher as batches:
        assert next(iter(batches))[0].item() == 0
    assert not prefetcher._thread.is_alive()
    assert endless_closed.is_set()


@pytest.fixture(scope="module")
def mixed_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows, _ = evaluation_rows()
    rows = rows[:24]
    rows[3] = Row(rows[3].caption, jpeg((70, 90), 7, fmt="PNG"))
    rows[5] = Row(rows[5].caption, jpeg((120, 64), 8))
    rows += [Row("a photo of nothing", None), Row("a broken jpeg", b"\xff\xd8\xff\xe0broken"),
             Row("cut short", rows[0].image[: len(rows[0].image) // 2] if rows[0].image else None)]
    folder = tmp_path_factory.mktemp("mixed")
    write_shard(folder, 5, rows)
    return folder


def _scores(folder: Path, decode: DecodeMode, device: str = "cpu", workers: int = 0,
            on_batch: object = None) -> object:
    settings = ScoringSettings(model=ModelSpec(TINY_MODEL), device=device, batch_size=8,
                               workers=workers, decode=decode,
                               watermark=WatermarkSettings(kind=WatermarkKind.OFF))
    shard = open_local_shard(folder / "00000005.tar", folder / "00000005.parquet")
    return score_shard(build_scorer(settings), shard, on_batch=on_batch)  # type: ignore[arg-type]


def test_score_shard_on_the_device_path_matches_the_cpu_path(mixed_shard: Path) -> None:
    cpu = _scores(mixed_shard, DecodeMode.CPU)
    dev = _scores(mixed_shard, DecodeMode.DEVICE, workers=1)
    assert cpu.rows.tolist() == dev.rows.tolist()  # type: ignore[attr-defined]
    assert cpu.decoded.tolist() == dev.decoded.tolist()  # type: ignore[attr-defined]
    assert cpu.decoded.sum() == len(cpu.rows) - 2  # type: ignore[attr-defined]
    np.testing.assert_allclose(dev.img_emb, cpu.img_emb, atol=2e-3)  # type: ignore[attr-defined]
    np.testing.assert_allclose(dev.similarity, cpu.similarity,  # type: ignore[attr-defined]
                               atol=2e-3, equal_nan=True)


def test_an_abort_from_on_batch_ends_the_device_path_cleanly(mixed_shard: Path) -> None:
    calls = []

    class Abort(Exception):
        pass

    def abort(n: int) -> None:
        calls.append(n)
        raise Abort

    with pytest.raises(Abort):
        _scores(mixed_shard, DecodeMode.DEVICE, workers=1, on_batch=abort)
    assert calls == [8]
    # the prefetch thread joined; other threads are not counted: the DataLoader closes
    # its worker queues without joining their feeder threads (cancel_join_thread), which
    # end once flushed, after the shutdown returns (one was still alive under load in CI)
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]
    assert not multiprocessing.active_children()  # the loader's decode worker ended


@needs_cuda
@needs_ref
def test_nvjpeg_preprocessing_is_within_a_few_levels_of_the_reference() -> None:
    expected = np.load(REF / "expected_preprocessed_image.npy")
    got = on_device([(REF / "franz-kafka.jpg").read_bytes()], CLIP_224,
                    torch.device("cuda")).numpy()
    diff = np.abs(got - expected)
    assert diff.max() <= CUDA_MAX and diff.mean() <= CUDA_MEAN


@needs_cuda
def test_score_shard_on_cuda_matches_the_cpu_path(mixed_shard: Path) -> None:
    cpu = _scores(mixed_shard, DecodeMode.CPU)
    dev = _scores(mixed_shard, DecodeMode.AUTO, device="cuda", workers=1)
    assert cpu.decoded.tolist() == dev.decoded.tolist()  # type: ignore[attr-defined]
    np.testing.assert_allclose(dev.similarity, cpu.similarity,  # type: ignore[attr-defined]
                               atol=2e-2, equal_nan=True)
