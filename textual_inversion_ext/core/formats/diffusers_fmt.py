"""diffusers' `learned_embeds` files: `{token: (n, dim)}` as .bin (torch.save) or .safetensors, and the
SDXL pair `learned_embeds(.ext)` (text_encoder = clip_l) + `learned_embeds_2(.ext)` (text_encoder_2 = clip_g).
"""

from __future__ import annotations

import contextlib
import logging
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


def sibling_path(path: Path) -> Path:
    """diffusers names the text_encoder_2 file like the first one with `_2` before the suffix."""
    return path.with_name(f"{path.stem}_2{path.suffix}")


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


def _write_one(tensors: dict[str, torch.Tensor], embedding: Embedding, tmp: Path, suffix: str) -> None:
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
