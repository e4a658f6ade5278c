"""Training: parameters, the loop, LR schedule, validation, previews, snapshots, health, metrics and the run
record."""

from __future__ import annotations
