"""Caption editor operations on a folder's `<image stem>.txt` sidecars.

Every change (a single edit or a bulk operation) first copies the caption files it will touch
into `<folder>/.caption-history/<n>-<operation>/` with a manifest, then writes atomically;
`undo(folder)` puts back the newest such copy byte for byte (and removes captions the operation
created). The history folder is hidden, so dataset scans and training ignore it. Thumbnails are
made on demand into a cache folder outside the dataset and are never full size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import TIError
from ..fileio import atomic_path, atomic_write_bytes, atomic_write_text
from .images import (
    CAPTION_SUFFIX,
    IMAGE_SUFFIXES,
    caption_index,
    decode_caption,
    exif_transpose,
    find_caption,
    list_files,
    to_rgb,
)

logger = logging.getLogger(__name__)

HISTORY_DIR = ".caption-history"
MAX_HISTORY = 30  # undo steps kept per folder; older backups are deleted
THUMBNAIL_SIDE = 256
_MANIFEST = "manifest.json"
_ARTICLES = ("a", "an", "the", "this", "that", "my", "his", "her", "their", "our")
# Words left dangling before a comma or the end once the subject is cut out: "a photo of, …".
_DANGLING = re.compile(r"\s+(?:of|with|featuring|showing|and|by|in|on|at|near)\s*(?=,|$)", re.IGNORECASE)
_lock = threading.RLock()  # one bulk change at a time per process (UI clicks can overlap)


class CaptionError(TIError, ValueError):
    """A caption operation that cannot run (bad regex, nothing to undo, bad folder…)."""


@dataclass(frozen=True)
class CaptionEntry:
    image: Path
    caption_file: Path  # where the caption is or would be written
    caption: str
    exists: bool
    thumbnail: Path | None = None
    error: str | None = None  # unreadable caption or thumbnail


@dataclass
class CaptionPage:
    folder: Path
    page: int  # 1-based
    per_page: int
    total: int
    items: list[CaptionEntry] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


@dataclass
class BulkResult:
    operation: str
    changed: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    backup: Path | None = None

    @property
    def message(self) -> str:
        text = f"{self.operation}: {len(self.changed)} caption(s) changed"
        if self.skipped:
            text += f", {len(self.skipped)} skipped (" + "; ".join(f"{p.name}: {r}" for p, r in self.skipped[:5])
            text += ", …)" if len(self.skipped) > 5 else ")"
        return text + ("; undo restores them." if self.changed else ".")


@dataclass(frozen=True)
class HistoryEntry:
    path: Path
    operation: str
    created: float
    files: int


@dataclass
class UndoResult:
    operation: str
    restored: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)

    @property
    def message(self) -> str:
        return f"Undid '{self.operation}': {len(self.restored)} caption(s) restored, {len(self.removed)} removed."


# --- listing ---------------------------------------------------------------------------------


def _folder(folder: str | os.PathLike[str]) -> Path:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CaptionError(f"The folder {root} does not exist or is not a folder.")
    return root


def images_with_captions(folder: str | os.PathLike[str], *, recursive: bool = False) -> list[tuple[Path, Path, bool]]:
    """(image, caption file, caption exists) for every image by file type, sorted; nothing decoded,
    so paging a 10 000-image folder stays instant."""
    root = _folder(folder)
    files = list_files(root, recursive, [])
    index = caption_index([f for f in files if f.suffix.lower() == CAPTION_SUFFIX])
    out = []
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        found = find_caption(path, index)
        out.append((path, found or path.with_suffix(CAPTION_SUFFIX), found is not None))
    return out


def _read(path: Path) -> str:
    return decode_caption(path.read_bytes())


def read_caption(image: str | os.PathLike[str]) -> str:
    """The caption of one image ("" when it has no sidecar)."""
    image = Path(image)
    for img, cap, exists in images_with_captions(image.parent):
        if img == image:
            return _read(cap).strip() if exists else ""
    raise CaptionError(f"{image} is not an image in {image.parent}.")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "textual-inversion-ext" / "thumbnails"


def thumbnail(image: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
              max_side: int = THUMBNAIL_SIDE) -> Path:
    """A JPEG thumbnail (longest side ≤ max_side, upright) in the cache, made once per file version."""
    image = Path(image)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    st = image.stat()
    key = hashlib.sha1(f"{image.resolve()}|{st.st_mtime_ns}|{st.st_size}|{max_side}".encode()).hexdigest()
    out = cache / f"{key}.jpg"
    if out.exists():
        return out
    with Image.open(image) as img:
        img.draft("RGB", (max_side * 2, max_side * 2))  # JPEG: decode at reduced scale, much faster
        img.load()
        small = to_rgb(exif_transpose(img, image))
        small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    with atomic_path(out) as tmp:
        small.save(tmp, format="JPEG", quality=85)
    return out


def list_captions(
    folder: str | os.PathLike[str],
    page: int = 1,
    per_page: int = 50,
    *,
    recursive: bool = False,
    thumbnails: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    max_side: int = THUMBNAIL_SIDE,
) -> CaptionPage:
    """One page (1-based, clamped to the last page) of images with their captions, and thumbnails
    made on demand for that page only."""
    root = _folder(folder)
    if per_page < 1:
        raise CaptionError(f"per_page must be at least 1, got {per_page}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if thumbnails and (cache.resolve() == root.resolve() or root.resolve() in cache.resolve().parents):
        raise CaptionError(f"The thumbnail cache {cache} must be outside the dataset folder {root}.")
    entries = images_with_captions(root, recursive=recursive)
    result = CaptionPage(root, 1, per_page, len(entries))
    result.page = min(max(1, page), result.pages)
    start = (result.page - 1) * per_page
    for img, cap, exists in entries[start:start + per_page]:
        text, error, thumb = "", None, None
        if exists:
            try:
                text = _read(cap).strip()
            except (OSError, UnicodeDecodeError) as exc:
                error = f"caption unreadable: {exc}"
        if thumbnails:
            try:
                thumb = thumbnail(img, cache, max_side)
            except Exception as exc:  # a broken image still lists, with its error
                error = f"{error + '; ' if error else ''}no thumbnail: {exc}"
        result.items.append(CaptionEntry(img, cap, text, exists, thumb, error))
    return result


def tag_frequency(folder: str | os.PathLike[str], *, recursive: bool = False) -> list[tuple[str, int]]:
    """Comma-separated tags and the number of captions containing each, most frequent first."""
    counts: Counter[str] = Counter()
    for _img, cap, exists in images_with_captions(folder, recursive=recursive):
        if not exists:
            continue
        try:
            text = _read(cap)
        except (OSError, UnicodeDecodeError):
            continue
        counts.update({" ".join(t.split()) for t in text.split(",") if t.strip()})
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


# --- history ---------------------------------------------------------------------------------


def _history_root(root: Path) -> Path:
    return root / HISTORY_DIR


def history(folder: str | os.PathLike[str]) -> list[HistoryEntry]:
    """Complete backups, newest first (what `undo` would restore, in order)."""
    out = []
    hist = _history_root(_folder(folder))
    if not hist.is_dir():
        return out
    for d in hist.iterdir():
        try:
            manifest = json.loads((d / _MANIFEST).read_text(encoding="utf-8"))
            out.append(HistoryEntry(d, manifest["operation"], manifest["created"], len(manifest["files"])))
        except (OSError, ValueError, KeyError):
            continue  # an interrupted backup (no manifest) is not an undo step
    return sorted(out, key=lambda h: h.path.name, reverse=True)


def _next_backup_dir(root: Path, operation: str) -> Path:
    hist = _history_root(root)
    numbers = [int(m.group(1)) for d in (hist.iterdir() if hist.is_dir() else ())
               if (m := re.match(r"(\d+)-", d.name))]
    slug = re.sub(r"[^a-z0-9]+", "-", operation.lower()).strip("-")[:40] or "change"
    return hist / f"{max(numbers, default=0) + 1:06d}-{slug}"


def _backup(root: Path, operation: str, files: Sequence[Path]) -> Path:
    """Copy `files` (missing ones recorded as such) and write the manifest last: a backup without
    a manifest was interrupted and is never used."""
    dest = _next_backup_dir(root, operation)
    entries = []
    for f in files:
        rel = Path(os.path.relpath(os.path.abspath(f), os.path.abspath(root))).as_posix()
        existed = f.exists()
        if existed:
            copy = dest / "files" / rel
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, copy)
        entries.append({"path": rel, "existed": existed})
    manifest = {"operation": operation, "created": time.time(), "files": entries}
    atomic_write_text(dest / _MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1))
    _prune(root)
    return dest


def _prune(root: Path) -> None:
    hist = _history_root(root)
    complete = {h.path for h in history(root)}
    for d in sorted(hist.iterdir(), key=lambda p: p.name):
        if d not in complete:  # leftovers of an interrupted backup
            shutil.rmtree(d, ignore_errors=True)
    for h in history(root)[MAX_HISTORY:]:
        shutil.rmtree(h.path, ignore_errors=True)


def undo(folder: str | os.PathLike[str]) -> UndoResult:
    """Restore the captions the newest change touched, byte for byte; remove captions it created."""
    root = _folder(folder)
    with _lock:
        entries = history(root)
        if not entries:
            raise CaptionError(f"Nothing to undo in {root}.")
        latest = entries[0]
        manifest = json.loads((latest.path / _MANIFEST).read_text(encoding="utf-8"))
        result = UndoResult(manifest["operation"])
        for item in manifest["files"]:
            target = root / item["path"]
            if item["existed"]:
                copy = latest.path / "files" / item["path"]
                atomic_write_bytes(target, copy.read_bytes())
                shutil.copystat(copy, target)
                result.restored.append(target)
            elif target.exists():
                target.unlink()
                result.removed.append(target)
        shutil.rmtree(latest.path)
        logger.info("%s", result.message)
        return result


# --- changes ---------------------------------------------------------------------------------


def _split_newline(text: str) -> tuple[str, str]:
    body = text.rstrip("\r\n")
    return body, text[len(body):]


def _apply(
    root: Path, operation: str, edits: Iterable[tuple[Path, bool]], transform: Callable[[str], str]
) -> BulkResult:
    """Run `transform` over each caption (trailing newline kept), back up what changes, write it."""
    result = BulkResult(operation)
    changes: list[tuple[Path, str]] = []
    for cap, exists in edits:
        try:
            old = _read(cap) if exists else ""
        except (OSError, UnicodeDecodeError) as exc:
            result.skipped.append((cap, f"unreadable ({exc})"))
            continue
        body, newline = _split_newline(old)
        new = transform(body)
        if new != body:
            changes.append((cap, new + (newline or ("\n" if not exists else ""))))
    if not changes:
        return result
    with _lock:
        result.backup = _backup(root, operation, [c for c, _ in changes])
        for cap, text in changes:
            atomic_write_text(cap, text)
            result.changed.append(cap)
    logger.info("%s", result.message)
    return result


def _existing(root: Path, recursive: bool, include_missing: bool = False) -> list[tuple[Path, bool]]:
    return [(cap, exists) for _img, cap, exists in images_with_captions(root, recursive=recursive)
            if exists or include_missing]


def set_caption(image: str | os.PathLike[str], text: str, *, root: str | os.PathLike[str] | None = None) -> BulkResult:
    """Write one image's caption, undoable like the bulk operations. `root`: the dataset folder whose
    history records it (default: the image's folder; pass the top folder for recursive datasets)."""
    image = Path(image)
    clean = text.strip()
    history_root = Path(root) if root is not None else image.parent
    parent = Path(os.path.abspath(image.parent))
    if Path(os.path.abspath(history_root)) not in (parent, *parent.parents):
        raise CaptionError(f"{image} is not inside {history_root}.")
    for img, cap, exists in images_with_captions(image.parent):
        if img == image:
            return _apply(history_root, f"edit {image.name}", [(cap, exists)], lambda _old: clean)
    raise CaptionError(f"{image} is not an image in {image.parent}.")


def _compile(find: str, regex: bool, ignore_case: bool) -> re.Pattern[str]:
    if not find:
        raise CaptionError("Enter the text to find.")
    flags = re.IGNORECASE if ignore_case else 0
    try:
        return re.compile(find if regex else re.escape(find), flags)
    except re.error as exc:
        raise CaptionError(f"Invalid regular expression {find!r}: {exc}") from exc


def replace_text(text: str, pattern: re.Pattern[str], replace: str, regex: bool) -> str:
    try:
        # Plain mode: the replacement is literal (a function skips backslash processing).
        return pattern.sub(replace if regex else (lambda _m: replace), text)
    except (re.error, IndexError) as exc:
        raise CaptionError(f"Invalid replacement {replace!r}: {exc}") from exc


def find_replace(folder: str | os.PathLike[str], find: str, replace: str, *, regex: bool = False,
                 ignore_case: bool = False, recursive: bool = False) -> BulkResult:
    """Replace `find` (plain text, or a Python regular expression with \\1 groups) in every caption."""
    root = _folder(folder)
    pattern = _compile(find, regex, ignore_case)
    replace_text("", pattern, replace, regex)  # a bad replacement fails before any file changes
    if regex and pattern.search(""):
        raise CaptionError(f"The regular expression {find!r} matches empty text; it would insert everywhere.")
    return _apply(root, f"replace {find!r}", _existing(root, recursive),
                  lambda t: replace_text(t, pattern, replace, regex))


def _phrase_regex(phrase: str) -> str | None:
    words = phrase.split()
    while words and words[0].lower() in _ARTICLES:
        words = words[1:]  # "a blue car" matches "the blue car" and "blue car" too
    if not words:
        return None
    body = r"[\s_-]+".join(re.escape(w) for w in words)
    articles = "|".join(_ARTICLES)
    return rf"(?<!\w)(?:(?:{articles})\s+)?{body}(?:'s|’s|es|s)?(?!\w)"


def tidy_caption(text: str) -> str:
    """Collapse the spaces and commas a removal leaves behind."""
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;])(?:\s*[,;])+", r"\1", text)
    text = re.sub(r"\(\s*\)|\[\s*\]", "", text)
    while (shorter := _DANGLING.sub("", text)) != text:  # "photo of a car in" loses "car": "in", then "of"
        text = shorter
    text = re.sub(r"^[\s,;:.]+|[\s,;:]+$", "", text)
    return " ".join(re.sub(r",(?=\S)", ", ", text).split())


def strip_phrases(text: str, phrases: Iterable[str]) -> str:
    """`text` without any of `phrases` (case-insensitive, whole words, with an optional article
    and plural/possessive ending), tidied. Longer phrases are removed first."""
    patterns = [p for p in (_phrase_regex(x) for x in sorted(set(phrases), key=len, reverse=True)) if p]
    if not patterns:
        return text
    stripped = re.sub("|".join(f"(?:{p})" for p in patterns), " ", text, flags=re.IGNORECASE)
    return tidy_caption(stripped) if stripped != text else text


def strip_subject(folder: str | os.PathLike[str], subject: str, *, extra_phrases: Sequence[str] = (),
                  recursive: bool = False) -> BulkResult:
    """Remove the subject (e.g. "blue bmw") and `extra_phrases` (e.g. "blue car", "car") from every
    caption, so captions describe everything except what the embedding should learn."""
    root = _folder(folder)
    phrases = [p for p in (subject, *extra_phrases) if p and p.strip()]
    if not phrases:
        raise CaptionError("Enter the subject words to remove.")
    return _apply(root, f"strip {', '.join(phrases)}", _existing(root, recursive),
                  lambda t: strip_phrases(t, phrases))


def add_text(folder: str | os.PathLike[str], text: str, *, where: str = "prepend", separator: str = ", ",
             include_missing: bool = False, recursive: bool = False) -> BulkResult:
    """Put `text` before (where="prepend") or after ("append") every caption, skipping captions that
    already start/end with it; `include_missing` also creates captions for images without one."""
    if where not in ("prepend", "append"):
        raise CaptionError(f"where must be 'prepend' or 'append', got {where!r}")
    text = text.strip()
    if not text:
        raise CaptionError(f"Enter the text to {where}.")
    root = _folder(folder)

    def change(body: str) -> str:
        old = body.strip()
        if not old:
            return text
        if where == "prepend":
            return old if old.lower().startswith(text.lower()) else f"{text}{separator}{old}"
        return old if old.lower().endswith(text.lower()) else f"{old}{separator}{text}"

    return _apply(root, f"{where} {text!r}", _existing(root, recursive, include_missing), change)


def prepend(folder: str | os.PathLike[str], text: str, **kwargs) -> BulkResult:
    return add_text(folder, text, where="prepend", **kwargs)


def append(folder: str | os.PathLike[str], text: str, **kwargs) -> BulkResult:
    return add_text(folder, text, where="append", **kwargs)
