"""A synthetic world for measuring Textual Inversion quality on a CPU (issue 6).

`world` renders 64×64 images from attributes and names them in prompts, `classifier` reads the
attributes back, `pretrain` builds and caches a tiny SD1-shaped text-to-image model trained on the
world, `sampling` generates batches of images from it, and `task` trains an embedding for a held-out
concept with the project's own trainer and scores every snapshot. `reduced` is the small model that
tests/test_quality.py loads from `reduced-world.safetensors` (rebuilt by benchmarks/quality_reduced.py)."""

from __future__ import annotations
