"""The in-memory embedding: named vectors per text encoder, plus the metadata A1111 keeps."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InvalidNameError, ModelError

# Key of the vectors for models with a single text encoder (SD1.x: CLIP ViT-L, SD2.x: OpenCLIP
# ViT-H). SDXL embeddings use "clip_l" and "clip_g", as in A1111's and Forge's file format.
SINGLE = "default"
SDXL_KEYS = ("clip_l", "clip_g")

_FORBIDDEN_NAME_CHARS = set('/\\:*?"<>|')

# A file stem (trigger word) is at most 200 bytes: well below the file systems' 255, which leaves room for
# `.pt.optim`/`.safetensors.json` and the atomic writes' temp decoration `.<file>.XXXXXXXX.tmp`.
MAX_STEM_BYTES = 200
# The longest suffix a run appends to a name for a file stem: the grid `<name>-comparison`, previews
# `<name>-<step>-<k>` and snapshots `<name>-<step>` (max_steps ≤ 1 000 000: "-1000000" is 8 bytes).
LONGEST_DERIVED_SUFFIX = "-comparison"
MAX_NAME_BYTES = MAX_STEM_BYTES - len(LONGEST_DERIVED_SUFFIX)  # 189: so every name that is accepted can train


def validate_name(name: str, *, derived: bool = False) -> str:
    """Return `name` stripped if it can be a trigger word and a file stem; raise otherwise.

    One length rule: a name leaves room for the longest suffix a run adds (MAX_NAME_BYTES); `derived=True` checks
    the stem of such a derived file (`<name>-<step>`), which may use that room (MAX_STEM_BYTES)."""
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
    limit = MAX_STEM_BYTES if derived else MAX_NAME_BYTES
    if len(cleaned.encode("utf-8")) > limit:
        raise InvalidNameError(
            f"The embedding name is {len(cleaned.encode('utf-8'))} bytes long; the limit is {limit} bytes (UTF-8), "
            "so that the files a training run names after it (e.g. '<name>-<step>.pt') stay valid. Use a shorter one.")
    return cleaned


def check_vectors(vectors: dict[str, torch.Tensor], encoders: dict[str, int]) -> dict[str, torch.Tensor]:
    """`vectors` unchanged if they fit a model whose text encoders are `encoders` (key -> width, as in
    `ModelInfo.encoders`): the same keys, each a 2-D `(n, width)` tensor, one `n` for all. ModelError otherwise."""
    if set(vectors) != set(encoders):
        hint = ""
        if set(SDXL_KEYS) & set(vectors) and not set(SDXL_KEYS) & set(encoders):
            hint = " (an SDXL embedding on an SD1/SD2 model?)"
        elif SINGLE in vectors and set(SDXL_KEYS) <= set(encoders):
            hint = " (an SD1/SD2 embedding on an SDXL model?)"
        raise ModelError(f"This model's text encoder(s) need vectors under {sorted(encoders)}; the embedding has "
                         f"{sorted(vectors)}{hint}.")
    for key, vec in vectors.items():
        if vec.ndim != 2 or vec.shape[1] != encoders[key]:
            where = "" if key == SINGLE else f" {key!r}"
            raise ModelError(f"The embedding's{where} vectors have shape {tuple(vec.shape)} but this model's text "
                             f"encoder needs (n, {encoders[key]}): it was made for another model family.")
    if len({int(v.shape[0]) for v in vectors.values()}) > 1:
        counts = {k: int(v.shape[0]) for k, v in vectors.items()}
        raise ModelError(f"The embedding has a different number of vectors per text encoder: {counts}.")
    return vectors


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
