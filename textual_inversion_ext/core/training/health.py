"""Embedding health: how large the vectors are next to the model's own word vectors.

A vector whose norm grows far beyond the vocabulary's typical norm dominates cross-attention, so the
embedding overrides every other word of a prompt (a known cause of "it only ever draws the subject").
Norms are reported as a ratio to the median norm of the model's token-embedding table.
"""

from __future__ import annotations

import torch

from ..backend import Backend
from ..tokens import VOCAB_SIZE


def vocabulary_median_norms(backend: Backend, chunk: int = 4096) -> dict[str, float]:
    """Median row norm of each encoder's token-embedding table (ids without BOS/EOS/padding rows)."""
    ids = range(VOCAB_SIZE - 2)  # the last two ids are <start>/<end>
    norms: dict[str, list[torch.Tensor]] = {}
    # In chunks: float32 copies of whole tables (SDXL: 386 MiB) would raise the run's peak memory.
    for start in range(0, len(ids), chunk):
        for key, rows in backend.token_rows(ids[start:start + chunk]).items():
            norms.setdefault(key, []).append(rows.float().norm(dim=1))
    return {key: float(torch.cat(parts).median()) for key, parts in norms.items()}


def norm_ratios(vectors: dict[str, torch.Tensor], medians: dict[str, float]) -> dict[str, list[float]]:
    """Per encoder, each vector's norm divided by that encoder's vocabulary median."""
    with torch.no_grad():
        return {key: (vec.detach().float().norm(dim=1) / medians[key]).cpu().tolist()
                for key, vec in vectors.items()}


def max_ratio(ratios: dict[str, list[float]]) -> float:
    return max((r for values in ratios.values() for r in values), default=0.0)


@torch.no_grad()
def cap_norms(vectors: dict[str, torch.Tensor], medians: dict[str, float], cap: float) -> None:
    """Scale every vector longer than `cap` × the vocabulary median back to that length (in place)."""
    for key, vec in vectors.items():
        limit = cap * medians[key]
        scale = (limit / vec.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        vec.mul_(scale)
