"""Serve the tabs on their own (no A1111): `launch(service)`, called from Python (README, Status); the CLI
has no subcommand for it, as gradio does not install next to diffusers 0.42 yet."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_PORT = 7861  # beside A1111's 7860
# The host injects the extension's style.css itself; standalone passes it to Blocks. It sits at the
# repository root (the extension folder), so an installed wheel simply runs without it.
STYLE = Path(__file__).resolve().parents[2] / "style.css"


def launch(service: Any, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, block: bool = True,
           **launch_kwargs: Any) -> Any:
    """Build the tabs over `service`, enable the queue (status polling needs it) and serve them.

    `block=False` returns at once with the running Blocks (tests; call `.close()` when done).
    """
    from . import build_tabs, compat

    blocks = build_tabs(service)
    if STYLE.is_file():
        blocks.css = (blocks.css or "") + STYLE.read_text(encoding="utf-8")
    compat.queue(blocks)
    # Previews live under the log folder; newer gradio only serves files from allowed paths.
    allowed = [str(Path(p)) for p in (service.log_root, service.embeddings_dir)]
    logger.info("Textual Inversion UI on http://%s:%d", host, port)
    blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, allowed_paths=allowed,
                  **launch_kwargs)
    return blocks
