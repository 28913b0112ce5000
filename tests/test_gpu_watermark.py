"""Watermark tagging: LAION's EfficientNet-B3 head from a file or a (local) release URL,
the CLIP-embedding probe, and 'no weights -> no values'."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpu_postprocess.errors import ModelLoadError
from gpu_postprocess.watermark import (
    CACHE_NAME,
    ClipProbeWatermark,
    EfficientNetWatermark,
    WatermarkKind,
    WatermarkSettings,
    build_efficientnet,
    efficientnet_transform,
    load_watermark,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wm") / "model.pt"
    torch.save(build_efficientnet().state_dict(), path)
    return path


@pytest.fixture
def file_server(weights_file: Path) -> Iterator[str]:
    """A real HTTP server on loopback serving the weights' folder."""
    handler = functools.partial(_QuietHandler, directory=str(weights_file.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _images() -> torch.Tensor:
    t = efficientnet_transform()
    pics = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (64, 640), (9, 9, 9))]
    return torch.stack([t(p) for p in pics])


def test_head_is_laions() -> None:
    model = build_efficientnet()
    dims = [(m.in_features, m.out_features) for m in model.classifier
            if isinstance(m, torch.nn.Linear)]
    assert dims == [(1536, 625), (625, 256), (256, 2)]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.classifier)


def test_transform_squashes_to_256_with_imagenet_normalisation() -> None:
    x = efficientnet_transform()(Image.new("RGB", (400, 100), (255, 255, 255)))
    assert x.shape == (3, 256, 256)
    np.testing.assert_allclose(x[:, 0, 0].numpy(), [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                    (1 - 0.406) / 0.225], rtol=1e-6)


def test_local_weights_give_softmax_class_0(weights_file: Path) -> None:
    wm = load_watermark(WatermarkSettings(kind=WatermarkKind.EFFICIENTNET, weights=weights_file),
                        CPU)
    assert isinstance(wm, EfficientNetWatermark)
    reference = build_efficientnet()
    reference.load_state_dict(torch.load(weights_file, weights_only=True))
    reference.eval()
    images = _images()
    with torch.inference_mode():
        expected = torch.softmax(reference(images), dim=1)[:, 0].numpy()
    got = wm.score_images(images)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert ((got >= 0) & (got <= 1)).all()


def test_fetched_from_release_url_once_then_cached(file_server: str, tmp_path: Path) -> None:
    settings = WatermarkSettings(kind=WatermarkKind.AUTO, url=f"{file_server}/model.pt",
                                 cache_dir=tmp_path)
    assert isinstance(load_watermark(settings, CPU), EfficientNetWatermark)
    assert (tmp_path / CACHE_NAME).is_file()
    offline = WatermarkSettings(kind=WatermarkKind.AUTO, url="http://127.0.0.1:9/none.pt",
                                cache_dir=tmp_path)
    assert isinstance(load_watermark(offline, CPU), EfficientNetWatermark)


def test_no_weights_means_no_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = WatermarkSettings(kind=WatermarkKind.AUTO, url="http://127.0.0.1:9/model.pt",
                                 cache_dir=tmp_path, fetch_timeout_s=2)
    assert load_watermark(settings, CPU) is None
    assert "pwatermark left empty" in caplog.text
    assert not list(tmp_path.iterdir())
    assert load_watermark(WatermarkSettings(kind=WatermarkKind.CLIP_PROBE), CPU) is None
    assert load_watermark(WatermarkSettings(kind=WatermarkKind.OFF), CPU) is None


def test_http_error_leaves_no_partial_file(file_server: str, tmp_path: Path) -> None:
    settings = WatermarkSettings(kind=WatermarkKind.EFFICIENTNET,
                                 url=f"{file_server}/missing.pt", cache_dir=tmp_path)
    assert load_watermark(settings, CPU) is None
    assert not list(tmp_path.iterdir())


def test_corrupt_weights_are_a_model_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"bad\.pt"):
        load_watermark(WatermarkSettings(kind=WatermarkKind.EFFICIENTNET, weights=bad), CPU)


@pytest.mark.parametrize("outputs", [1, 2])
def test_clip_probe(tmp_path: Path, outputs: int) -> None:
    rng = np.random.default_rng(outputs)
    k0, b0 = rng.standard_normal((32, 8)), rng.standard_normal(8)
    k1, b1 = rng.standard_normal((8, outputs)), rng.standard_normal(outputs)
    path = tmp_path / "probe.npz"
    np.savez(path, n_dense=2, dense_0_kernel=k0, dense_0_bias=b0, dense_1_kernel=k1,
             dense_1_bias=b1)
    wm = load_watermark(WatermarkSettings(kind=WatermarkKind.CLIP_PROBE, weights=path), CPU)
    assert isinstance(wm, ClipProbeWatermark)
    emb = rng.standard_normal((5, 32)).astype(np.float32)
    logits = np.maximum(emb @ k0 + b0, 0) @ k1 + b1
    if outputs == 1:
        expected = 1 / (1 + np.exp(-logits[:, 0]))
    else:
        e = np.exp(logits - logits.max(1, keepdims=True))
        expected = e[:, 0] / e.sum(1)
    np.testing.assert_allclose(wm.score_embeddings(emb), expected, atol=1e-5)
