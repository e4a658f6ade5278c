"""Turning loaded file contents into checked vectors and metadata, and back (shared by every format)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..embedding import SDXL_KEYS, SINGLE, Embedding
from ..errors import EmbeddingFormatError

logger = logging.getLogger(__name__)

# Widths of the two SDXL text encoders (CLIP ViT-L and OpenCLIP ViT-bigG).
SDXL_DIMS = {"clip_l": 768, "clip_g": 1280}
# Widths of the single-encoder models A1111 trains for (SD1.x, SD2.x); others only get a warning.
COMMON_SINGLE_DIMS = (768, 1024)
REAL_WIDTHS = {*COMMON_SINGLE_DIMS, *SDXL_DIMS.values()}  # token-table widths of released CLIP text encoders
# The constant A1111 writes under string_to_token (CLIP's id of "*"); loaders never read it.
A1111_TOKEN_ID = 265
METADATA_KEYS = ("name", "step", "sd_checkpoint", "sd_checkpoint_name")


@dataclass
class Decoded:
    """Vectors and metadata read from one file, before they become an `Embedding`."""

    vectors: dict[str, torch.Tensor]
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    stored_name: str | None = None
    layout: str = "a1111"  # "a1111" (string_to_param), "sdxl" (clip_l/clip_g) or "single-key"
    key: str | None = None  # the dict key of a single-key (diffusers/kohya) file

    def to_embedding(self, name: str, extra: dict[str, str] | None = None) -> Embedding:
        return Embedding(
            name=name,
            vectors=self.vectors,
            step=self.step,
            sd_checkpoint=self.sd_checkpoint,
            sd_checkpoint_name=self.sd_checkpoint_name,
            extra=dict(extra or {}),
        )


def check_vectors(value: Any, where: str, expected_dim: int | None = None) -> torch.Tensor:
    """Return `value` as a fresh CPU float32 (n, dim) tensor, or raise with what is wrong."""
    if not isinstance(value, torch.Tensor):
        raise EmbeddingFormatError(f"{where} is a {type(value).__name__}, not a tensor of vectors.")
    if not value.is_floating_point():
        raise EmbeddingFormatError(f"{where} has dtype {value.dtype}; embedding vectors must be floats.")
    t = value.detach()
    if t.ndim == 1:  # diffusers writes a single vector as (dim,)
        t = t.unsqueeze(0)
    if t.ndim != 2:
        raise EmbeddingFormatError(f"{where} has shape {tuple(value.shape)}; expected (vectors, dim), e.g. (8, 768).")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise EmbeddingFormatError(f"{where} has shape {tuple(value.shape)}: it holds no vectors.")
    if expected_dim is not None and t.shape[1] != expected_dim:
        raise EmbeddingFormatError(
            f"{where} is {t.shape[1]} wide; this text encoder needs {expected_dim}-wide vectors."
        )
    t = t.to("cpu", torch.float32).contiguous().clone()
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise EmbeddingFormatError(
            f"{where} contains {bad} NaN/inf values, so training diverged before it was saved; "
            "use an earlier snapshot of this embedding."
        )
    return t


def check_embedding_vectors(vectors: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Check a whole vectors dict: `{SINGLE: t}` or `{"clip_l": t, "clip_g": t}` with equal counts."""
    keys = set(vectors)
    if keys == {SINGLE}:
        t = check_vectors(vectors[SINGLE], where)
        if t.shape[1] not in COMMON_SINGLE_DIMS:
            logger.debug("%s is %d wide; SD1 embeddings are 768 and SD2 ones 1024 wide", where, t.shape[1])
        return {SINGLE: t}
    if keys == set(SDXL_KEYS):
        out = {k: check_vectors(vectors[k], f"{where} [{k}]") for k in SDXL_KEYS}
        widths = {k: int(t.shape[1]) for k, t in out.items()}
        # A real encoder's width in the wrong place is a broken file; widths no real CLIP has are a toy model's
        # (the embedded tiny-sdxl), whose files the model itself checks when they are used.
        if widths != SDXL_DIMS and not set(widths.values()).isdisjoint(REAL_WIDTHS):
            key = next(k for k in SDXL_KEYS if widths[k] != SDXL_DIMS[k])
            check_vectors(out[key], f"{where} [{key}]", SDXL_DIMS[key])
        if widths != SDXL_DIMS:
            logger.debug("%s is %s wide; SDXL embeddings are %s wide", where, widths, SDXL_DIMS)
        if out["clip_l"].shape[0] != out["clip_g"].shape[0]:
            raise EmbeddingFormatError(
                f"{where}: clip_l has {out['clip_l'].shape[0]} vectors but clip_g has "
                f"{out['clip_g'].shape[0]}; an SDXL embedding needs the same count in both."
            )
        return out
    raise EmbeddingFormatError(f"{where} has encoders {sorted(keys)}; expected [{SINGLE!r}] or {list(SDXL_KEYS)}.")


def _opt_str(value: Any, key: str, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    logger.warning("%s: ignoring %s of type %s", where, key, type(value).__name__)
    return None


def parse_step(value: Any, where: str) -> int:
    """A1111 stores None for never-trained embeddings; PNG JSON and safetensors metadata give text/floats."""
    if value is None:
        return 0
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        step = int(value)
    except (TypeError, ValueError):
        logger.warning("%s: ignoring step %r, which is not a number", where, value)
        return 0
    return max(step, 0)


def read_metadata(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {
        "step": parse_step(data.get("step"), where),
        "sd_checkpoint": _opt_str(data.get("sd_checkpoint"), "sd_checkpoint", where),
        "sd_checkpoint_name": _opt_str(data.get("sd_checkpoint_name"), "sd_checkpoint_name", where),
        "stored_name": _opt_str(data.get("name"), "name", where),
    }


def decode_data(data: Any, where: str) -> Decoded:
    """Interpret a loaded dict the way A1111's loader does, checking more and explaining failures.

    Order as in A1111: `string_to_param` (A1111/original TI), then a dict with `clip_l` and `clip_g`
    (SDXL, kohya/Forge), then a dict holding exactly one tensor (diffusers `learned_embeds`, kohya
    `emb_params`).
    """
    if not isinstance(data, Mapping):
        raise EmbeddingFormatError(
            f"{where} holds a {type(data).__name__}, not a dict: it is not a textual inversion embedding."
        )
    if not data:
        raise EmbeddingFormatError(f"{where} holds an empty dict: there are no vectors in it.")

    if "string_to_param" in data:
        params = data["string_to_param"]
        # Files pickled by torch 1.11 hold a ParameterDict; its entries live in `_parameters`.
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping) or not params:
            raise EmbeddingFormatError(f"{where}: string_to_param is empty or not a dict.")
        if len(params) != 1:
            raise EmbeddingFormatError(
                f"{where} has {len(params)} terms in string_to_param ({', '.join(map(str, params))}); "
                "A1111 loads one term per file, so split it into one file per term."
            )
        t = check_vectors(next(iter(params.values())), f"{where} string_to_param")
        return Decoded({SINGLE: t}, layout="a1111", **read_metadata(data, where))

    if all(k in data for k in SDXL_KEYS):
        extra_tensors = sorted(k for k, v in data.items() if isinstance(v, torch.Tensor) and k not in SDXL_KEYS)
        if extra_tensors:
            logger.warning("%s: ignoring tensors %s next to clip_l/clip_g", where, extra_tensors)
        if any(not isinstance(v, torch.Tensor) for v in data.values()):
            # A1111 and Forge call .detach() on every value of such a dict and fail on these files.
            logger.warning("%s: SDXL file with non-tensor keys; A1111/Forge cannot load it as is", where)
        vectors = check_embedding_vectors({k: data[k] for k in SDXL_KEYS}, where)
        return Decoded(vectors, layout="sdxl", **read_metadata(data, where))

    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1 and len(data) == 1:
        key, value = next(iter(tensors.items()))
        return Decoded({SINGLE: check_vectors(value, f"{where} [{key}]")}, layout="single-key", key=str(key))
    if len(tensors) == 1:
        others = ", ".join(sorted(map(str, set(data) - set(tensors))))
        raise EmbeddingFormatError(
            f"{where} holds one tensor plus the keys {others}; A1111 loads such a file only when the "
            "tensor is its single key. Re-save it with just the tensor."
        )
    if len(tensors) > 1:
        raise EmbeddingFormatError(
            f"{where} holds {len(tensors)} tensors ({', '.join(map(str, list(tensors)[:6]))}); an embedding "
            "file holds one term (or clip_l + clip_g for SDXL). Is it a LoRA or a model instead?"
        )
    raise EmbeddingFormatError(
        f"{where} is neither an A1111 embedding (string_to_param), an SDXL one (clip_l + clip_g) nor a "
        f"diffusers/kohya one (a single tensor); its keys are {', '.join(map(str, list(data)[:8]))}."
    )


def a1111_dict(embedding: Embedding) -> dict[str, Any]:
    """The dict A1111's `Embedding.save` writes, with exactly its keys (single encoder only)."""
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": embedding.single()},
        "name": embedding.name,
        "step": int(embedding.step),
        "sd_checkpoint": embedding.sd_checkpoint,
        "sd_checkpoint_name": embedding.sd_checkpoint_name,
    }


def checked_for_writing(embedding: Embedding) -> Embedding:
    """A detached CPU float32 copy whose vectors passed the same checks as loading."""
    copy = embedding.detached()
    copy.vectors = check_embedding_vectors(copy.vectors, f"embedding {embedding.name!r}")
    return copy
