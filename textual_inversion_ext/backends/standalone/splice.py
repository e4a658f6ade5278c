"""Putting embedding vectors into a CLIP prompt, the way A1111 does it (HOST-NOTES §1.4).

The trigger word's token-id sequence is found in the prompt's ids and each occurrence is replaced
by n placeholder slots; `SplicingEmbedding` then puts the vectors' rows into those slots while the
text encoder runs, so the result stays differentiable with respect to the vectors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ...core.tokens import token_ids

logger = logging.getLogger(__name__)

BOS = 49406
EOS = 49407
CONTEXT = 77  # CLIP's positions: BOS + 75 prompt tokens + EOS
CONTENT = CONTEXT - 2


@dataclass(frozen=True)
class PromptIds:
    """Ids of one prompt, BOS ... EOS + padding; `slots[i]` = vector index at i, or -1."""

    ids: tuple[int, ...]
    slots: tuple[int, ...]
    truncated: int  # prompt tokens dropped because they did not fit


@lru_cache(maxsize=4096)
def _trigger_ids(trigger: str) -> tuple[int, ...]:
    return tuple(token_ids(trigger)) if trigger else ()


@lru_cache(maxsize=4096)
def prompt_ids(prompt: str, trigger: str, n_vectors: int, pad_id: int) -> PromptIds:
    """Token ids for `prompt` with every `trigger` occurrence expanded to `n_vectors` slots.

    Depends on text only (never on vector values), so it is safe to cache."""
    content = token_ids(prompt)
    trig = _trigger_ids(trigger) if n_vectors > 0 else ()
    ids: list[int] = []
    slots: list[int] = []
    i, m = 0, len(trig)
    while i < len(content):
        if m and content[i : i + m] == list(trig):
            ids.extend([pad_id] * n_vectors)  # any valid id: the row is replaced anyway
            slots.extend(range(n_vectors))
            i += m
        else:
            ids.append(content[i])
            slots.append(-1)
            i += 1
    truncated = max(0, len(ids) - CONTENT)
    ids, slots = ids[:CONTENT], slots[:CONTENT]
    pad = CONTEXT - 2 - len(ids)
    return PromptIds(
        ids=(BOS, *ids, EOS, *([pad_id] * pad)),
        slots=(-1, *slots, -1, *([-1] * pad)),
        truncated=truncated,
    )


class SplicingEmbedding(nn.Embedding):
    """A token-embedding table that can put given vectors at marked positions.

    It shares the wrapped table's weight Parameter (same object, same state-dict key), so loading,
    freezing and `.to()` behave as before; without an active splice it is a plain lookup."""

    def __init__(self, base: nn.Embedding) -> None:
        nn.Module.__init__(self)
        self.num_embeddings = base.num_embeddings
        self.embedding_dim = base.embedding_dim
        self.padding_idx = base.padding_idx
        self.max_norm = base.max_norm
        self.norm_type = base.norm_type
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.sparse = base.sparse
        self.weight = base.weight
        self._splice: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = super().forward(input)
        if self._splice is None:
            return out
        slots, vectors = self._splice
        if slots.shape != input.shape:
            raise RuntimeError(f"splice slots {tuple(slots.shape)} != input ids {tuple(input.shape)}")
        # Cast inside: the vectors may be fp32 while the model runs in fp16.
        rows = vectors.to(device=out.device, dtype=out.dtype)[slots.clamp(min=0)]
        return torch.where((slots >= 0).unsqueeze(-1), rows, out)

    @contextlib.contextmanager
    def splicing(self, slots: torch.Tensor, vectors: torch.Tensor) -> Iterator[None]:
        self._splice = (slots, vectors)
        try:
            yield
        finally:
            self._splice = None


def install(text_encoder: nn.Module) -> SplicingEmbedding:
    """Wrap the text encoder's token embedding once (idempotent) and return the wrapper."""
    # transformers >= 5.6 flattened CLIPTextModel (no `.text_model`); older ones nest it.
    owner = getattr(text_encoder, "text_model", text_encoder).embeddings
    current = owner.token_embedding
    if not isinstance(current, SplicingEmbedding):
        current = SplicingEmbedding(current)
        owner.token_embedding = current
    return current


def batch_ids(
    prompts: Sequence[str], trigger: str, n_vectors: int, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(ids, slots) as (B, 77) long tensors, and the number of truncated tokens per prompt."""
    rows = [prompt_ids(p, trigger, n_vectors, pad_id) for p in prompts]
    ids = torch.tensor([r.ids for r in rows], dtype=torch.long, device=device)
    slots = torch.tensor([r.slots for r in rows], dtype=torch.long, device=device)
    return ids, slots, [r.truncated for r in rows]
