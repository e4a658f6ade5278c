"""A1111's optimizer-state side file: `<embedding file>.optim` = {'hash': checksum, 'optimizer_state_dict'}.

The 16-bit checksum of the vectors pairs the state with the embedding it belongs to; a state saved for
other vectors (e.g. the file was replaced) must not be resumed. An fp16 run also stores its GradScaler's
state under 'scaler_state_dict' (the loss scale and its growth counter), so a resumed run scales and skips
exactly as an uninterrupted one; A1111 reads only its own two keys and ignores it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..embedding import Embedding
from ..errors import EmbeddingFormatError, UnsafeFileError
from .safe_torch import load_torch_file, save_torch_file

logger = logging.getLogger(__name__)


def optim_path(embedding_path: str | Path) -> Path:
    return Path(f"{embedding_path}.optim")


SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


@dataclass
class TrainingState:
    """What a `.optim` file resumes: the optimizer's state and, from an fp16 run, the GradScaler's."""

    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None = None


def save_optimizer_state(embedding: Embedding, embedding_path: str | Path, state_dict: Mapping[str, Any],
                         scaler_state: Mapping[str, Any] | None = None) -> Path:
    """Write `<embedding_path>.optim` atomically (with `scaler_state`, a GradScaler's state_dict, when given
    and not empty: a disabled scaler has none); returns its path."""
    path = optim_path(embedding_path)
    data: dict[str, Any] = {"hash": embedding.a1111_checksum(), "optimizer_state_dict": dict(state_dict)}
    if scaler_state:
        data["scaler_state_dict"] = dict(scaler_state)
    save_torch_file(data, path)
    return path


def load_optimizer_state(embedding: Embedding, embedding_path: str | Path) -> dict[str, Any] | None:
    """The saved optimizer state for `embedding`, or None (logged) when missing, unreadable or stale."""
    state = load_training_state(embedding, embedding_path)
    return state.optimizer if state is not None else None


def load_training_state(embedding: Embedding, embedding_path: str | Path) -> TrainingState | None:
    """The saved optimizer (and GradScaler) state for `embedding`, or None (logged) when missing, unreadable or
    stale; a damaged scaler entry alone is dropped with a warning (the run then starts a fresh scale).

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
    return TrainingState(dict(data["optimizer_state_dict"]), _scaler_state(data.get("scaler_state_dict"), path))


def _scaler_state(value: Any, path: Path) -> dict[str, Any] | None:
    if value is None:
        return None
    if not (isinstance(value, Mapping) and all(isinstance(value.get(k), int | float) for k in SCALER_KEYS)):
        logger.warning("ignoring the GradScaler state in %s: it is not a GradScaler state_dict; the loss scale "
                       "starts fresh", path.name)
        return None
    return dict(value)
