"""Crop geometry for preprocessing: focal-point crops, overlapping tiles, auto-sized crop search.

Pure Pillow + numpy (no OpenCV). Centre crops are `images.resize_and_crop`; everything here works
out *where* to cut and then resizes once, like it does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# A face detector returns boxes (left, top, right, bottom) in the image's pixel coordinates.
FaceDetector = Callable[[Image.Image], Sequence[tuple[float, float, float, float]]]

# Focal analysis runs on a small grey copy: the window search needs structure, not detail, and
# a 256-px copy makes it cost ~1 ms whatever the source size.
_ANALYSIS_SIDE = 256
_ENTROPY_BINS = 32
AUTOSIZE_STEP = 64
AUTOSIZE_OBJECTIVES = ("max_area", "min_error")


@dataclass(frozen=True)
class FocalWeights:
    entropy: float = 0.5
    edges: float = 0.5
    faces: float = 0.9


def cover_scale(src: tuple[int, int], size: tuple[int, int]) -> float:
    """The factor that scales `src` to just cover `size` (both sides at least the target's)."""
    return max(size[0] / src[0], size[1] / src[1])


def _crop_resize(img: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float]) -> Image.Image:
    return img.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def crop_at(img: Image.Image, size: tuple[int, int], centre: float) -> Image.Image:
    """Cover-scale `img` to `size` and cut along the long axis with the window centred on `centre`
    (a 0..1 fraction of that axis), clamped so the window stays inside the image."""
    w, h = img.size
    tw, th = size
    if w * th > h * tw:  # wider than the target: the window slides horizontally
        cw = h * tw / th
        left = min(max(centre * w - cw / 2, 0.0), w - cw)
        box = (left, 0.0, left + cw, float(h))
    else:
        ch = w * th / tw
        top = min(max(centre * h - ch / 2, 0.0), h - ch)
        box = (0.0, top, float(w), top + ch)
    return _crop_resize(img, size, box)


# --- focal point -----------------------------------------------------------------------------


def _window_sums(profile: np.ndarray, window: int) -> np.ndarray:
    """Sum of `profile` (lines along the sliding axis, any trailing dims) over each window position."""
    cum = np.concatenate([np.zeros((1, *profile.shape[1:])), np.cumsum(profile, axis=0)])
    return cum[window:] - cum[:-window]


def _best_window(scores: np.ndarray, window: int, length: int) -> float | None:
    """Centre (0..1) of the best-scoring window; None when every position scores the same."""
    if scores.size == 0 or np.ptp(scores) <= 1e-9 * max(1.0, float(np.abs(scores).max())):
        return None
    best = np.flatnonzero(scores >= scores.max() - 1e-9)
    pos = (best[0] + best[-1]) / 2  # a plateau of equal windows: take its middle
    return (pos + window / 2) / length


def _entropy_centre(lines: np.ndarray, window: int) -> float | None:
    """Shannon entropy of the grey histogram in each window along axis 0; centre of the maximum."""
    n, _ = lines.shape
    q = np.minimum(lines.astype(np.int64) * _ENTROPY_BINS // 256, _ENTROPY_BINS - 1)
    flat = (np.arange(n)[:, None] * _ENTROPY_BINS + q).ravel()
    hist = np.bincount(flat, minlength=n * _ENTROPY_BINS).reshape(n, _ENTROPY_BINS).astype(np.float64)
    win = _window_sums(hist, window)
    p = win / np.maximum(win.sum(axis=1, keepdims=True), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
    return _best_window(ent, window, n)


def _edges_centre(lines: np.ndarray, window: int) -> float | None:
    """Gradient energy summed per window along axis 0; centre of the maximum."""
    a = lines.astype(np.float64)
    gx = np.abs(np.diff(a, axis=1, append=a[:, -1:]))
    gy = np.abs(np.diff(a, axis=0, append=a[-1:, :]))
    return _best_window(_window_sums((gx + gy).sum(axis=1), window), window, a.shape[0])


def _faces_centre(img: Image.Image, detector: FaceDetector, horizontal: bool) -> float | None:
    boxes = list(detector(img))
    if not boxes:
        return None
    # The middle of all faces, weighted by face area so a crowd's tiny background faces count less.
    areas = np.array([max(r - lft, 1.0) * max(b - t, 1.0) for lft, t, r, b in boxes])
    if horizontal:
        mids = np.array([(lft + r) / 2 for lft, _t, r, _b in boxes]) / img.width
    else:
        # Aim a third of the way down the face: keeps eyes, not chins, in frame.
        mids = np.array([t + (b - t) / 3 for _lft, t, _r, b in boxes]) / img.height
    return float((mids * areas).sum() / areas.sum())


def focal_centre(
    img: Image.Image,
    size: tuple[int, int],
    weights: FocalWeights = FocalWeights(),
    face_detector: FaceDetector | None = None,
) -> float:
    """Where (0..1 along the axis the crop window slides on) a `size` crop of `img` should centre.

    Each cue (entropy, edges, faces when a detector is given) proposes the centre of its best
    window; the result is their weighted mean over the cues that found something. No cue, or a
    window that cannot slide (same aspect), gives the centre (0.5).
    """
    w, h = img.size
    horizontal = w * size[1] > h * size[0]
    r = min(1.0, _ANALYSIS_SIDE / max(w, h))
    small = img.convert("L").resize((max(1, round(w * r)), max(1, round(h * r))), Image.Resampling.BILINEAR)
    grey = np.asarray(small)
    lines = grey.T if horizontal else grey  # axis 0 = the sliding axis
    n, cross = lines.shape
    window = max(1, min(n, round(cross * (size[0] / size[1] if horizontal else size[1] / size[0]))))
    if window >= n:
        return 0.5
    cues: list[tuple[float, float]] = []
    if weights.entropy > 0 and (c := _entropy_centre(lines, window)) is not None:
        cues.append((weights.entropy, c))
    if weights.edges > 0 and (c := _edges_centre(lines, window)) is not None:
        cues.append((weights.edges, c))
    if face_detector is not None and weights.faces > 0:
        try:
            if (c := _faces_centre(img, face_detector, horizontal)) is not None:
                cues.append((weights.faces, c))
        except Exception as exc:  # a detector failure must not cost the image
            logger.warning("Face detection failed, using entropy and edges only: %s", exc)
    total = sum(wt for wt, _ in cues)
    return sum(wt * c for wt, c in cues) / total if total > 0 else 0.5


def focal_crop(
    img: Image.Image,
    size: tuple[int, int],
    weights: FocalWeights = FocalWeights(),
    face_detector: FaceDetector | None = None,
) -> Image.Image:
    return crop_at(img, size, focal_centre(img, size, weights, face_detector))


# --- split oversized -------------------------------------------------------------------------


def coverage(src: tuple[int, int], size: tuple[int, int]) -> float:
    """Fraction (0..1] of the image's long axis that one cover-scaled `size` crop keeps."""
    w, h = src
    tw, th = size
    return min(w * th, h * tw) / max(w * th, h * tw)


def tile_offsets(length: float, tile: float, overlap: float) -> list[float]:
    """Start offsets of evenly spaced tiles covering `length`, neighbours overlapping by at least
    `overlap` × tile (0 ≤ overlap < 1). First tile at 0, last one flush with the end."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= tile + 1e-9:
        return [0.0]
    n = max(2, math.ceil((length - tile * overlap) / (tile * (1.0 - overlap)) - 1e-9))
    step = (length - tile) / (n - 1)
    return [i * step for i in range(n)]


def split_tiles(img: Image.Image, size: tuple[int, int], overlap: float) -> list[Image.Image]:
    """Cover-scale `img` to `size` and cut its long axis into overlapping `size` tiles."""
    w, h = img.size
    tw, th = size
    if w * th > h * tw:  # wide: tiles go left to right, in source pixels
        tile = h * tw / th
        return [_crop_resize(img, size, (x, 0.0, x + tile, float(h))) for x in tile_offsets(w, tile, overlap)]
    tile = w * th / tw
    return [_crop_resize(img, size, (0.0, y, float(w), y + tile)) for y in tile_offsets(h, tile, overlap)]


# --- auto-sized crop -------------------------------------------------------------------------


def autosize(
    src: tuple[int, int],
    min_dim: int,
    max_dim: int,
    min_area: int,
    max_area: int,
    objective: str = "max_area",
    max_error: float = 0.1,
) -> tuple[int, int] | None:
    """The output size (multiples of 64 within [min_dim, max_dim], area within [min_area, max_area])
    closest to the image's aspect: aspect error = 1 - min(r, 1/r) ≤ max_error, r = size aspect /
    image aspect. "max_area" picks the largest such size (ties: smaller error), "min_error" the
    best-fitting aspect (ties: larger area). None when nothing fits."""
    if objective not in AUTOSIZE_OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(AUTOSIZE_OBJECTIVES)}, got {objective!r}")
    aspect = src[0] / src[1]
    start = math.ceil(min_dim / AUTOSIZE_STEP) * AUTOSIZE_STEP
    best: tuple[tuple[float, float], tuple[int, int]] | None = None
    for w in range(start, max_dim + 1, AUTOSIZE_STEP):
        for h in range(start, max_dim + 1, AUTOSIZE_STEP):
            if not min_area <= w * h <= max_area:
                continue
            r = (w / h) / aspect
            error = 1.0 - min(r, 1.0 / r)
            if error > max_error + 1e-12:
                continue
            key = (-w * h, error) if objective == "max_area" else (round(error, 12), -w * h)
            if best is None or key < best[0]:
                best = (key, (w, h))
    return None if best is None else best[1]
