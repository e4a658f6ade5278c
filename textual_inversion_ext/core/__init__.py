"""Host-independent Textual Inversion core: no gradio, no host `modules` imports."""

from __future__ import annotations
