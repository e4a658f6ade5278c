"""Re-export of the backend contract, which lives in `core.backend` (core depends on nothing above it)."""

from __future__ import annotations

from ..core.backend import Backend, LatentDist, ModelInfo, TrainingOptions, frozen

__all__ = ["Backend", "LatentDist", "ModelInfo", "TrainingOptions", "frozen"]
