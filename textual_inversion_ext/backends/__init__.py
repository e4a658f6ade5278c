"""Backends: what the core trainer needs from a Stable Diffusion model, per host.

The contract lives in `core/backend.py` (re-exported by `protocol.py`); `standalone/` implements it on
diffusers/transformers modules, `a1111/` on the host's loaded model (the only place that imports the
host's `modules`).
"""

from __future__ import annotations
