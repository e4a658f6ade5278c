"""Putting embedding vectors into a CLIP prompt, the way A1111 does it (HOST-NOTES §1.4).

The trigger word's token-id sequence is found in the prompt's ids and each occurrence is replaced
by n placeholder slots; `SplicingEmbedding` then puts the vectors' rows into those slots while the
text encoder runs, so the result stays differentiable with respect to the vectors.

Prompts longer than 75 tokens are split into chunks of 77 ids (BOS + 75 + EOS, padded) by A1111's
rules (`prompt_chunks`); each chunk is encoded on its own and the hidden states are concatenated
along the sequence axis (`encode_chunked`), so the UNet's context is (B, 77·k, dim).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from ...core.errors import ModelError
from ...core.tokens import token_ids

logger = logging.getLogger(__name__)

BOS = 49406
EOS = 49407
CONTEXT = 77  # CLIP's positions: BOS + 75 prompt tokens + EOS
CONTENT = CONTEXT - 2
# A1111's `comma_padding_backtrack` default: a chunk that fills up within this many tokens after a
# comma ends at the comma, and the words after it start the next chunk.
COMMA_BACKTRACK = 20
# Id under a vector slot in chunks (the row is replaced anyway). A1111 uses 0 too: never the end token,
# so an encoder that pools at the first end token (transformers' CLIP, SDXL's pooled output) finds the real one.
PLACEHOLDER = 0


@dataclass(frozen=True)
class PromptIds:
    """Ids of one prompt, BOS ... EOS + padding; `slots[i]` = vector index at i, or -1."""

    ids: tuple[int, ...]
    slots: tuple[int, ...]
    truncated: int  # prompt tokens dropped because they did not fit


@lru_cache(maxsize=4096)
def _trigger_ids(trigger: str) -> tuple[int, ...]:
    return tuple(token_ids(trigger)) if trigger else ()


@lru_cache(maxsize=1)
def _comma_id() -> int:
    return token_ids(",")[0]


def _find_trigger(content: list[int], i: int, trig: tuple[int, ...]) -> bool:
    return bool(trig) and tuple(content[i : i + len(trig)]) == trig


@lru_cache(maxsize=4096)
def prompt_ids(prompt: str, trigger: str, n_vectors: int, pad_id: int) -> PromptIds:
    """Token ids for `prompt` with every `trigger` occurrence expanded to `n_vectors` slots, cut to one
    chunk of 77 (the single-chunk form; encoders use `prompt_chunks`, which keeps the whole prompt).

    Depends on text only (never on vector values), so it is safe to cache."""
    content = token_ids(prompt)
    trig = _trigger_ids(trigger) if n_vectors > 0 else ()
    ids: list[int] = []
    slots: list[int] = []
    i = 0
    while i < len(content):
        if _find_trigger(content, i, trig):
            ids.extend([pad_id] * n_vectors)  # any valid id: the row is replaced anyway
            slots.extend(range(n_vectors))
            i += len(trig)
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


# ------------------------------------------------------------------ chunks (prompts over 75 tokens)


@dataclass(frozen=True)
class PromptChunks:
    """A prompt as k chunks of 77 ids (BOS, 75 tokens or padding, EOS, padding); `slots` as in PromptIds."""

    ids: tuple[tuple[int, ...], ...]
    slots: tuple[tuple[int, ...], ...]


def _close(ids: list[int], slots: list[int], pad_id: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    pad = CONTENT - len(ids)
    # SD1 pads with the end token, SD2/SDXL's OpenCLIP with 0: either way one EOS right after the text.
    return (BOS, *ids, EOS, *([pad_id] * pad)), (-1, *slots, -1, *([-1] * pad))


@lru_cache(maxsize=4096)
def prompt_chunks(prompt: str, trigger: str, n_vectors: int, pad_id: int) -> PromptChunks:
    """`prompt` as 77-id chunks by A1111's rules (`tokenize_line`), every `trigger` expanded to `n_vectors` slots.

    A chunk takes 75 tokens; a trigger whose vectors would cross that boundary moves whole into the next
    chunk (the current one is padded), and a chunk that fills up within COMMA_BACKTRACK tokens of a comma
    ends after the comma, the words after it moving on with the slots they hold (A1111 1.10 moves the
    placeholder ids but leaves the vectors' offsets behind, in the first chunk's padding: a bug not copied).
    An empty prompt is one empty chunk. Depends on text only (never on vector values), so it is safe to cache."""
    if n_vectors > CONTENT:
        raise ModelError(
            f"The embedding has {n_vectors} vectors, more than the {CONTENT} one CLIP chunk holds; its vectors "
            "are never split across chunks, so neither A1111 nor this trainer can use it. Create it with at "
            f"most {CONTENT} vectors.")
    content = token_ids(prompt)
    trig = _trigger_ids(trigger) if n_vectors > 0 else ()
    comma = _comma_id()
    chunks: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    ids: list[int] = []
    slots: list[int] = []
    last_comma = -1  # index in `ids` of this chunk's last comma
    i = 0
    while i < len(content):
        found = _find_trigger(content, i, trig)
        if not found and content[i] == comma:
            last_comma = len(ids)
        elif len(ids) == CONTENT and last_comma >= 0 and CONTENT - last_comma <= COMMA_BACKTRACK:
            cut = last_comma + 1
            chunks.append(_close(ids[:cut], slots[:cut], pad_id))
            ids, slots, last_comma = ids[cut:], slots[cut:], -1
        if len(ids) == CONTENT or (found and len(ids) + n_vectors > CONTENT):
            chunks.append(_close(ids, slots, pad_id))
            ids, slots, last_comma = [], [], -1
        if found:
            ids.extend([PLACEHOLDER] * n_vectors)
            slots.extend(range(n_vectors))
            i += len(trig)
        else:
            ids.append(content[i])
            slots.append(-1)
            i += 1
    if ids or not chunks:
        chunks.append(_close(ids, slots, pad_id))
    return PromptChunks(ids=tuple(c[0] for c in chunks), slots=tuple(c[1] for c in chunks))


def batch_chunks(
    prompts: Sequence[str], trigger: str, n_vectors: int, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, slots) as (B, k, 77) long tensors, k = the most chunks any prompt needs; a shorter prompt is
    padded with empty chunks (BOS EOS + padding), as A1111 pads a batch."""
    rows = [prompt_chunks(p, trigger, n_vectors, pad_id) for p in prompts]
    k = max(len(r.ids) for r in rows)
    empty_ids, empty_slots = _close([], [], pad_id)
    ids = [list(r.ids) + [empty_ids] * (k - len(r.ids)) for r in rows]
    slots = [list(r.slots) + [empty_slots] * (k - len(r.slots)) for r in rows]
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(slots, dtype=torch.long, device=device))


def encode_chunked(run_one: Callable[[torch.Tensor, torch.Tensor], Any], ids: torch.Tensor,
                   slots: torch.Tensor) -> Any:
    """Encode (B, k, 77) chunks and join them: hidden states (B, 77·k, dim).

    `run_one(ids, slots)` encodes (N, 77) rows and returns their hidden states (N, 77, dim), or a tuple
    (hidden states, *per-row tensors such as a pooled output). All B·k chunks go through one call (one
    encoder pass instead of k; each row is encoded on its own anyway). With a tuple the result is
    (hidden states, *each prompt's values from its first chunk): A1111 takes SDXL's pooled output there."""
    b, k, length = ids.shape
    out = run_one(ids.reshape(b * k, length), slots.reshape(b * k, length))
    hidden, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    joined = hidden.reshape(b, k * length, *hidden.shape[2:])
    if not isinstance(out, tuple):
        return joined
    return (joined, *(r.reshape(b, k, *r.shape[1:])[:, 0] for r in rest))


def encode_prompts(
    encoder: nn.Module, table: SplicingEmbedding, pad_id: int, prompts: Sequence[str], trigger: str,
    vectors: torch.Tensor | None, pick: Callable[[Any], Any], **kwargs: Any,
) -> Any:
    """One text encoder over `prompts` in chunks, `trigger` replaced by `vectors` (differentiably).

    `pick(output)` takes what is wanted from the encoder's output for (N, 77) rows (e.g. the last hidden
    state, or a tuple with a pooled output); `kwargs` go to the encoder. The result is `encode_chunked`'s."""
    n = 0 if vectors is None else int(vectors.shape[0])
    device = table.weight.device
    ids, slots = batch_chunks(list(prompts), trigger, n, pad_id, torch.device("cpu"))
    # Asked on the CPU copy: the same question of a GPU tensor would wait for the GPU at every step.
    spliced = vectors is not None and bool((slots >= 0).any())
    ids, slots = ids.to(device), slots.to(device)

    def run_one(chunk_ids: torch.Tensor, chunk_slots: torch.Tensor) -> Any:
        if not spliced:
            return pick(encoder(chunk_ids, **kwargs))
        with table.splicing(chunk_slots, vectors):
            return pick(encoder(chunk_ids, **kwargs))

    return encode_chunked(run_one, ids, slots)


def pad_to_match(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Give the prompt and negative-prompt hidden states one length, for classifier-free guidance in one
    UNet batch: the shorter is extended with `empty` (the encoding of an empty prompt, (1, 77, dim)) once per
    missing chunk, as A1111 does with its "pad prompt/negative prompt" option."""
    missing = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
    if missing == 0:
        return cond, uncond

    def extend(x: torch.Tensor, times: int) -> torch.Tensor:
        return torch.cat([x, empty.to(x.dtype).expand(x.shape[0], -1, -1).repeat(1, times, 1)], dim=1)

    return (cond, extend(uncond, missing)) if missing > 0 else (extend(cond, -missing), uncond)
