"""A1111's optimizer-state side file: `<embedding file>.optim` = {'hash': checksum, 'optimizer_state_dict'}.

The 16-bit checksum of the vectors pairs the state with the embedding it belongs to; a state saved for
other vectors (e.g. the file was replaced) must not be resumed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..embedding import Embedding
from ..errors import EmbeddingFormatError, UnsafeFileError
from .safe_torch import load_torch_file, save_torch_file

logger = logging.getLogger(__name__)


def optim_path(embedding_path: str | Path) -> Path:
    return Path(f"{embedding_path}.optim")


def save_optimizer_state(embedding: Embedding, embedding_path: str | Path, state_dict: Mapping[str, Any]) -> Path:
    """Write `<embedding_path>.optim` atomically; returns its path."""
    path = optim_path(embedding_path)
    save_torch_file({"hash": embedding.a1111_checksum(), "optimizer_state_dict": dict(state_dict)}, path)
    return path


def load_optimizer_state(embedding: Embedding, embedding_path: str | Path) -> dict[str, Any] | None:
    """The saved optimizer state for `embedding`, or None (logged) when missing, unreadable or stale.

    Loading is as safe as for embeddings: a file that would run code raises UnsafeFileError.
    """
    path = optim_path(embedding_path)
    if not path.is_file():
        logger.debug("no optimizer state at %s; the optimizer starts fresh", path)
        return None
    try:
        data = load_torch_file(path)
    except UnsafeFileError:
        raise  # a file that would run code is reported, never silently skipped
    except EmbeddingFormatError as exc:
        logger.warning("ignoring optimizer state %s: %s", path.name, exc)
        return None
    if not isinstance(data, Mapping) or not isinstance(data.get("optimizer_state_dict"), Mapping):
        logger.warning("ignoring %s: it is not an A1111 optimizer state file", path.name)
        return None
    expected = embedding.a1111_checksum()
    if data.get("hash") != expected:
        logger.warning(
            "ignoring optimizer state %s: saved for vectors with checksum %s, these have %s; "
            "the optimizer starts fresh",
            path.name,
            data.get("hash"),
            expected,
        )
        return None
    return dict(data["optimizer_state_dict"])
