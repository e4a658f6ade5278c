"""A1111's `.pt` format (torch.save of a plain dict), plus the SDXL `{clip_l, clip_g}` dict."""

from __future__ import annotations

import logging
from pathlib import Path

from ..embedding import SDXL_KEYS, Embedding
from ._data import Decoded, a1111_dict, decode_data
from .safe_torch import load_torch_file, save_torch_file

logger = logging.getLogger(__name__)


def read(path: Path) -> Decoded:
    """Any torch pickle holding an embedding dict (A1111, SDXL or single-key)."""
    return decode_data(load_torch_file(path), path.name)


def write(embedding: Embedding, path: Path) -> list[Path]:
    """Write what A1111 and Forge load: the exact `Embedding.save` dict, or for SDXL the two tensors.

    The SDXL dict holds only the tensors: A1111/Forge call `.detach()` on every value of a dict with
    clip_l/clip_g, so a `name` or `step` entry would make the file unloadable there. Use .safetensors
    to keep step and checkpoint metadata for SDXL.
    """
    if embedding.is_sdxl:
        if embedding.step or embedding.sd_checkpoint:
            logger.info("%s: SDXL .pt files cannot carry step/checkpoint metadata", path.name)
        data = {k: embedding.vectors[k] for k in SDXL_KEYS}
    else:
        data = a1111_dict(embedding)
    save_torch_file(data, path)
    return [path]
