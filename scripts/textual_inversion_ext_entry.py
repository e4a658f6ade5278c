"""A1111 entry point: the host imports every file in scripts/; this one stays thin.

It registers the extension's callbacks (settings, tabs, REST routes); everything else happens when
the host calls them. Nothing heavy runs here (no model access at host start-up).
"""

from __future__ import annotations

from textual_inversion_ext.backends.a1111 import glue

glue.register()
