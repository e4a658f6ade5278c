"""What a UI action returns, and the guard that turns any failure into a message for the user."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..core.errors import TIError

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    message: str
    ok: bool


def run_guarded(action: str, fn: Any, *args: Any) -> tuple[Any, str | None]:
    """Call `fn`; a TIError becomes its message, anything else a logged one-liner."""
    try:
        return fn(*args), None
    except TIError as exc:
        return None, str(exc)
    except Exception as exc:
        logger.exception("%s failed", action)
        return None, f"{action} failed: {type(exc).__name__}: {exc} (details in the console log)."
