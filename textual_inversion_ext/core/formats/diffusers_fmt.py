"""diffusers' `learned_embeds` files: `{token: (n, dim)}` as .bin (torch.save) or .safetensors, and the
SDXL pair `learned_embeds(.ext)` (text_encoder = clip_l) + `learned_embeds_2(.ext)` (text_encoder_2 = clip_g).

diffusers' SDXL training script saves checkpoints as `learned_embeds-steps-N` + `learned_embeds_2-steps-N`:
the `_2` goes before the `-steps-N` part, so the pair rule splits that part off first.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import torch

from ..embedding import SDXL_KEYS, SINGLE, Embedding
from ..errors import EmbeddingFormatError
from ..fileio import atomic_path
from ._data import SDXL_DIMS, Decoded
from .safetensors_fmt import metadata_for, write_tensors

logger = logging.getLogger(__name__)


def token_for(embedding: Embedding) -> str:
    # diffusers keys the tensor by its placeholder token; A1111 ignores the key.
    return embedding.extra.get("token") or embedding.name


_STEPS_SUFFIX = re.compile(r"^(?P<base>.*?)(?P<steps>-steps-\d+)?$", re.DOTALL)


def _split_steps(stem: str) -> tuple[str, str]:
    match = _STEPS_SUFFIX.match(stem)
    return (match["base"], match["steps"] or "") if match else (stem, "")


def sibling_path(path: Path) -> Path:
    """The text_encoder_2 (clip_g) file of a pair: `_2` before the suffix and before any `-steps-N`."""
    base, steps = _split_steps(path.stem)
    return path.with_name(f"{base}_2{steps}{path.suffix}")


def first_half_path(path: Path) -> Path | None:
    """The text_encoder (clip_l) file for a `_2` file (the inverse of sibling_path); None without `_2`."""
    base, steps = _split_steps(path.stem)
    if not base.endswith("_2") or len(base) == 2:
        return None
    return path.with_name(f"{base[:-2]}{steps}{path.suffix}")


def is_clip_g_half(decoded: Decoded) -> bool:
    """A single-key file as wide as SDXL's second text encoder: only diffusers' `_2` half looks so."""
    t = decoded.vectors.get(SINGLE)
    return decoded.layout == "single-key" and t is not None and t.shape[1] == SDXL_DIMS["clip_g"]


def is_pair(first: Decoded, second: Decoded) -> bool:
    a, b = first.vectors.get(SINGLE), second.vectors.get(SINGLE)
    return (
        first.layout == second.layout == "single-key"
        and a is not None
        and b is not None
        and a.shape[1] == SDXL_DIMS["clip_l"]
        and b.shape[1] == SDXL_DIMS["clip_g"]
        and a.shape[0] == b.shape[0]
    )


def join_pair(first: Decoded, second: Decoded) -> Decoded:
    if first.key != second.key:
        logger.info("SDXL pair with different tokens %r and %r; using the first", first.key, second.key)
    return Decoded(
        {"clip_l": first.vectors[SINGLE], "clip_g": second.vectors[SINGLE]},
        step=first.step,
        sd_checkpoint=first.sd_checkpoint,
        sd_checkpoint_name=first.sd_checkpoint_name,
        stored_name=first.stored_name,
        layout="single-key",
        key=first.key,
    )


def _layout(vectors: torch.Tensor) -> torch.Tensor:
    # One vector as (dim,): InvokeAI reads a diffusers file's width from shape[0] and so rejects (1, dim);
    # diffusers and A1111 load both layouts. Several vectors have no layout InvokeAI accepts.
    return vectors[0] if vectors.shape[0] == 1 else vectors


def _write_one(tensors: dict[str, torch.Tensor], embedding: Embedding, tmp: Path, suffix: str) -> None:
    tensors = {k: _layout(v) for k, v in tensors.items()}
    if suffix == ".bin":
        # diffusers (and A1111) expect the token to be the only key, so no metadata in .bin files
        torch.save(tensors, tmp)
    else:
        write_tensors(tensors, metadata_for(embedding), tmp)


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in {".bin", ".safetensors"}:
        raise EmbeddingFormatError(f"diffusers embeddings are .bin or .safetensors files, not {path.name}.")
    return suffix


def write_single(embedding: Embedding, path: Path) -> list[Path]:
    if embedding.is_sdxl:
        raise EmbeddingFormatError(
            "A diffusers learned_embeds file holds one text encoder; save an SDXL embedding as "
            "'diffusers-sdxl-pair' (two files) or as .safetensors/.pt with clip_l and clip_g."
        )
    suffix = _check_suffix(path)
    with atomic_path(path) as tmp:
        _write_one({token_for(embedding): embedding.vectors[SINGLE]}, embedding, tmp, suffix)
    return [path]


def write_pair(embedding: Embedding, path: Path) -> list[Path]:
    """Write `path` (clip_l) and its `_2` sibling (clip_g); neither is replaced unless both were written."""
    if not embedding.is_sdxl:
        raise EmbeddingFormatError(
            f"embedding {embedding.name!r} has one text encoder; the diffusers SDXL pair needs clip_l and clip_g."
        )
    suffix = _check_suffix(path)
    second = sibling_path(path)
    token = token_for(embedding)
    with contextlib.ExitStack() as stack:
        # atomic_path renames on exit, in reverse order: both temp files exist before either rename
        tmp_first = stack.enter_context(atomic_path(path))
        tmp_second = stack.enter_context(atomic_path(second))
        first_key, second_key = SDXL_KEYS
        _write_one({token: embedding.vectors[first_key]}, embedding, tmp_first, suffix)
        _write_one({token: embedding.vectors[second_key]}, embedding, tmp_second, suffix)
    return [path, second]
