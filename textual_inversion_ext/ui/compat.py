"""Every gradio version difference the tabs meet, in one place.

The tabs are written to what gradio 3.41 (A1111 1.6–1.10) and 4.40 (Forge) share; what differs is
wrapped here. The major version is read once, at import (this module is imported only when the
tabs are built, never at package import).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

logger = logging.getLogger(__name__)

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def update(**kwargs: Any) -> Any:
    """A partial update; `gr.update` exists in both (components' own `.update` is gone in 4)."""
    return gr.update(**kwargs)


def no_change() -> Any:
    return gr.update()


def js(code: str) -> dict[str, str]:
    """The event kwarg carrying a JS function: `_js` in 3.x, `js` from 4."""
    return {"_js": code} if GRADIO_MAJOR < 4 else {"js": code}


def internal() -> dict[str, Any]:
    """Event kwargs for UI-only events: no public API endpoint.

    3.x: `api_name=False`. 4.x accepts that too, but its browser client then has no parameter info
    and logs "Too many arguments provided for the endpoint" on every call (every poll tick), so
    `show_api=False` (4.x only) keeps the endpoint out of the API page instead.
    """
    return {"api_name": False} if GRADIO_MAJOR < 4 else {"show_api": False}


def poll(blocks: Any, fn: Callable[..., Any], inputs: Sequence[Any], outputs: Sequence[Any],
         seconds: float) -> None:
    """Run `fn` when the page loads and then every `seconds` while it is open.

    3.x: a load event with `every=` (needs the queue, which the host and `app.launch` enable).
    4.x: `every=` still works in 4.40 but is deprecated in favour of gr.Timer, and removed in 5.
    """
    kw = {"fn": fn, "inputs": list(inputs), "outputs": list(outputs), "show_progress": "hidden", **internal()}
    if GRADIO_MAJOR >= 4 and hasattr(gr, "Timer"):
        blocks.load(**kw)  # at once: a Timer's first tick comes one interval later
        gr.Timer(seconds).tick(**kw)
    else:
        blocks.load(every=seconds, **kw)


def line_plot(**kwargs: Any) -> Any:
    """A LinePlot with the kwargs both versions accept (3.41 is Altair-based, 4.x a native Vega plot)."""
    common = {"value", "x", "y", "color", "title", "x_title", "y_title", "x_lim", "y_lim", "height", "caption",
              "label", "show_label", "elem_id", "elem_classes", "visible", "container", "scale", "min_width"}
    dropped = sorted(set(kwargs) - common)
    if dropped:
        logger.debug("LinePlot: dropping %s (not in both gradio 3.41 and 4.x)", dropped)
    return gr.LinePlot(**{k: v for k, v in kwargs.items() if k in common})


def queue(blocks: Any) -> Any:
    """Enable the queue (polling needs it); the positional/keyword options differ between 3 and 4."""
    return blocks.queue()
