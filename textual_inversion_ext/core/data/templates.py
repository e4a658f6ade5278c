"""Prompt templates: files of lines with A1111's `[name]` and `[filewords]` placeholders.

A1111 template folders work as they are: one prompt per non-empty line, `[name]` becomes the
embedding's trigger word, `[filewords]` the image's caption. What we do differently (HOST-NOTES §11.2):
a line is drawn for every prompt (A1111 fixes one line per image for the whole run unless shuffle or
dropout is on), caption tags are stripped and joined with ", " (A1111 joins raw pieces with ","
and keeps newlines), and an empty caption leaves no dangling comma.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import TIError

logger = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).with_name("templates")
DEFAULT_TEMPLATE = "subject_filewords.txt"

_PLACEHOLDER = re.compile(r"\[(name|filewords)\]")
# An empty [filewords] takes one neighbouring comma with it: "x, [filewords]" -> "x",
# "[filewords], x" -> "x", "a [filewords] b" -> "a b".
_EMPTY_FILEWORDS = (re.compile(r"\s*,\s*\[filewords\]"), re.compile(r"\[filewords\]\s*,?"))


class TemplateError(TIError, ValueError):
    """A template that is missing, empty, or cannot train an embedding."""


def list_templates(extra_dirs: Iterable[str | os.PathLike[str]] = ()) -> dict[str, Path]:
    """Template files by file name: ours first, then each extra folder (searched recursively).

    Like A1111, templates are keyed by bare file name; a later folder's file replaces an earlier
    one of the same name, so a user's folder can override the built-in templates.
    """
    found: dict[str, Path] = {}
    for folder in (BUILTIN_DIR, *(Path(d) for d in extra_dirs)):
        if not folder.is_dir():
            logger.warning("Template folder %s does not exist; skipping it", folder)
            continue
        for path in sorted(folder.rglob("*.txt")):
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
                if path.name in found and found[path.name] != path:
                    logger.debug("Template %s overrides %s", path, found[path.name])
                found[path.name] = path
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def _resolve(name_or_path: str | os.PathLike[str], extra_dirs: Iterable[str | os.PathLike[str]]) -> Path:
    key = os.fspath(name_or_path)
    path = Path(key)
    # A bare name is looked up among the templates first, so a stray "style.txt" in the working
    # folder cannot shadow the template of that name.
    if len(path.parts) == 1 and not path.is_absolute():
        templates = list_templates(extra_dirs)
        for candidate in (key, f"{key}.txt"):
            if candidate in templates:
                return templates[candidate]
        if path.is_file():
            return path
    elif path.is_file():
        return path
    else:
        templates = list_templates(extra_dirs)
    available = ", ".join(templates) or "none"
    raise TemplateError(f"Template {key!r} was not found. Available templates: {available}.")


def load_template(
    name_or_path: str | os.PathLike[str], extra_dirs: Iterable[str | os.PathLike[str]] = ()
) -> list[str]:
    """The non-empty, stripped lines of a template given by file path or by name ("style" or "style.txt")."""
    path = _resolve(name_or_path, extra_dirs)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Windows editors like to add a BOM
    except UnicodeDecodeError as exc:
        raise TemplateError(f"Template {path} is not UTF-8 text ({exc.reason}).") from exc
    except OSError as exc:
        raise TemplateError(f"Template {path} cannot be read: {exc.strerror or exc}.") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise TemplateError(
            f"Template {path} has no lines; write one prompt per line, e.g. 'a photo of [name]'."
        )
    return lines


def split_tags(caption: str | None) -> list[str]:
    """A caption's comma-separated tags, each with its whitespace (newlines too) collapsed."""
    if not caption:
        return []
    tags = (" ".join(tag.split()) for tag in caption.split(","))
    return [tag for tag in tags if tag]


def _tidy(text: str) -> str:
    text = " ".join(text.split())
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(?:\s*,)+", ",", text)
    return text.strip(" ,")


class PromptBuilder:
    """Turns a caption into a training prompt with a freshly drawn template line each time."""

    def __init__(
        self,
        lines: Sequence[str],
        name: str,
        shuffle_tags: bool = False,
        tag_dropout: float = 0.0,
    ):
        if isinstance(lines, str):
            raise TypeError("lines must be a sequence of template lines, not one string")
        self.lines: tuple[str, ...] = tuple(line.strip() for line in lines if line and line.strip())
        if not self.lines:
            raise TemplateError("The template has no lines.")
        # A line without [name] trains nothing: the embedding never appears in that prompt.
        missing = [line for line in self.lines if "[name]" not in line]
        if missing:
            shown = "; ".join(repr(line) for line in missing[:3])
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise TemplateError(
                f"{len(missing)} template line(s) lack [name], so the embedding would not be in those "
                f"prompts: {shown}{more}. Add [name] where the trigger word goes."
            )
        if not name or not name.strip():
            raise TemplateError("The embedding name for [name] is empty.")
        if not 0.0 <= tag_dropout <= 1.0:
            raise TemplateError(f"Tag dropout must be between 0 and 1, got {tag_dropout}.")
        self.name = name.strip()
        self.shuffle_tags = bool(shuffle_tags)
        self.tag_dropout = float(tag_dropout)

    @property
    def uses_filewords(self) -> bool:
        return any("[filewords]" in line for line in self.lines)

    def tags(self, caption: str | None, rng: random.Random) -> list[str]:
        """The caption's tags after per-tag dropout and optional shuffling."""
        tags = split_tags(caption)
        if self.tag_dropout > 0:
            # >= so that a dropout of 1.0 drops every tag (random() is always < 1)
            tags = [tag for tag in tags if rng.random() >= self.tag_dropout]
        if self.shuffle_tags:
            rng.shuffle(tags)
        return tags

    def render(self, caption: str | None, rng: random.Random) -> str:
        line = rng.choice(self.lines)
        filewords = ", ".join(self.tags(caption, rng)) if "[filewords]" in line else ""
        if not filewords:
            for pattern in _EMPTY_FILEWORDS:
                line = pattern.sub("", line)
        # One pass, so a caption containing "[name]" (or a name containing "[filewords]") stays literal.
        text = _PLACEHOLDER.sub(lambda m: self.name if m[1] == "name" else filewords, line)
        return _tidy(text)

    @classmethod
    def from_template(
        cls,
        name_or_path: str | os.PathLike[str],
        name: str,
        *,
        shuffle_tags: bool = False,
        tag_dropout: float = 0.0,
        extra_dirs: Iterable[str | os.PathLike[str]] = (),
    ) -> PromptBuilder:
        lines = load_template(name_or_path, extra_dirs)
        try:
            return cls(lines, name, shuffle_tags, tag_dropout)
        except TemplateError as exc:
            raise TemplateError(f"Template {os.fspath(name_or_path)!r}: {exc}") from exc
