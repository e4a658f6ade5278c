"""Recognising a file by its first bytes, so a renamed file still loads as what it is."""

from __future__ import annotations

from pathlib import Path

from ..errors import EmbeddingFormatError
from .safetensors_fmt import looks_like_safetensors

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sniff(path: Path) -> str:
    """Return "image", "torch" or "safetensors"; raise EmbeddingFormatError for anything else."""
    if not path.is_file():
        raise EmbeddingFormatError(f"{path} does not exist or is not a file.")
    size = path.stat().st_size
    if size == 0:
        raise EmbeddingFormatError(f"{path.name} is empty (0 bytes): the download or save did not finish.")
    with path.open("rb") as fh:
        head = fh.read(16)
    if head.startswith(PNG_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head.startswith(b"PK\x03\x04"):
        return "torch"  # torch.save's zip container
    if head[:1] == b"\x80" and head[1:2] in {b"\x02", b"\x03", b"\x04", b"\x05"}:
        return "torch"  # legacy torch.save / plain pickle
    if looks_like_safetensors(head, size):
        return "safetensors"
    raise EmbeddingFormatError(
        f"{path.name} is not an embedding file: it is neither a torch .pt/.bin, a .safetensors nor a "
        "PNG/WebP image (its first bytes match none of them)."
    )
