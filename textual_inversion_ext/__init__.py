"""Textual Inversion for Stable Diffusion: core, backends and UI shared by the A1111 extension
and the standalone app. Importing this package does no work (the host imports it at start-up)."""

from __future__ import annotations

__version__ = "0.1.0"
