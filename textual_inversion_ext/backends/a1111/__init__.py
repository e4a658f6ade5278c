"""The AUTOMATIC1111 host: a `Backend` on the model the web UI already loaded, and the glue that
registers settings, tabs and REST routes. The only package that imports the host's `modules`;
importing it does no work (the host imports the extension at start-up)."""

from __future__ import annotations
