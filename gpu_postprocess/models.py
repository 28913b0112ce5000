"""Loading open_clip models: pretrained tags, checkpoint paths, ``local-dir:`` and ``hf-hub:``.

One factory, ``load_clip``, turns a ``ModelSpec`` into a ready ``ClipModel`` (eval mode, on
its device, with its preprocessing and tokenizer). Nothing here downloads unless open_clip
is asked for a pretrained tag or ``hf-hub:`` and the network allows it; with
``HF_HUB_OFFLINE=1`` such a request fails with a ``ModelLoadError`` that says so.

Error handling: every open_clip / torch / file error is raised as ``ModelLoadError``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from gpu_postprocess.errors import ModelLoadError, SettingsError

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "amp_fp16", "amp_bf16")


@dataclass(frozen=True)
class ModelSpec:
    """An open_clip model name (or ``local-dir:`` / ``hf-hub:``) and its weights.

    ``pretrained`` is a tag (``laion2b_s34b_b79k``), a checkpoint path, or None for random
    initialisation (same compute as the real model: used by benchmarks).
    """

    name: str
    pretrained: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME`` or ``NAME@PRETRAINED`` (``@`` because paths and schemas hold ``:``)."""
        name, _, pretrained = text.partition("@")
        if not name:
            raise SettingsError(f"empty model name in {text!r}")
        return cls(name=name, pretrained=pretrained or None)

    def __str__(self) -> str:
        return self.name if self.pretrained is None else f"{self.name}@{self.pretrained}"


@dataclass
class ClipModel:
    spec: ModelSpec
    model: Any
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    precision: str
    embed_dim: int

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Mixed precision on CUDA for the ``amp_*`` precisions; a no-op otherwise."""
        dtypes = {"amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}
        if self.precision not in dtypes:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtypes[self.precision])

    @torch.inference_mode()
    def encode(self, images: torch.Tensor | None,
               tokens: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """L2-normalised float32 image and text embeddings (on the model's device)."""
        with self.autocast():
            img = None if images is None else self.model.encode_image(
                images.to(self.device, non_blocking=True))
            txt = None if tokens is None else encode_text(
                self.model, tokens.to(self.device, non_blocking=True))
        return _unit(img), _unit(txt)


def _trimmable(model: Any) -> bool:
    """A CLIP text tower with a causal mask that pools at the EOT token."""
    return (isinstance(model, open_clip.CLIP) and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", "") in ("argmax", "eos"))


def encode_text(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` run only over the batch's longest caption, not the full context.

    Exact for causal text towers pooled at the EOT token (open_clip's CLIP): no position
    attends to a later one, so the padding after the last EOT cannot change the pooled
    feature. Captions are short (LAION median about 10 tokens of 77), so this cuts the
    text tower's work several times over. Other towers run as they are.
    """
    if not _trimmable(model):
        return model.encode_text(tokens)
    length = int((tokens != 0).sum(dim=1).max().item())
    length = max(1, min(length, tokens.shape[1]))
    text = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(x, text, model.text_pool_type,
                                               eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x if model.text_projection is None else x @ model.text_projection


def _unit(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    return torch.nn.functional.normalize(x.float(), dim=-1)


def resolve_device(choice: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError("--device cuda asked for, but torch sees no CUDA device")
    try:
        return torch.device(choice)
    except RuntimeError as exc:
        raise SettingsError(f"unknown device {choice!r}") from exc


def resolve_precision(choice: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    if choice not in PRECISIONS:
        raise SettingsError(f"precision must be one of {PRECISIONS}, not {choice!r}")
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "fp32"
    return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"


@contextlib.contextmanager
def _converted(spec: ModelSpec) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        hint = ""
        if spec.pretrained and not Path(spec.pretrained).exists():
            hint = (" (a pretrained tag needs the network or a filled cache; "
                    "with HF_HUB_OFFLINE=1 give a checkpoint path instead)")
        raise ModelLoadError(f"cannot load open_clip model {spec}: {exc}{hint}") from exc


def load_clip(spec: ModelSpec, device: torch.device, precision: str = "fp32") -> ClipModel:
    """Build the model, load its weights, move it to ``device`` in eval mode."""
    if spec.pretrained is None and ":" not in spec.name:
        log.warning("model %s has random weights (no --pretrained): scores are meaningless",
                    spec.name)
    with _converted(spec):
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(spec.name)
    model.eval()
    embed_dim = int(model.visual.output_dim)
    return ClipModel(spec=spec, model=model, preprocess=preprocess, tokenizer=tokenizer,
                     device=device, precision=precision, embed_dim=embed_dim)

