"""The in-memory embedding: named vectors per text encoder, plus the metadata A1111 keeps."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InvalidNameError

# Key of the vectors for models with a single text encoder (SD1.x: CLIP ViT-L, SD2.x: OpenCLIP
# ViT-H). SDXL embeddings use "clip_l" and "clip_g", as in A1111's and Forge's file format.
SINGLE = "default"
SDXL_KEYS = ("clip_l", "clip_g")

_FORBIDDEN_NAME_CHARS = set('/\\:*?"<>|')


def validate_name(name: str) -> str:
    """Return `name` stripped if it can be a trigger word and a file stem; raise otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidNameError("The embedding name is empty: give it a name, e.g. 'my-bmw'.")
    cleaned = name.strip()
    bad = sorted({c for c in cleaned if c in _FORBIDDEN_NAME_CHARS})
    if bad:
        raise InvalidNameError(
            f"The embedding name {cleaned!r} contains {' '.join(bad)}: names become file names and "
            "trigger words, so path separators and the characters \\ / : * ? \" < > | are not allowed."
        )
    if any(unicodedata.category(c).startswith("C") for c in cleaned):
        raise InvalidNameError(f"The embedding name {cleaned!r} contains control characters.")
    if cleaned in {".", ".."} or cleaned.startswith("."):
        raise InvalidNameError(
            f"The embedding name {cleaned!r} would be a hidden or relative path; start it with a letter."
        )
    if len(cleaned.encode("utf-8")) > 200:
        raise InvalidNameError("The embedding name is longer than 200 bytes; use a shorter one.")
    return cleaned


def trigger_word(path: str | Path) -> str:
    """A1111's rule for .pt/.bin/.safetensors: the trigger word is the file stem."""
    # A1111 uses os.path.splitext, so only the last suffix goes: "style.v2.pt" -> "style.v2".
    return Path(path).stem


@dataclass
class Embedding:
    """Vectors per text encoder (`{SINGLE: (n, dim)}` or `{"clip_l": (n,768), "clip_g": (n,1280)}`)."""

    name: str
    vectors: dict[str, torch.Tensor]
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ValueError("an embedding needs at least one set of vectors")
        counts = {t.shape[0] for t in self.vectors.values()}
        if len(counts) != 1 or any(t.ndim != 2 for t in self.vectors.values()):
            shapes = {k: tuple(v.shape) for k, v in self.vectors.items()}
            raise ValueError(f"every encoder needs a 2-D (vectors, dim) tensor with the same count: {shapes}")

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def is_sdxl(self) -> bool:
        return set(SDXL_KEYS) <= set(self.vectors)

    @property
    def dims(self) -> dict[str, int]:
        return {k: int(v.shape[1]) for k, v in self.vectors.items()}

    def single(self) -> torch.Tensor:
        """The (n, dim) tensor of a single-encoder embedding."""
        if set(self.vectors) != {SINGLE}:
            raise ValueError(f"embedding {self.name!r} has encoders {sorted(self.vectors)}, not a single one")
        return self.vectors[SINGLE]

    def detached(self) -> Embedding:
        """A CPU float32 copy that shares nothing with a tensor under training."""
        return Embedding(
            name=self.name,
            vectors={k: v.detach().to("cpu", torch.float32).clone() for k, v in self.vectors.items()},
            step=self.step,
            sd_checkpoint=self.sd_checkpoint,
            sd_checkpoint_name=self.sd_checkpoint_name,
            extra=dict(self.extra),
        )

    def a1111_checksum(self) -> str:
        """A1111's 16-bit checksum of the vectors, which pairs a `.optim` file with its embedding."""
        first = next(iter(self.vectors.values()))  # A1111 hashes only the first tensor of a dict
        r = 0
        for v in (first.detach().float().cpu().reshape(-1) * 100).tolist():
            r = (r * 281 ^ int(v) * 997) & 0xFFFFFFFF
        return f"{r & 0xFFFF:04x}"

    def content_hash(self) -> str:
        """sha256 over the float32 vectors (stable across formats); shown by `info`."""
        h = hashlib.sha256()
        for key in sorted(self.vectors):
            h.update(key.encode())
            h.update(self.vectors[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()
