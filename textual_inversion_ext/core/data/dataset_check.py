"""Dataset check: what in a training folder will be skipped, degraded or mislearned, and why.

Run before training (the Train tab shows it) and on demand (`check` command). One decode per
file: the mode, EXIF orientation and size are read from the opened image, then the same pixels
give a 64-bit difference hash (dHash) for near-duplicate detection. Nothing is modified.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError
from ..params import param, validate
from .alpha import MIN_COVERAGE, alpha_of, coverage
from .images import (
    CAPTION_SUFFIX,
    caption_from_filename,
    caption_index,
    decode_caption,
    exif_transpose,
    find_caption,
    has_hidden_alpha,
    list_files,
    read_error_reason,
    size_problem,
    to_rgb,
)

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]

ERROR, WARNING, INFO = "error", "warning", "info"
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# Words an init text carries that say nothing about the subject.
_STOPWORDS = frozenset({"a", "an", "the", "of", "and", "in", "on", "with", "at", "to", "for", "by", "photo",
                        "picture", "image", "style"})
_HASH_SIDE = 8


@dataclass
class CheckParams:
    width: int = param(512, "Target width", "Training width (the model's native size).", minimum=64,
                       maximum=4096, step=8)
    height: int = param(512, "Target height", "Training height.", minimum=64, maximum=4096, step=8)
    subject: str = param("", "Subject words",
                         "The init text (e.g. 'blue bmw'): captions still mentioning these words are flagged.")
    recursive: bool = param(False, "Include sub-folders", "Also check images in sub-folders.")
    max_aspect: float = param(2.0, "Extreme aspect", "Flag images this much longer (relative to the target "
                              "aspect) than wide or tall.", minimum=1.0, maximum=10.0, step=0.1)
    duplicate_distance: int = param(4, "Near-duplicate distance",
                                    "Largest perceptual-hash difference (of 64 bits) that counts as a "
                                    "near-duplicate; 0 = exact look-alikes only, -1 = off.", minimum=-1,
                                    maximum=32)


@dataclass(frozen=True)
class Finding:
    path: Path
    kind: str  # unreadable, not_image, too_small_to_train, too_thin_to_train, small, aspect, duplicate, mode,
    #            transparent, exif_rotation, caption_missing, caption_empty, caption_subject, caption_unreadable,
    #            caption_orphan, folder
    severity: str  # error (not used by training), warning (used, but worth fixing), info
    message: str


@dataclass
class CheckReport:
    folder: Path
    usable: int = 0
    files: int = 0
    findings: list[Finding] = field(default_factory=list)
    interrupted: bool = False
    elapsed_s: float = 0.0

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def warnings(self) -> int:
        return self.count(WARNING)

    @property
    def errors(self) -> int:
        return self.count(ERROR)

    def summary(self) -> str:
        text = f"{self.usable} usable images, {self.warnings} warnings"
        if self.errors:
            text += f", {self.errors} file(s) not usable"
        return text + (" (check interrupted)" if self.interrupted else "")

    def for_file(self, path: Path) -> list[Finding]:
        return [f for f in self.findings if f.path == path]


@dataclass
class _Probe:
    size: tuple[int, int]  # upright
    mode: str
    hidden_alpha: bool
    orientation: int
    dhash: int
    visible: float = 1.0  # mean opacity (1 without transparency)


def dhash(img: Image.Image) -> int:
    """64-bit difference hash: brighter-than-right-neighbour bits of a 9×8 grey thumbnail."""
    grey = np.asarray(img.convert("L").resize((_HASH_SIDE + 1, _HASH_SIDE), Image.Resampling.BILINEAR),
                      dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _probe(path: Path) -> _Probe:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            mode, hidden = img.mode, has_hidden_alpha(img)
            try:
                orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            except Exception:  # broken EXIF: the image itself may still be fine
                orientation = 1
            img.load()  # truncated files fail here
            turned = exif_transpose(img, path)
            upright = to_rgb(turned)
            return _Probe(upright.size, mode, hidden, orientation, dhash(upright), coverage(alpha_of(turned)))


def _mode_note(p: _Probe) -> str | None:
    if p.mode == "CMYK":
        return "CMYK image: converted to RGB (colours may shift slightly)"
    if p.mode in _SIXTEEN_BIT:
        return f"16-bit/float image (mode {p.mode}): reduced to 8 bits per channel"
    if "A" in p.mode or p.mode in ("RGBa", "La", "PA") or p.hidden_alpha:
        return "has transparency: composited onto white for training"
    if p.mode in ("P", "1"):
        return f"palette/bilevel image (mode {p.mode}): converted to RGB"
    return None


def subject_words(subject: str) -> list[str]:
    """The words of an init text worth looking for in captions ("a blue bmw" → ["blue", "bmw"])."""
    words = re.findall(r"\w+", subject.lower())
    return list(dict.fromkeys(w for w in words if w not in _STOPWORDS and len(w) > 1))


def _mentions(caption: str, words: list[str]) -> list[str]:
    low = caption.lower()
    return [w for w in words if re.search(rf"(?<!\w){re.escape(w)}(?:'s|es|s)?(?!\w)", low)]


def check_dataset(
    folder: str | os.PathLike[str],
    params: CheckParams | None = None,
    *,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
) -> CheckReport:
    """Check every file in `folder`; never raises for a bad file (DatasetError for a missing folder)."""
    params = params or CheckParams()
    validate(params)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"The dataset folder {root} does not exist or is not a folder.")
    started = time.perf_counter()
    report = CheckReport(root)
    listing: list = []
    files = list_files(root, params.recursive, listing)
    report.findings.extend(Finding(s.path, "folder", INFO, s.reason) for s in listing)
    captions = [f for f in files if f.suffix.lower() == CAPTION_SUFFIX]
    index = caption_index(captions)
    candidates = [f for f in files if f.suffix.lower() != CAPTION_SUFFIX]
    report.files = len(candidates)
    words = subject_words(params.subject)
    matched: set[Path] = set()
    hashes: list[tuple[Path, int]] = []
    for done, path in enumerate(candidates, 1):
        if stop is not None and stop.is_set():
            report.interrupted = True
            break
        cap = find_caption(path, index)
        if cap is not None:
            matched.add(cap)
        found = _check_image(path, params, report)
        if found is not None:
            report.usable += 1
            hashes.append((path, found.dhash))
            _check_caption(path, cap, words, report)
        if progress:
            progress(done, len(candidates), path.name)
    if not report.interrupted:
        report.findings.extend(Finding(c, "caption_orphan", INFO, "caption file without a matching image")
                               for c in captions if c not in matched)
    if params.duplicate_distance >= 0:
        report.findings.extend(_duplicates(hashes, params.duplicate_distance))
    report.findings.sort(key=lambda f: (f.path, f.kind))
    report.elapsed_s = time.perf_counter() - started
    logger.debug("Dataset check of %s: %s", root, report.summary())
    return report


def _check_image(path: Path, params: CheckParams, report: CheckReport) -> _Probe | None:
    add = report.findings.append
    try:
        if path.stat().st_size == 0:
            add(Finding(path, "unreadable", ERROR, "empty file (0 bytes)"))
            return None
        p = _probe(path)
    except Exception as exc:
        reason = read_error_reason(path, exc)
        kind = "not_image" if reason == "not an image" else "unreadable"
        # Stray non-image files (notes, metadata) are harmless: training skips them.
        add(Finding(path, kind, INFO if kind == "not_image" else ERROR, reason))
        return None
    w, h = p.size
    if (problem := size_problem(w, h)) is not None:  # the rule training and preprocess apply too
        kind = "too_small_to_train" if problem.startswith("too small") else "too_thin_to_train"
        add(Finding(path, kind, ERROR, f"{problem}: training and preprocess skip it"))
        return None
    scale = max(params.width / w, params.height / h)
    if scale > 1.0:
        add(Finding(path, "small", WARNING, f"{w}×{h} px is smaller than {params.width}×{params.height}: it "
                    f"would be enlarged ×{scale:.2f}; upscale it first (preprocess --upscale) or replace it"))
    relative = (w / h) / (params.width / params.height)
    if max(relative, 1 / relative) > params.max_aspect:
        keep = min(relative, 1 / relative)
        add(Finding(path, "aspect", WARNING, f"extreme aspect ratio {w}×{h}: a {params.width}×{params.height} "
                    f"crop keeps {keep:.0%} of it; consider preprocess --split"))
    if (note := _mode_note(p)) is not None:
        add(Finding(path, "mode", INFO, note))
    if p.visible < MIN_COVERAGE:
        add(Finding(path, "transparent", WARNING, "(almost) fully transparent: it trains as a plain white image, "
                    "and with 'Use PNG alpha channel as loss weight' it is skipped; remove it or fix its alpha"))
    if p.orientation not in (0, 1):
        add(Finding(path, "exif_rotation", INFO, f"EXIF orientation {p.orientation}: used upright ({w}×{h})"))
    return p


def _check_caption(image: Path, cap: Path | None, words: list[str], report: CheckReport) -> None:
    add = report.findings.append
    if cap is None:
        add(Finding(image, "caption_missing", WARNING,
                    f"no caption file; training uses the file name: {caption_from_filename(image.stem)!r}"))
        text = caption_from_filename(image.stem)
    else:
        try:
            text = decode_caption(cap.read_bytes()).strip()
        except (OSError, UnicodeDecodeError) as exc:
            add(Finding(cap, "caption_unreadable", WARNING, f"caption unreadable ({exc}); the file name is used"))
            return
        if not text:
            add(Finding(image, "caption_empty", WARNING, f"{cap.name} is empty"))
            return
    if words and (hits := _mentions(text, words)):
        add(Finding(image, "caption_subject", WARNING,
                    f"caption mentions the subject ({', '.join(hits)}): captions should describe everything "
                    "except the subject (captions strip removes it)"))


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)  # numpy < 2.0


def _duplicates(hashes: list[tuple[Path, int]], max_distance: int) -> list[Finding]:
    """Each image that looks like an earlier one (Hamming distance of dHashes ≤ max_distance)."""
    if len(hashes) < 2:
        return []
    values = np.array([h for _, h in hashes], dtype=np.uint64)
    out = []
    for i in range(1, len(values)):  # vectorised against all earlier images: 10 000 images ≈ 1 s
        dist = _popcount(values[:i] ^ values[i])
        j = int(np.argmin(dist))
        if dist[j] <= max_distance:
            out.append(Finding(hashes[i][0], "duplicate", WARNING,
                               f"near-duplicate of {hashes[j][0].name} (hash distance {int(dist[j])}): "
                               "duplicates weigh that picture double"))
    return out
