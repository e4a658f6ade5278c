"""The Gradio tabs (Create embedding, Preprocess images, Train) over a `Service`.

gradio is imported only when the tabs are built: importing this package stays free for the host
and for the CLI, and the pure parts (`controls`, `handlers`, `status`) are tested without gradio.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_tabs"]


def build_tabs(service: Any) -> Any:
    """One `gr.Blocks` holding the sub-tabs; the host returns it from `on_ui_tabs`, `app.launch` serves it."""
    from .blocks import build

    return build(service)
