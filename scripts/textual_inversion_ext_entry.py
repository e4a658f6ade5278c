"""A1111 entry point: the host imports every file in scripts/; this one stays thin.

The tabs, settings and API arrive with the host integration; until then the extension only says
that it is installed. Nothing heavy is imported here (no torch work at host start-up).
"""

from __future__ import annotations

import logging

from textual_inversion_ext import __version__

logging.getLogger("textual_inversion_ext").info("Textual Inversion extension %s loaded", __version__)
