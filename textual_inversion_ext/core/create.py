"""Create a new embedding from an init text, ready to train."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import create_hints, formats, tokens
from .backend import Backend
from .embedding import Embedding, validate_name
from .errors import TIError
from .params import param, validate

logger = logging.getLogger(__name__)


@dataclass
class CreateParams:
    name: str = param("", "Name", "The embedding's name; it is also the trigger word and the file name.")
    init_text: str = param("*", "Initialization text",
                           "Words the vectors start from, e.g. 'blue bmw'; empty = zero vectors.")
    num_vectors: int = param(0, "Vectors per token",
                             "How many vectors the embedding has; 0 = one per token of the init text (at most 75).",
                             minimum=0, maximum=75)
    init_mode: str = param("pool", "Init with more tokens than vectors",
                           "'pool' averages neighbouring tokens so none is lost; 'truncate' keeps the first.",
                           choices=tokens.INIT_MODES)
    overwrite: bool = param(False, "Overwrite", "Replace an existing embedding file of the same name.")


@dataclass
class Created:
    path: Path
    embedding: Embedding
    message: str


def create_embedding(backend: Backend, params: CreateParams, folder: Path, suffix: str | None = None) -> Created:
    """Build the initial vectors from the model's token-embedding tables and save them atomically (as `suffix`;
    None = the model's usual type, `ModelInfo.embedding_suffix`)."""
    validate(params)
    name = validate_name(params.name)
    path = Path(folder) / f"{name}{suffix or backend.info.embedding_suffix}"
    if path.exists() and not params.overwrite:
        raise TIError(f"{path} already exists; choose another name or allow overwriting.")
    ids = tokens.token_ids(params.init_text) if params.init_text.strip() else []
    # 0 = one per token, capped at the prompt budget (a longer init text is pooled): more vectors than a
    # prompt holds would never fit in one.
    n_vectors = params.num_vectors or max(1, min(len(ids), tokens.PROMPT_TOKEN_BUDGET))
    encoders = backend.info.encoders
    rows = backend.token_rows(ids) if ids else {key: torch.zeros(0, dim) for key, dim in encoders.items()}
    words = tokens.decode_tokens(ids)  # so messages name words, not token numbers
    vectors, notes = {}, []
    for key in encoders:
        vec, note = tokens.init_vectors(rows[key], n_vectors, mode=params.init_mode, tokens=words)
        vectors[key] = vec
        if note and note not in notes:
            notes.append(note)
    embedding = Embedding(name, vectors, step=0, sd_checkpoint=backend.info.short_hash,
                          sd_checkpoint_name=backend.info.name)
    formats.save_embedding(embedding, path)
    message = f"Created {path} ({n_vectors} vector{'s' if n_vectors != 1 else ''})."
    per_encoder = create_hints.encoder_note(encoders)
    if per_encoder:
        message += f" {per_encoder.text}"
    if notes:
        message += " " + " ".join(notes)
    logger.info(message)
    return Created(path, embedding, message)
