"""The PyTorch port of LAION's NSFW detector against recorded TensorFlow outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpu_postprocess.errors import ModelLoadError
from gpu_postprocess.nsfw import (
    NsfwLabel,
    detector_for_dim,
    load_detector,
    nsfw_label,
    shipped_path,
)
from tests.conftest import REPO

#: written by tools/convert_nsfw.py from the SavedModels (TensorFlow 2.21, float64 inputs):
#: 64 random unit vectors, their fp16 roundings, and 64 rows whose categorical columns
#: hold vocabulary values
REFERENCE = REPO / "tests" / "data" / "nsfw_tf_reference.npz"
MODELS = [("b32", 512), ("l14", 768)]


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize(("name", "dim"), MODELS)
def test_port_matches_tensorflow_within_1e5(reference: dict[str, np.ndarray], name: str,
                                            dim: int) -> None:
    detector = detector_for_dim(dim)
    assert detector is not None
    x, expected = reference[f"{name}_inputs"], reference[f"{name}_outputs"]
    np.testing.assert_allclose(detector.score(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("name", "dim"), MODELS)
def test_categorical_lookup_is_what_makes_it_match(reference: dict[str, np.ndarray], name: str,
                                                   dim: int) -> None:
    """Without the vocabulary lookup (a plain MLP port) the rows that hit the vocabulary
    are far off: the reference does exercise the lookup."""
    import torch

    detector = detector_for_dim(dim)
    assert detector is not None
    x, expected = reference[f"{name}_inputs"], reference[f"{name}_outputs"]
    with torch.inference_mode():
        plain = detector(torch.from_numpy(x)).numpy()
    assert np.abs(plain - expected).max() > 1e-3
    encoded = detector.encode_categorical(x)
    changed = encoded != x.astype(np.float32)
    assert changed[:, [c.column for c in detector.categorical]].any()
    assert not changed[:, [i for i in range(dim)
                           if i not in {c.column for c in detector.categorical}]].any()


def test_fp16_embeddings_hit_the_vocabulary() -> None:
    """The vocabularies hold fp16-rounded values, as LAION's embeddings were."""
    detector = detector_for_dim(512)
    assert detector is not None
    col = detector.categorical[0]
    key, index = next(iter(col.vocabulary.items()))
    value = np.float32(np.float16(float(key)))
    assert col.encode(np.array([value], dtype=np.float64))[0] == index
    assert col.encode(np.array([123.0]))[0] == 0


@pytest.mark.parametrize(("p", "label"), [
    (0.0, NsfwLabel.UNLIKELY), (0.0999, NsfwLabel.UNLIKELY), (0.1, NsfwLabel.UNSURE),
    (0.5, NsfwLabel.UNSURE), (0.8999, NsfwLabel.UNSURE), (0.9, NsfwLabel.NSFW),
    (1.0, NsfwLabel.NSFW), (None, NsfwLabel.UNTAGGED), (float("nan"), NsfwLabel.UNTAGGED),
])
def test_tfds_four_way_label(p: float | None, label: NsfwLabel) -> None:
    assert nsfw_label(p) is label


def test_no_detector_for_other_widths() -> None:
    assert shipped_path(32) is None
    assert detector_for_dim(32) is None


def test_shipped_weights_carry_the_licence() -> None:
    path = shipped_path(512)
    assert path is not None
    licence = (path.parent / "LICENSE-laion-nsfw.txt").read_text()
    assert "Christoph Schuhmann" in licence and "MIT" in licence


def test_bad_weights_file_is_a_model_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "w.npz"
    np.savez(bad, mean=np.zeros(3))
    with pytest.raises(ModelLoadError, match=r"w\.npz"):
        load_detector(bad)
    with pytest.raises(ModelLoadError):
        load_detector(tmp_path / "missing.npz")


def test_wrong_width_is_refused() -> None:
    detector = detector_for_dim(512)
    assert detector is not None
    with pytest.raises(ValueError, match="512"):
        detector.score(np.zeros((2, 768), dtype=np.float32))
