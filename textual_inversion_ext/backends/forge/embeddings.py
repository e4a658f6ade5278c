"""Forge's embedding databases live in the loaded model's text-processing engines (one per encoder) and are
read once when the model is built: after our files change they are reloaded here, so a new or trained
embedding works in txt2img without a model reload."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ENGINES = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")


def reload_engine_embeddings() -> int:
    """Reload every engine's database of the current model; how many were reloaded (0 with no model)."""
    from modules import shared

    model = shared.sd_model
    count = 0
    for name in ENGINES:
        engine = getattr(model, name, None)
        if engine is not None:
            engine.embeddings.load_textual_inversion_embeddings()
            count += 1
    logger.debug("reloaded %d Forge embedding database(s)", count)
    return count
