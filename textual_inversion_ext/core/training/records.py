"""The run record saved beside each embedding a run writes (`<file>.json`), and the step it vouches for."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..embedding import Embedding

logger = logging.getLogger(__name__)


def sidecar_path(embedding_path: Path) -> Path:
    """The run record next to a saved embedding: `name.pt` -> `name.pt.json` (A1111 keeps `name.json` for
    its own user metadata, so that name is left alone)."""
    return embedding_path.with_name(embedding_path.name + ".json")


def recorded_step(embedding: Embedding, path: Path) -> int:
    """The step of `embedding` read from `path`: its own, or for a file that holds none (an SDXL .pt is only
    its two tensors, since A1111 and Forge load nothing else from it) the step its run record saved, when
    that record was written for these very vectors (a replaced file is not paired with a stale record)."""
    if embedding.step:
        return embedding.step
    try:
        saved = json.loads(sidecar_path(Path(path)).read_text("utf-8")).get("saved", {})
    except (OSError, ValueError, AttributeError):
        return 0
    step = saved.get("step") if isinstance(saved, dict) else None
    if isinstance(step, int) and step > 0 and saved.get("content_hash") == embedding.content_hash():
        logger.debug("%s holds no step; its run record says step %d", Path(path).name, step)
        return step
    return 0
