"""Training images: dataset scanning, captions, decoding to 8-bit RGB, aspect buckets, resizing.

Pure Pillow + numpy; torch is imported only inside `to_tensor`. Unlike A1111 (HOST-NOTES §3,
§11.4, §11.28), the scan is sorted, optionally recursive, reports every file it cannot use and why,
and images are cropped to an aspect bucket instead of being stretched.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Transparent pixels are composited onto white: transparent-background datasets (product shots,
# cut-out characters) are almost always meant to be seen on white, and grey would teach the
# embedding a grey backdrop that no prompt asks for.
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# One size rule for preprocessing, the dataset check and training: a picture with a shorter side under MIN_SIDE,
# or longer than MAX_ASPECT times its shorter side, holds too little of the subject at the model's resolution to
# learn from, however it is enlarged or cropped (preprocess would otherwise turn a 1×1 pixel into a flat "image").
MIN_SIDE = 64
MAX_ASPECT = 16.0

CAPTION_SUFFIX = ".txt"
# Extensions Pillow usually reads; only used to word the skip reason ("corrupt" vs "not an image").
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".jxl"}
)
# Files the OS or other tools drop into folders; skipped without a report line.
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})

# "00012-0-a photo" (old A1111 preprocess output) -> "a photo". Stricter than A1111's ^[-\d]+\s*,
# which also eats the "3" of "3d render".
_NUMBER_PREFIX = re.compile(r"^(?:\d+(?:[-_\s]+|$))+")
_MAX_REASONS_IN_ERROR = 8


@dataclass(frozen=True)
class ImageItem:
    """A usable training image; width/height are after EXIF orientation."""

    path: Path
    caption: str
    width: int
    height: int
    caption_file: Path | None = None


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass
class DatasetScan:
    folder: Path
    items: list[ImageItem] = field(default_factory=list)
    report: list[SkippedFile] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        text = f"{len(self.items)} image(s) in {self.folder}"
        if self.report:
            text += f"; {len(self.report)} file(s) skipped or noted: " + _reasons(self.report)
        return text


def _reasons(report: list[SkippedFile], limit: int = _MAX_REASONS_IN_ERROR) -> str:
    shown = "; ".join(f"{s.path.name}: {s.reason}" for s in report[:limit])
    return shown + (f"; … and {len(report) - limit} more" if len(report) > limit else "")


# --- decoding --------------------------------------------------------------------------------


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them. Mode "I" is how
    # older Pillow versions opened 16-bit PNGs, so it is read as 0..65535 as well.
    arr = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")


def _float_to_l(img: Image.Image) -> Image.Image:
    arr = np.nan_to_num(np.asarray(img).astype(np.float64))
    if arr.size and arr.max() <= 1.0:  # float images are usually 0..1
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def has_hidden_alpha(img: Image.Image) -> bool:
    """Transparency that is not an alpha band: a tRNS colour key, or an RGBA palette."""
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def to_rgb(img: Image.Image, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """8-bit RGB from any mode Pillow decodes; alpha (or a transparent colour) goes onto `background`."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        img = _sixteen_bit_to_l(img)
    elif img.mode == "F":
        img = _float_to_l(img)
    if has_hidden_alpha(img) or img.mode in ("RGBa", "La", "PA"):
        img = img.convert("RGBA")  # palette/colour-key transparency becomes a real alpha channel
    if "A" in img.getbands():
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def exif_transpose(img: Image.Image, path: Path) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception as exc:  # broken EXIF blocks must not cost the image
        logger.warning("Ignoring unreadable EXIF orientation of %s: %s", path, exc)
        return img


def load_rgb(
    path: str | os.PathLike[str], background: tuple[int, int, int] = ALPHA_BACKGROUND
) -> Image.Image:
    """Fully decode an image, upright per its EXIF orientation, as 8-bit RGB.

    CMYK, 16-bit grey, float, palette and alpha images are converted; alpha is composited onto
    `background` (white by default). Raises Pillow's/OS errors for unreadable files.
    """
    path = Path(path)
    with Image.open(path) as img:
        img.load()  # decode everything now: truncated files fail here, not mid-training
        upright = exif_transpose(img, path)
        return to_rgb(upright, background).copy() if upright is img else to_rgb(upright, background)


# --- scanning --------------------------------------------------------------------------------


def read_error_reason(path: Path, exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return f"too large: over Pillow's decompression-bomb limit ({exc})"
    if isinstance(exc, UnidentifiedImageError):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return "corrupt image, or a format Pillow cannot read"
        return "not an image"
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError)):
        return f"cannot be read: {exc.strerror or exc}"
    if isinstance(exc, (OSError, SyntaxError, EOFError, ValueError)):
        return f"corrupt or truncated image: {exc}"
    return f"cannot be decoded: {type(exc).__name__}: {exc}"


def size_problem(width: int, height: int, min_side: int = MIN_SIDE) -> str | None:
    """Why an image of this size cannot be used (the shared rule above), or None."""
    if min(width, height) < min_side:
        return f"too small: {width}×{height} px, the shorter side must be at least {min_side} px"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"too thin: {width}×{height} px, the longer side may be at most {MAX_ASPECT:g}× the shorter"
    return None


def _probe(path: Path, min_side: int) -> tuple[int, int] | str:
    """(width, height) of a usable image, or the reason it cannot be used. Never raises."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x MAX_IMAGE_PIXELS; it raises above 2x (handled below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = load_rgb(path).size
    except Exception as exc:
        logger.debug("Cannot use %s", path, exc_info=True)
        return read_error_reason(path, exc)
    return size_problem(width, height, min_side) or (width, height)


def caption_from_filename(stem: str) -> str:
    """A caption from a file stem: number prefixes like "00012-0-" removed, "_"/"-" as spaces."""
    text = _NUMBER_PREFIX.sub("", stem)
    return " ".join(re.sub(r"[_-]+", " ", text).split())


def decode_caption(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with BOM (Windows Notepad "Unicode")
        return data.decode("utf-16")
    return data.decode("utf-8-sig")  # -sig: tolerate a UTF-8 BOM


def _read_caption(image: Path, caption_file: Path | None, report: list[SkippedFile]) -> str:
    if caption_file is None:
        return caption_from_filename(image.stem)
    try:
        return decode_caption(caption_file.read_bytes()).strip()
    except (UnicodeDecodeError, OSError) as exc:
        problem = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"unreadable ({exc})"
        reason = f"caption is {problem}; {image.name} uses its file name instead"
        report.append(SkippedFile(caption_file, reason))
        return caption_from_filename(image.stem)


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in _IGNORED_NAMES


def list_files(root: Path, recursive: bool, report: list[SkippedFile]) -> list[Path]:
    files: list[Path] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(Path(dirpath, f) for f in filenames)
    else:
        for entry in root.iterdir():
            if entry.is_dir():
                if not _is_hidden(entry):
                    reason = "folder: sub-folders are only read with recursive scanning"
                    report.append(SkippedFile(entry, reason))
            else:
                files.append(entry)
    return sorted(p for p in files if not _is_hidden(p))


def caption_index(captions: list[Path]) -> dict[tuple[Path, str], Path]:
    index: dict[tuple[Path, str], Path] = {}
    for cap in captions:
        index.setdefault((cap.parent, cap.stem.casefold()), cap)
        index[(cap.parent, cap.stem)] = cap  # an exact-case match wins over a case-folded one
    return index


def find_caption(image: Path, index: dict[tuple[Path, str], Path]) -> Path | None:
    return index.get((image.parent, image.stem)) or index.get((image.parent, image.stem.casefold()))


def scan_dataset(
    folder: str | os.PathLike[str], *, recursive: bool = False, min_side: int = MIN_SIDE
) -> DatasetScan:
    """Find the usable images (sorted by path) and their captions; list every other file and why.

    Each image is fully decoded once to prove it loads. A caption is the stripped content of
    `<stem>.txt` next to the image, else words from the file name. Bad files never raise;
    DatasetError is raised only for a missing folder or when no image is usable.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise DatasetError(f"The dataset folder {root} does not exist.")
    if not root.is_dir():
        raise DatasetError(f"The dataset path {root} is not a folder.")
    scan = DatasetScan(root)
    files = list_files(root, recursive, scan.report)
    captions = [p for p in files if p.suffix.lower() == CAPTION_SUFFIX]
    index = caption_index(captions)
    matched: set[Path] = set()
    for path in files:
        if path.suffix.lower() == CAPTION_SUFFIX:
            continue
        caption_file = find_caption(path, index)
        if caption_file is not None:
            matched.add(caption_file)
        probed = _probe(path, min_side)
        if isinstance(probed, str):
            scan.report.append(SkippedFile(path, probed))
            continue
        caption = _read_caption(path, caption_file, scan.report)
        scan.items.append(ImageItem(path, caption, probed[0], probed[1], caption_file))
    orphans = [c for c in captions if c not in matched]
    scan.report.extend(SkippedFile(c, "caption file without a matching image") for c in orphans)
    scan.report.sort(key=lambda s: s.path)
    _check_usable(scan)
    logger.info("Dataset %s: %d image(s), %d skipped or noted", root, len(scan.items), len(scan.report))
    return scan


def _check_usable(scan: DatasetScan) -> None:
    if scan.items:
        return
    if not scan.report:
        raise DatasetError(f"The dataset folder {scan.folder} has no files.")
    raise DatasetError(
        f"No usable image in {scan.folder} ({len(scan.report)} file(s) skipped): {_reasons(scan.report)}."
    )


# --- buckets and resizing --------------------------------------------------------------------


@lru_cache(maxsize=64)
def bucket_candidates(
    resolution: int, step: int = 64, max_aspect: float = 2.0, area_tolerance: float = 0.15
) -> tuple[tuple[int, int], ...]:
    """Every (w, h), multiples of `step`, with aspect within 1:max_aspect and area within
    ±area_tolerance of resolution². Falls back to the nearest square when none qualifies."""
    if resolution < step or step < 1:
        raise ValueError(f"resolution ({resolution}) must be at least step ({step}) and step at least 1")
    if max_aspect < 1.0:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    target = resolution * resolution
    lo, hi = target * (1 - area_tolerance), target * (1 + area_tolerance)
    longest = int(math.sqrt(hi * max_aspect)) + step
    sides = range(step, longest + 1, step)
    limit = max_aspect * (1 + 1e-9)
    out = [(w, h) for w in sides for h in sides if lo <= w * h <= hi and max(w / h, h / w) <= limit]
    if not out:
        side = max(step, round(resolution / step) * step)
        out = [(side, side)]
    return tuple(out)


def choose_bucket(
    width: int,
    height: int,
    resolution: int,
    step: int = 64,
    max_aspect: float = 2.0,
    *,
    area_tolerance: float = 0.15,
) -> tuple[int, int]:
    """The bucket (w, h) whose aspect is closest to the image's (clamped to max_aspect), i.e. the one
    that crops least; ties go to the area closest to resolution², then to the wider bucket."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}×{height}")
    limit = math.log(max_aspect)
    want = min(max(math.log(width / height), -limit), limit)
    target = resolution * resolution

    def key(c: tuple[int, int]) -> tuple[float, float, int]:
        # round() so float noise cannot decide between buckets of the same aspect
        return (round(abs(math.log(c[0] / c[1]) - want), 12), abs(c[0] * c[1] - target), -c[0])

    return min(bucket_candidates(resolution, step, max_aspect, area_tolerance), key=key)


def cover_box(
    width: int, height: int, size: tuple[int, int]
) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """The centre box of a `width` x `height` image that `resize_and_crop` keeps for `size` (w, h), in source
    pixels, and its top-left (y, x) in the image scaled to cover `size` (SDXL's crop coordinates)."""
    bw, bh = size
    if bw < 1 or bh < 1:
        raise ValueError(f"target size must be positive, got {size}")
    w, h = width, height
    if w * bh > h * bw:  # wider than the target: cut left and right
        cw = h * bw / bh
        box = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
    else:  # taller: cut top and bottom
        ch = w * bh / bw
        box = (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
    scale = bw / (box[2] - box[0])  # source pixels -> pixels of the covering resize
    return box, (round(box[1] * scale), round(box[0] * scale))


def resize_and_crop(
    img: Image.Image, size: tuple[int, int], resample: Image.Resampling = Image.Resampling.LANCZOS
) -> Image.Image:
    """Scale `img` to cover `size` and centre-crop it: no stretching, the least possible cut."""
    box, _ = cover_box(*img.size, size)
    # One resampling pass over the crop box; reducing_gap makes big downscales fast and still sharp.
    return img.resize((size[0], size[1]), resample, box=box, reducing_gap=3.0)


def to_array(img: Image.Image) -> np.ndarray:
    """float32 (3, H, W) in [-1, 1], the VAE's input range."""
    rgb = img if img.mode == "RGB" else to_rgb(img)
    arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """torch float32 (3, H, W) in [-1, 1]; torch is imported here only, so scanning stays light."""
    import torch

    return torch.from_numpy(to_array(img))
