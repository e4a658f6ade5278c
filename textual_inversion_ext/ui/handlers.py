"""The tabs' actions as plain functions: plain values in, plain values (mostly messages) out.

No gradio here, so they are tested without it; `blocks.py` only wires them to components. Errors a
user can act on (TIError, which includes the service's "already training" refusal) come back as
messages; anything else is logged with its traceback and shown as one line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core import tokens
from ..core.create import CreateParams
from ..core.embedding import validate_name
from ..core.errors import TIError
from ..core.train_params import TrainParams
from .controls import ControlSpec, params_from_values

logger = logging.getLogger(__name__)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def init_text_info(text: str) -> str:
    """Live count under the init text: 'N tokens → suggested vectors N'."""
    if not text or not text.strip():
        return "Empty: the vectors start at zero (1 vector unless you set more)."
    try:
        n = tokens.count_tokens(text)
    except Exception as exc:  # the tokenizer is optional for the UI; never break typing
        logger.warning("Cannot count tokens: %s", exc)
        return f"Cannot count tokens ({exc})."
    out = f"{_plural(n, 'token')} → suggested vectors {tokens.suggest_vectors(text)}"
    if n > tokens.PROMPT_TOKEN_BUDGET:
        out += f" (more than the {tokens.PROMPT_TOKEN_BUDGET} a prompt holds: tokens are pooled)"
    return out


def name_info(name: str) -> str:
    """Live check of the name: valid as a file/trigger word, and its own token count as plain text."""
    if not name or not name.strip():
        return ""
    try:
        cleaned = validate_name(name)
        n = tokens.count_tokens(cleaned)
    except TIError as exc:
        return str(exc)
    except Exception as exc:
        logger.warning("Cannot count tokens: %s", exc)
        return f"Cannot count tokens ({exc})."
    return f"Name: {_plural(n, 'token')} as text (in a prompt the trigger word is replaced by its vectors)"


def embedding_names(service: Any) -> list[str]:
    try:
        return [e["name"] for e in service.list_embeddings()]
    except Exception:  # a broken folder must not break the tab
        logger.exception("Cannot list embeddings")
        return []


@dataclass
class Outcome:
    message: str
    ok: bool


def _run(action: str, fn: Any, *args: Any) -> tuple[Any, str | None]:
    """Call `fn`; a TIError becomes its message, anything else a logged one-liner."""
    try:
        return fn(*args), None
    except TIError as exc:
        return None, str(exc)
    except Exception as exc:
        logger.exception("%s failed", action)
        return None, f"{action} failed: {type(exc).__name__}: {exc} (details in the console log)."


def create(service: Any, specs: Sequence[ControlSpec], values: Sequence[Any]) -> tuple[Outcome, list[str]]:
    """Create an embedding from the Create tab's values; returns the outcome and the new name list."""
    def go() -> str:
        params = params_from_values(CreateParams, specs, values)
        return service.create(params).message

    message, error = _run("Create", go)
    return Outcome(error or message, error is None), embedding_names(service)


def start_training(service: Any, name: str | None, data_dir: str | None, specs: Sequence[ControlSpec],
                   values: Sequence[Any], subject: str = "") -> Outcome:
    """Start training; the dataset check's summary line comes first (`subject`: words captions should not name)."""
    if not name:
        return Outcome("Choose an embedding to train (create one in the Create embedding tab).", False)
    if not data_dir or not str(data_dir).strip():
        return Outcome("Enter the dataset folder: images, with optional <image>.txt captions.", False)

    def go() -> str:
        from .prep import check_summary

        params = params_from_values(TrainParams, specs, values)
        summary = check_summary(service, str(data_dir).strip(), subject or "", params.resolution)
        job = service.start_training(name, str(data_dir).strip(), params)
        started = f"Started training '{job.name}' (job {job.id}); progress below. Closing the page does not stop it."
        return f"Dataset check: {summary}.\n{started}" if summary else started

    message, error = _run("Train", go)
    return Outcome(error or message, error is None)


def interrupt(service: Any) -> Outcome:
    status, error = _run("Interrupt", service.interrupt)
    if error:
        return Outcome(error, False)
    return Outcome(status.get("message") or "Interrupt requested.", bool(status.get("active")))
