"""CLIP BPE token counting (offline) and initial embedding vectors from an init text's token rows.

SD1's CLIP ViT-L and SD2's OpenCLIP ViT-H share one BPE vocabulary (49408 ids), and open_clip ships
it inside its package, so counting tokens needs neither a model nor network access.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

logger = logging.getLogger(__name__)

# One CLIP chunk holds 77 ids: BOS + 75 prompt tokens + EOS. A1111 (and the standalone backend) split
# longer prompts into chunks, each encoded on its own; an embedding's vectors are never split across
# chunks, so an embedding has at most 75 vectors.
PROMPT_TOKEN_BUDGET = 75
VOCAB_SIZE = 49408  # ids 49406/49407 are <start>/<end>

INIT_MODES = ("pool", "truncate", "spread", "zeros")

_PRIVATE_MODULE = "_textual_inversion_ext_open_clip_tokenizer"


def _load_tokenizer_module() -> ModuleType:
    """open_clip's `tokenizer` module, without importing the whole package when possible.

    `import open_clip` runs its package __init__, which imports torchvision and timm (~5 s).
    `open_clip/tokenizer.py` itself only has absolute imports (ftfy, regex, numpy, torch), so we
    locate the package without importing it (find_spec of a top-level name does not execute it)
    and execute just that file under a private name. Its vocabulary path is derived from its own
    __file__, which stays the real file. Any surprise (a future open_clip with relative imports in
    tokenizer.py) falls back to the normal, slower import.
    """
    if "open_clip" in sys.modules:  # already paid for: use the real module
        return importlib.import_module("open_clip.tokenizer")
    if _PRIVATE_MODULE in sys.modules:
        return sys.modules[_PRIVATE_MODULE]
    try:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("open_clip is not installed (pip install open_clip_torch)")
        path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
        file_spec = importlib.util.spec_from_file_location(_PRIVATE_MODULE, path)
        if file_spec is None or file_spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[_PRIVATE_MODULE] = module
        try:
            file_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[_PRIVATE_MODULE]
            raise
        return module
    except Exception as exc:  # any failure here just means "take the slow path"
        logger.debug("fast open_clip tokenizer load failed (%s); importing open_clip", exc)
        return importlib.import_module("open_clip.tokenizer")


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    # Building the BPE tables reads and splits ~50k merges (~0.3 s): do it once per process.
    return _load_tokenizer_module().SimpleTokenizer()


def token_ids(text: str) -> list[int]:
    """CLIP token ids of `text` without BOS/EOS, cleaned (ftfy, whitespace) and lower-cased like CLIP."""
    if not text or not text.strip():
        return []
    return list(_tokenizer().encode(text))


def count_tokens(text: str) -> int:
    return len(token_ids(text))


def suggest_vectors(text: str) -> int:
    """Vectors per token for an init text: one per token, at least 1, at most the prompt budget."""
    return max(1, min(count_tokens(text), PROMPT_TOKEN_BUDGET))


def decode_tokens(ids: Sequence[int]) -> list[str]:
    """Readable text of each id, for messages (e.g. ["blue", "bmw"])."""
    tok = _tokenizer()
    out = []
    for i in ids:
        if i not in tok.decoder:
            raise ValueError(f"{i} is not a CLIP token id (0–{len(tok.decoder) - 1})")
        out.append(tok.decode([int(i)]).strip())
    return out


def _names(tokens: Sequence[str] | None, indices: Sequence[int]) -> str:
    if tokens is None:
        return "token " + ", ".join(f"#{i + 1}" for i in indices)
    return ", ".join(repr(tokens[i]) for i in indices)


def _group_bounds(n_tokens: int, n_vectors: int) -> list[tuple[int, int]]:
    """Split n_tokens (> n_vectors) into n_vectors consecutive, non-empty, near-equal groups."""
    return [(i * n_tokens // n_vectors, (i + 1) * n_tokens // n_vectors) for i in range(n_vectors)]


def init_vectors(
    rows: torch.Tensor,
    n_vectors: int,
    mode: str = "pool",
    *,
    tokens: Sequence[str] | None = None,
) -> tuple[torch.Tensor, str | None]:
    """Initial vectors (n_vectors, dim) float32 from the init text's token-embedding rows (n_tokens, dim).

    Returns the vectors and a message saying how tokens were mapped to vectors (None when each
    token got exactly one vector). `tokens` (the decoded init tokens) only makes messages readable.

    Modes when the text has more tokens than vectors:
    * "pool" (default): vector i is the mean of a consecutive group of tokens; every token counts.
    * "truncate": keep the first n_vectors tokens; the message names the dropped ones.
    * "spread": A1111's rule `vec[i] = rows[i * n_tokens // n_vectors]` (HOST-NOTES §1.6), which
      skips tokens; kept for reproducing host-made embeddings, and the message names the skipped ones.
    * "zeros": ignore the text, all-zero vectors.
    With fewer tokens than vectors, "pool", "truncate" and "spread" all repeat the tokens evenly
    (token j fills a run of consecutive vectors). An empty init text gives zero vectors.

    We differ from the host on purpose: its index rule silently drops tokens of a long init text,
    so an init text like "a red vintage sports car" would start from a few of its words only.
    """
    if mode not in INIT_MODES:
        raise ValueError(f"unknown init mode {mode!r}; use one of {', '.join(INIT_MODES)}")
    if n_vectors < 1:
        raise ValueError(f"n_vectors must be at least 1, got {n_vectors}")
    if rows.ndim != 2:
        raise ValueError(f"rows must be a 2-D (n_tokens, dim) tensor, got shape {tuple(rows.shape)}")
    if tokens is not None and len(tokens) != rows.shape[0]:
        raise ValueError(f"{len(tokens)} token names for {rows.shape[0]} rows")
    rows = rows.detach().to(torch.float32)
    n_tokens, dim = rows.shape
    zeros = torch.zeros(n_vectors, dim, device=rows.device)
    if mode == "zeros":
        return zeros, "All vectors start at zero (init mode 'zeros')."
    if n_tokens == 0:
        return zeros, "The init text is empty: all vectors start at zero."
    if n_tokens == n_vectors:
        return rows.clone(), None
    if n_tokens < n_vectors:
        index = torch.arange(n_vectors, device=rows.device) * n_tokens // n_vectors
        counts = torch.bincount(index, minlength=n_tokens).tolist()
        parts = [f"{_names(tokens, [j])}×{c}" for j, c in enumerate(counts)]
        message = (
            f"The init text has {n_tokens} token(s) for {n_vectors} vectors: tokens are repeated "
            f"({', '.join(parts)})."
        )
        logger.info(message)
        return rows[index].clone(), message
    return _fewer_vectors(rows, n_vectors, mode, tokens)


def _fewer_vectors(
    rows: torch.Tensor, n_vectors: int, mode: str, tokens: Sequence[str] | None
) -> tuple[torch.Tensor, str]:
    n_tokens = rows.shape[0]
    head = f"The init text has {n_tokens} tokens but the embedding has {n_vectors} vector(s)"
    if mode == "pool":
        bounds = _group_bounds(n_tokens, n_vectors)
        out = torch.stack([rows[a:b].mean(dim=0) for a, b in bounds])
        groups = [f"[{_names(tokens, range(a, b))}]" for a, b in bounds]
        message = f"{head}: each vector is the average of a group of tokens: {' '.join(groups)}."
    elif mode == "truncate":
        out = rows[:n_vectors].clone()
        message = f"{head}: kept the first {n_vectors}, dropped {_names(tokens, range(n_vectors, n_tokens))}."
    else:  # "spread": the host's index rule
        index = [i * n_tokens // n_vectors for i in range(n_vectors)]
        out = rows[index].clone()
        used = set(index)
        skipped = [j for j in range(n_tokens) if j not in used]
        message = (
            f"{head}: took tokens by index (A1111's rule), skipped {_names(tokens, skipped)}."
        )
    logger.warning(message)
    return out, message
