"""A1111's image embeddings: the `sd-ti-embedding` PNG text chunk and the pixel payload.

Both carriers hold the same JSON: the `.pt` dict with every tensor as `{"TORCHTENSOR": nested list}`.

Pixel payload layout (A1111's, so files stay interchangeable)::

    [low-nibble block] [black column] [picture] [black column] [high-nibble block]

The zlib'd JSON (level 9) is split into low and high nibbles; each nibble stream is repeated to fill
an (h, cols, 3) block (h = picture height) and XORed with a fixed LCG key stream. The high nibble of
each block pixel is decoration and carries no data. A reader crops black borders, finds the columns
whose low nibbles are all zero (the separators) and takes the blocks left of the first and right of
the last.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from ..embedding import Embedding
from ..errors import EmbeddingFormatError
from ..fileio import atomic_path
from ._data import Decoded, a1111_dict, decode_data

logger = logging.getLogger(__name__)

TEXT_KEY = "sd-ti-embedding"
TENSOR_TAG = "TORCHTENSOR"
MIN_HEIGHT = 16  # fewer rows make an all-zero data column (a false separator) likely
_MAX_JSON_BYTES = 64 * 1024 * 1024  # far above any real embedding; stops zlib bombs
# Numerical Recipes LCG, as in A1111: state = (a*state + c) mod 2**32, value = state % 255.
_LCG_A, _LCG_C, _LCG_M = 1664525, 1013904223, 2**32
_lcg_lock = threading.Lock()  # the cache grows from whichever thread needs more values
_lcg_cache: dict[str, Any] = {"values": np.zeros(0, np.uint8), "state": 0}


def lcg_values(count: int) -> np.ndarray:
    """The first `count` values of the key stream generator (uint8, before masking)."""
    with _lcg_lock:
        values: np.ndarray = _lcg_cache["values"]
        if len(values) < count:
            state = _lcg_cache["state"]
            more = []
            for _ in range(count - len(values)):
                state = (_LCG_A * state + _LCG_C) % _LCG_M
                more.append(state % 255)
            values = np.concatenate([values, np.array(more, np.uint8)])
            _lcg_cache.update(values=values, state=state)
    return values[:count]


def _unmask(block: np.ndarray) -> np.ndarray:
    """XOR a block's low nibbles with the key stream (its own inverse), in row-major order."""
    key = (lcg_values(block.size) & 0x0F).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), key)


# ---------------------------------------------------------------- JSON (shared by both carriers)


def to_json_bytes(data: dict[str, Any]) -> bytes:
    def encode(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return {TENSOR_TAG: obj.detach().cpu().tolist()}
        raise TypeError(f"cannot store {type(obj).__name__} in an image embedding")

    return json.dumps(data, default=encode).encode("utf-8")


def from_json_bytes(raw: bytes | str, where: str) -> dict[str, Any]:
    def decode(obj: dict[str, Any]) -> Any:
        if TENSOR_TAG in obj:
            try:
                return torch.from_numpy(np.asarray(obj[TENSOR_TAG], dtype=np.float64))
            except (TypeError, ValueError) as exc:
                raise EmbeddingFormatError(f"{where}: a stored tensor is not a rectangular list of numbers.") from exc
        return obj

    try:
        data = json.loads(raw, object_hook=decode)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise EmbeddingFormatError(f"{where} is not valid embedding JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise EmbeddingFormatError(f"{where} holds a JSON {type(data).__name__}, not an embedding dict.")
    return data


def decode_text_chunk(value: str | bytes, where: str = "text chunk") -> dict[str, Any]:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EmbeddingFormatError(f"{where}: the {TEXT_KEY} text is not base64 ({exc}).") from exc
    return from_json_bytes(raw, where)


# ---------------------------------------------------------------- pixel payload


def _crop_black(rgb: np.ndarray) -> np.ndarray:
    """Drop outer rows/columns without a pixel whose three channels are all non-zero (A1111's rule)."""
    lit = (rgb > 0).all(axis=2)
    cols, rows = np.flatnonzero(lit.any(axis=0)), np.flatnonzero(lit.any(axis=1))
    if cols.size == 0:
        return rgb
    return rgb[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def extract_payload(rgb: np.ndarray, where: str = "image") -> bytes | None:
    """The JSON bytes hidden in an (h, w, 3) uint8 array; None when it has no separator columns."""
    low = _crop_black(rgb) & 0x0F
    separators = np.flatnonzero(~low.any(axis=(0, 2)))
    if separators.size < 2:
        return None
    lower = _unmask(low[:, : separators[0], :])
    upper = _unmask(low[:, separators[-1] + 1 :, :])
    if lower.size == 0 or upper.size == 0:
        if lower.size == upper.size:
            detail = "both pixel data blocks are empty (the separator columns are the image's outer columns)"
        else:
            side = "left of the first" if lower.size == 0 else "right of the last"
            detail = f"the pixel data block {side} separator column is empty"
        raise EmbeddingFormatError(
            f"{where}: {detail}; the image was cropped or edited, or it is not an embedding image."
        )
    if lower.shape != upper.shape:
        raise EmbeddingFormatError(
            f"{where}: the two pixel data blocks differ in size {lower.shape} vs {upper.shape}; "
            "the image was edited or it is not an embedding image."
        )
    packed = ((upper << 4) | lower).reshape(-1).tobytes()
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(packed, _MAX_JSON_BYTES)
    except zlib.error as exc:
        raise EmbeddingFormatError(
            f"{where}: the pixel data does not decode ({exc}); the image was resized, re-encoded lossily or "
            "is not an embedding image."
        ) from exc
    if not inflater.eof:
        raise EmbeddingFormatError(f"{where}: the pixel data is incomplete or too large to be an embedding.")
    return raw


def _decoration(shades: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """High-nibble pattern for a block: vertical runs of the given shades (1..15, never 0).

    Never 0 on purpose: every block pixel then has all channels > 0, so the reader's black-border
    crop can never eat a data row or column.
    """
    h, cols, _ = shape
    idx = (np.arange(cols)[None, :] * 7 + np.arange(h)[:, None] // 4) % len(shades)
    return np.repeat((shades[idx] << 4)[:, :, None], 3, axis=2).astype(np.uint8)


def embed_payload(picture: Image.Image, payload: bytes, shades: np.ndarray) -> Image.Image:
    """Return a new RGB image: data blocks and separators around `picture` (see module docstring)."""
    rgb = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    h, w, _ = rgb.shape
    if h < MIN_HEIGHT:
        raise EmbeddingFormatError(
            f"the picture is {h} px high; an image embedding needs at least {MIN_HEIGHT} px of height."
        )
    compressed = np.frombuffer(zlib.compress(payload, 9), np.uint8)
    cols = max(1, math.ceil(compressed.size / (3 * h)))
    # Repeat the stream to fill the block; the reader's inflater stops at the end of the zlib data.
    stream = np.resize(compressed, (h, cols, 3))
    low = _unmask(stream & 0x0F) | _decoration(shades, stream.shape)
    high = _unmask(stream >> 4) | _decoration(shades[::-1], stream.shape)
    canvas = np.zeros((h, 2 * cols + w + 2, 3), np.uint8)
    canvas[:, :cols] = low
    canvas[:, cols + 1 : cols + 1 + w] = rgb
    canvas[:, cols + w + 2 :] = high
    if extract_payload(canvas) != payload:  # cheap self-check before anything reaches the disk
        raise EmbeddingFormatError("internal error: the pixel payload did not read back; nothing was written.")
    return Image.fromarray(canvas)  # (h, w, 3) uint8 is RGB


def _shades(embedding: Embedding) -> np.ndarray:
    first = next(iter(embedding.vectors.values()))[0, :1024].abs().numpy()
    top = float(first.max()) if first.size else 0.0
    scaled = first / top if top > 0 else np.full_like(first, 0.5)
    return (1 + np.round(scaled * 14)).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def card(embedding: Embedding, size: int = 512) -> Image.Image:
    """A plain picture for embeddings without a preview: name, shape, step, and the first vector as bars."""
    img = Image.new("RGB", (size, size), (22, 24, 30))
    draw = ImageDraw.Draw(img)
    first = next(iter(embedding.vectors.values()))[0].numpy()
    bars = min(64, first.size)
    top = float(np.abs(first).max()) or 1.0
    width = (size - 40) / bars
    for i in range(bars):
        value = float(first[i * first.size // bars]) / top
        x0 = 20 + i * width
        y_mid = size * 0.62
        draw.rectangle(
            (x0, min(y_mid, y_mid - value * 90), x0 + width - 2, max(y_mid, y_mid - value * 90)),
            fill=(90, 160, 230) if value >= 0 else (230, 130, 90),
        )
    shape = ", ".join(f"{v.shape[0]} × {v.shape[1]}" for v in embedding.vectors.values())
    draw.text((20, 24), embedding.name, font=_font(40), fill=(240, 240, 240))
    lines = [f"vectors {shape}", f"step {embedding.step}"]
    if embedding.sd_checkpoint_name or embedding.sd_checkpoint:
        lines.append(f"model {embedding.sd_checkpoint_name or ''} [{embedding.sd_checkpoint or '?'}]")
    draw.text((20, size - 110), "\n".join(lines), font=_font(20), fill=(200, 200, 200), spacing=6)
    return img


# ---------------------------------------------------------------- file level


def read(path: Path) -> tuple[Decoded, str]:
    """Decode an image embedding: the text chunk first (A1111's order), else the pixels.

    Returns (decoded, carrier) with carrier "text-chunk" or "pixels".
    """
    try:
        with Image.open(path) as im:
            im.load()
            text = dict(getattr(im, "text", None) or {})
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error, MemoryError... on bad files
        detail = str(exc).strip()[:200] or type(exc).__name__
        raise EmbeddingFormatError(f"{path.name} is a damaged or truncated image ({detail}).") from exc

    text_error: EmbeddingFormatError | None = None
    if TEXT_KEY in text:
        where = f"{path.name} ({TEXT_KEY} text chunk)"
        try:
            return decode_data(decode_text_chunk(text[TEXT_KEY], where), where), "text-chunk"
        except EmbeddingFormatError as exc:
            logger.warning("%s; trying the pixel payload instead", exc)
            text_error = exc

    where = f"{path.name} (pixel payload)"
    raw = extract_payload(rgb, where)
    if raw is None:
        if text_error is not None:
            raise text_error
        raise EmbeddingFormatError(
            f"{path.name} is an image without an embedding: no {TEXT_KEY} text chunk and no pixel payload "
            "(A1111 treats such files as preview images)."
        )
    return decode_data(from_json_bytes(raw, where), where), "pixels"


def write(embedding: Embedding, path: Path, image: Image.Image | None = None) -> list[Path]:
    """Write a PNG that A1111 loads through either carrier; `image` is the picture (default: a card)."""
    if embedding.is_sdxl:
        raise EmbeddingFormatError(
            "A1111 image embeddings hold one text encoder; save SDXL embeddings as .safetensors or .pt."
        )
    payload = to_json_bytes(a1111_dict(embedding))
    composite = embed_payload(image if image is not None else card(embedding), payload, _shades(embedding))
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, base64.b64encode(payload).decode("ascii"))
    with atomic_path(path) as tmp:
        composite.save(tmp, format="PNG", pnginfo=info)
    return [path]
