"""`.safetensors` embeddings: kohya/A1111 `emb_params`, SDXL `clip_l` + `clip_g`, diffusers `{token: t}`.

Metadata (name, step, checkpoint) goes into the header's `__metadata__` string dict, which loaders
that only want tensors (A1111's `load_file`, diffusers) never see.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..embedding import SDXL_KEYS, SINGLE, Embedding
from ..errors import EmbeddingFormatError
from ..fileio import atomic_path
from ._data import METADATA_KEYS, Decoded, decode_data, read_metadata

logger = logging.getLogger(__name__)

KOHYA_KEY = "emb_params"
_RESERVED = {*METADATA_KEYS, "format"}


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """8-byte little-endian header length, then a JSON object that fits in the file."""
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_len <= size - 8


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except MemoryError as exc:
        raise EmbeddingFormatError(
            f"{path.name} is damaged: its header declares more data than fits in memory; copy it again."
        ) from exc
    except Exception as exc:  # SafetensorError, OSError, ValueError, ...: whatever bad bytes cause
        raise EmbeddingFormatError(
            f"{path.name} is a damaged or truncated .safetensors file ({exc}); copy it again or use a backup."
        ) from exc
    return tensors, metadata


def read(path: Path) -> tuple[Decoded, dict[str, str]]:
    """Decode the tensors like A1111 would and take metadata from the header; returns (decoded, extra)."""
    tensors, metadata = read_file(path)
    decoded = decode_data(tensors, path.name)
    for key, value in read_metadata(metadata, path.name).items():
        setattr(decoded, key, value)
    extra = {k: v for k, v in metadata.items() if k not in _RESERVED}
    return decoded, extra


def metadata_for(embedding: Embedding) -> dict[str, str]:
    meta = {k: str(v) for k, v in embedding.extra.items() if k not in _RESERVED}
    meta["format"] = "pt"  # what diffusers and transformers write; some loaders look for it
    meta["name"] = embedding.name
    meta["step"] = str(int(embedding.step))
    if embedding.sd_checkpoint is not None:
        meta["sd_checkpoint"] = embedding.sd_checkpoint
    if embedding.sd_checkpoint_name is not None:
        meta["sd_checkpoint_name"] = embedding.sd_checkpoint_name
    return meta


def write_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], tmp: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write(embedding: Embedding, path: Path) -> list[Path]:
    """kohya/A1111 layout: `emb_params` (n, dim) for one encoder, `clip_l` + `clip_g` for SDXL."""
    if embedding.is_sdxl:
        tensors: dict[str, Any] = {k: embedding.vectors[k] for k in SDXL_KEYS}
    else:
        tensors = {KOHYA_KEY: embedding.vectors[SINGLE]}
    with atomic_path(path) as tmp:
        write_tensors(tensors, metadata_for(embedding), tmp)
    return [path]
