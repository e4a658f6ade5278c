"""Auto-captioners: a small protocol and a registry of named factories.

The web UI registers its interrogators (BLIP for photos, deepbooru for drawings) at start-up;
standalone nothing is registered because their weights are not available offline, and asking
for one raises `CaptionerUnavailable` with a message meant for the user. Preprocessing treats
that as "skip the caption step", never as a failure.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image

from ..errors import TIError

logger = logging.getLogger(__name__)

# Names the UI offers even when nothing is registered, so the message can say why they are missing.
KNOWN_CAPTIONERS: dict[str, str] = {
    "blip": "BLIP (natural-language captions, for photos)",
    "deepbooru": "deepbooru (comma-separated tags, for drawings and anime)",
}
CAPTION_JOINER = ", "


class CaptionerUnavailable(TIError):
    """A captioner that cannot run here (unknown name, or weights not available)."""


@runtime_checkable
class Captioner(Protocol):
    name: str

    def caption(self, img: Image.Image) -> str:
        """A caption for one RGB image ("" when it has nothing to say)."""
        ...


@dataclass(frozen=True)
class _Entry:
    factory: Callable[[], Captioner]
    description: str


_REGISTRY: dict[str, _Entry] = {}
_LOCK = threading.Lock()


def register_captioner(name: str, factory: Callable[[], Captioner], description: str = "") -> None:
    """Make `name` available; `factory` is called on each `get_captioner` (so weights load lazily)
    and may raise CaptionerUnavailable itself (e.g. the host cannot load BLIP)."""
    key = name.strip().lower()
    if not key:
        raise ValueError("a captioner needs a name")
    with _LOCK:
        _REGISTRY[key] = _Entry(factory, description or KNOWN_CAPTIONERS.get(key, key))


def unregister_captioner(name: str) -> None:
    with _LOCK:
        _REGISTRY.pop(name.strip().lower(), None)


def available_captioners() -> dict[str, str]:
    """Registered captioner names and their descriptions (what the UI offers as checkboxes)."""
    with _LOCK:
        return {name: entry.description for name, entry in sorted(_REGISTRY.items())}


def get_captioner(name: str) -> Captioner:
    key = name.strip().lower()
    with _LOCK:
        entry = _REGISTRY.get(key)
    if entry is None:
        if key in KNOWN_CAPTIONERS:
            raise CaptionerUnavailable(
                f"Captioner '{key}' is not available: its weights are not available offline in standalone "
                f"mode (it comes from the web UI's interrogator). Images are processed without it."
            )
        known = ", ".join(sorted(set(KNOWN_CAPTIONERS) | set(available_captioners()))) or "none"
        raise CaptionerUnavailable(f"Unknown captioner '{name}'; known: {known}.")
    try:
        return entry.factory()
    except CaptionerUnavailable:
        raise
    except Exception as exc:  # e.g. the host failed to load weights: say so, don't crash the run
        logger.debug("Captioner %s failed to load", key, exc_info=True)
        raise CaptionerUnavailable(f"Captioner '{key}' could not be loaded: {exc}") from exc


def parse_names(text: str | Iterable[str]) -> list[str]:
    """"blip, deepbooru" or ["blip", "deepbooru"] → ["blip", "deepbooru"] (lower-cased, no repeats)."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for p in parts:
        key = p.strip().lower()
        if key and key not in out:
            out.append(key)
    return out


def load_captioners(names: str | Iterable[str]) -> tuple[list[Captioner], list[str]]:
    """The captioners that can run, and one message for each one that cannot."""
    ready: list[Captioner] = []
    problems: list[str] = []
    for name in parse_names(names):
        try:
            ready.append(get_captioner(name))
        except CaptionerUnavailable as exc:
            problems.append(str(exc))
    return ready, problems


def combined_caption(captioners: Sequence[Captioner], img: Image.Image) -> tuple[str, list[str]]:
    """Every captioner's non-empty caption joined with ", ", and a note per captioner that failed."""
    parts: list[str] = []
    notes: list[str] = []
    for cap in captioners:
        try:
            text = " ".join(str(cap.caption(img)).split())
        except Exception as exc:  # one bad image must not stop the batch
            logger.debug("Captioner %s failed", cap.name, exc_info=True)
            notes.append(f"captioner {cap.name} failed: {exc}")
            continue
        if text:
            parts.append(text)
    return CAPTION_JOINER.join(parts), notes


def close_captioners(captioners: Sequence[Captioner]) -> None:
    """Call the optional `close()` of each captioner (the host frees BLIP/deepbooru memory there)."""
    for cap in captioners:
        close = getattr(cap, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                logger.warning("Closing captioner %s failed", cap.name, exc_info=True)
