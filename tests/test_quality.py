"""A reduced quality benchmark (benchmarks/quality.py): a small model built from scratch on the
synthetic world, an embedding trained by our trainer for the held-out concept, and a check that it
brings the concept back far more often than the init text does. Slow, but no cache needed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality_world import classifier as clf
from quality_world import pretrain, task, world

# Opt-in for now: the pretraining recipe does not yet give a model whose generations follow the
# object words (benchmarks/README.md, "quality"), so this honest check fails today and would cost
# CI minutes. Set TIEXT_QUALITY_TEST=1 to run it; drop the skip once it passes.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("TIEXT_QUALITY_TEST"),
                       reason="quality benchmark model not good enough yet (issue 6); TIEXT_QUALITY_TEST=1 runs it"),
]


def _reduced_model_dict() -> dict:
    """The benchmark's architecture at a quarter of the widths (still a 4x VAE, cross-attention)."""
    model = pretrain.default_model_dict()
    model["vae"]["block_out_channels"] = [8, 16, 16]
    model["unet"]["block_out_channels"] = [16, 32, 32]
    return model


def test_embedding_beats_init_text(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        world_config = world.WorldConfig()
        wm = pretrain.world_model(
            world_config, seed=0, use_cache=False, model=_reduced_model_dict(),
            pretrain=pretrain.PretrainConfig(vae_steps=200, vae_batch=16, pool=1000, text_steps=200, text_batch=32,
                                             unet_steps=600, unet_batch=32),
            classifier_config=clf.ClassifierConfig(pool=1000, steps=120),
        )
        config = task.TaskConfig(max_steps=150, save_every=150, images_per_prompt=24, sample_steps=10)
        result = task.run_task(wm.backend, wm.classifier, world_config, config, tmp_path, with_text_bound=False)
    finally:
        torch.set_num_threads(threads)
    init, trained = result.rows[0], result.rows[-1]
    assert (init.label, trained.step) == ("init", 150)
    # The init text names no colour or texture: it hits the concept by chance (~1/40) only.
    assert init.fidelity <= 0.2, result.rows
    assert trained.fidelity >= init.fidelity + 0.3, result.rows
