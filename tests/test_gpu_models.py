"""Model loading: ``local-dir:`` and checkpoint-path round trips, offline tags, devices."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from gpu_postprocess.errors import ModelLoadError, SettingsError
from gpu_postprocess.models import ModelSpec, load_clip, resolve_device, resolve_precision
from tests.gpu_tiny import TINY_DIR, TINY_MODEL

CPU = torch.device("cpu")
CAPTIONS = ["a red circle", "quarterly tax report for small businesses"]


def _embed(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    clip = load_clip(spec, CPU)
    images = torch.stack([clip.preprocess(Image.new("RGB", (64, 64), c))
                          for c in ((220, 30, 30), (30, 60, 220))])
    img, txt = clip.encode(images, clip.tokenizer(CAPTIONS))
    assert img is not None and txt is not None
    return img.numpy(), txt.numpy()


def test_local_dir_loads_the_committed_weights() -> None:
    clip = load_clip(ModelSpec(TINY_MODEL), CPU)
    assert clip.embed_dim == 32
    assert not clip.model.training
    size = (TINY_DIR / "open_clip_model.safetensors").stat().st_size
    assert size < 5 * 2**20


def test_checkpoint_path_round_trip(tmp_path: Path) -> None:
    """Save the tiny model as a plain checkpoint, load it by config name + path."""
    config = json.loads((TINY_DIR / "open_clip_config.json").read_text())
    (tmp_path / "pairfarm-tiny-test.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(tmp_path / "pairfarm-tiny-test.json")
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": load_clip(ModelSpec(TINY_MODEL), CPU).model.state_dict()}, ckpt)
    a_img, a_txt = _embed(ModelSpec(TINY_MODEL))
    b_img, b_txt = _embed(ModelSpec("pairfarm-tiny-test", str(ckpt)))
    np.testing.assert_allclose(a_img, b_img, atol=1e-6)
    np.testing.assert_allclose(a_txt, b_txt, atol=1e-6)


def test_local_dir_round_trip_of_a_saved_model(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    clip = load_clip(ModelSpec(TINY_MODEL), CPU)
    (tmp_path / "open_clip_config.json").write_text((TINY_DIR / "open_clip_config.json")
                                                    .read_text())
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    np.testing.assert_allclose(_embed(ModelSpec(f"local-dir:{tmp_path}"))[0],
                               _embed(ModelSpec(TINY_MODEL))[0], atol=1e-6)


def test_offline_pretrained_tag_is_a_clear_error() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_clip(ModelSpec("ViT-B-32", "laion2b_s34b_b79k_not_cached"), CPU)


def test_missing_checkpoint_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        load_clip(ModelSpec(f"local-dir:{tmp_path / 'nowhere'}"), CPU)


def test_spec_parsing() -> None:
    assert ModelSpec.parse("ViT-B-32@openai") == ModelSpec("ViT-B-32", "openai")
    assert ModelSpec.parse("local-dir:/a/b") == ModelSpec("local-dir:/a/b", None)
    assert str(ModelSpec("ViT-L-14", "/ckpt/x.pt")) == "ViT-L-14@/ckpt/x.pt"
    with pytest.raises(SettingsError):
        ModelSpec.parse("@openai")


def test_devices_and_precisions() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_precision("auto", CPU) == "fp32"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(SettingsError, match="CUDA"):
            resolve_device("cuda")
    with pytest.raises(SettingsError):
        resolve_precision("fp8", CPU)


@pytest.mark.real_weights
@pytest.mark.skipif(os.environ.get("PAIRFARM_REAL_WEIGHTS") != "1",
                    reason="needs ViT-B-32 'openai' weights already in the open_clip cache "
                           "(nothing here may download weights); set PAIRFARM_REAL_WEIGHTS=1")
def test_real_vit_b32_prefers_the_right_caption() -> None:
    clip = load_clip(ModelSpec("ViT-B-32", "openai"), CPU)
    image = clip.preprocess(Image.new("RGB", (224, 224), (220, 20, 20)))[None]
    img, txt = clip.encode(image, clip.tokenizer(["a plain red square", "a photo of a dog"]))
    assert img is not None and txt is not None
    sims = (img @ txt.T)[0]
    assert sims[0] > sims[1]


@pytest.mark.parametrize("name", [TINY_MODEL, "ViT-B-32"])
def test_trimmed_text_encoding_equals_open_clips(name: str) -> None:
    from gpu_postprocess.models import encode_text

    clip = load_clip(ModelSpec(name), CPU)
    captions = ["x", "a red circle", "a photo of a much longer caption " * 3, ""]
    tokens = clip.tokenizer(captions)
    with torch.inference_mode():
        full = clip.model.encode_text(tokens)
        trimmed = encode_text(clip.model, tokens)
        single = encode_text(clip.model, tokens[:1])
    np.testing.assert_allclose(trimmed.numpy(), full.numpy(), atol=2e-5)
    np.testing.assert_allclose(single.numpy(), full[:1].numpy(), atol=2e-5)
