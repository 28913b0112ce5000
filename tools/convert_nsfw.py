"""Convert LAION's autokeras CLIP NSFW detectors to the weights ``gpu_postprocess.nsfw`` loads.

Development tool, run once with TensorFlow in its own virtual environment (TensorFlow is
never a dependency of pairfarm)::

    python3 -m venv .venv-nsfw && .venv-nsfw/bin/pip install tensorflow-cpu numpy
    .venv-nsfw/bin/python tools/convert_nsfw.py ../shared/models/laion-nsfw

It reads ``clip_autokeras_nsfw_b32.zip`` (ViT-B/32, 512-d) and
``clip_autokeras_binary_nsfw.zip`` (ViT-L/14, 768-d) and writes

- ``gpu_postprocess/weights/nsfw_{b32,l14}.npz``: the categorical columns with their
  vocabularies, the normaliser's mean and variance, the Dense kernels ([in, out]) and biases;
- ``tests/data/nsfw_tf_reference.npz``: inputs and the SavedModel's own outputs, recorded
  here so that the test of the PyTorch port needs no TensorFlow.

The vocabularies are not in the checkpoint (its ``token_counts`` tables are empty): they
live in the SavedModel's lookup tables, exported with ``LookupTableExportV2``.
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

MODELS = {"b32": ("clip_autokeras_nsfw_b32", 512), "l14": ("clip_autokeras_binary_nsfw", 768)}
REPO = Path(__file__).resolve().parent.parent


def unpack(zip_path: Path, into: Path) -> Path:
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(into)
    return into / zip_path.stem


def export_vocabularies(model: Any) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """column -> (keys as '%f' strings, integer indices) from the encoding layer's tables."""
    encoder = model._trackable_children()["layer_with_weights-0"]
    layers = encoder._trackable_children()["encoding_layers"]._trackable_children()
    vocab = {}
    for column, layer in layers.items():
        table = layer._trackable_children()["lookup_table"]
        keys, values = tf.raw_ops.LookupTableExportV2(
            table_handle=table.resource_handle, Tkeys=tf.string, Tvalues=tf.int64)
        vocab[int(column)] = (keys.numpy().astype(str), values.numpy().astype(np.int64))
    return vocab


def dense_layers(reader: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    names = reader.get_variable_to_shape_map()
    layers = []
    index = 2
    while f"layer_with_weights-{index}/kernel/.ATTRIBUTES/VARIABLE_VALUE" in names:
        prefix = f"layer_with_weights-{index}"
        layers.append((reader.get_tensor(f"{prefix}/kernel/.ATTRIBUTES/VARIABLE_VALUE"),
                       reader.get_tensor(f"{prefix}/bias/.ATTRIBUTES/VARIABLE_VALUE")))
        index += 1
    return layers


def weights_of(model_dir: Path, model: Any) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(model_dir / "variables" / "variables"))
    norm = "layer_with_weights-1/{}/.ATTRIBUTES/VARIABLE_VALUE"
    out: dict[str, np.ndarray] = {
        "mean": reader.get_tensor(norm.format("mean")).astype(np.float32),
        "variance": reader.get_tensor(norm.format("variance")).astype(np.float32),
    }
    vocab = export_vocabularies(model)
    out["categorical_columns"] = np.array(sorted(vocab), dtype=np.int64)
    for column, (keys, values) in vocab.items():
        out[f"vocab_{column}_keys"] = keys
        out[f"vocab_{column}_values"] = values
    layers = dense_layers(reader)
    out["n_dense"] = np.array(len(layers), dtype=np.int64)
    for i, (kernel, bias) in enumerate(layers):
        out[f"dense_{i}_kernel"] = kernel.astype(np.float32)
        out[f"dense_{i}_bias"] = bias.astype(np.float32)
    return out


def reference_inputs(dim: int, vocab_columns: dict[int, np.ndarray], seed: int) -> np.ndarray:
    """Unit vectors (float32), their fp16 roundings, and rows whose categorical columns
    hold vocabulary values, so that the lookup is exercised, not only its unknown bucket."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fp16 = x.astype(np.float16).astype(np.float32)
    hit = fp16.copy()
    for column, keys in vocab_columns.items():
        hit[:, column] = rng.choice(keys.astype(np.float64), size=len(hit)).astype(np.float32)
    return np.concatenate([x, fp16, hit])


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    out = model.signatures["serving_default"](input_1=tf.constant(x.astype(np.float64)))
    return out["classification_head_1"].numpy()[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with the published zip files")
    parser.add_argument("--weights-dir", type=Path, default=REPO / "gpu_postprocess" / "weights")
    parser.add_argument("--reference", type=Path,
                        default=REPO / "tests" / "data" / "nsfw_tf_reference.npz")
    args = parser.parse_args()
    reference: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (name, (stem, dim)) in enumerate(MODELS.items()):
            model_dir = unpack(args.source / f"{stem}.zip", Path(tmp))
            model = tf.saved_model.load(str(model_dir))
            weights = weights_of(model_dir, model)
            np.savez_compressed(args.weights_dir / f"nsfw_{name}.npz", **weights)
            vocab = {int(c): weights[f"vocab_{c}_keys"] for c in weights["categorical_columns"]}
            x = reference_inputs(dim, vocab, seed)
            reference[f"{name}_inputs"] = x
            reference[f"{name}_outputs"] = predict(model, x)
            print(f"{name}: {len(weights['categorical_columns'])} categorical columns, "
                  f"{int(weights['n_dense'])} dense layers, {len(x)} reference rows")
    np.savez_compressed(args.reference, **reference)


if __name__ == "__main__":
    main()
