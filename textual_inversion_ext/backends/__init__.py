"""Backends: what the core trainer needs from a Stable Diffusion model, per host.

`protocol.py` is the contract; `standalone/` implements it on diffusers/transformers modules; the
A1111 host backend (the only place that may import host `modules`) comes with the host issue.
"""

from __future__ import annotations
