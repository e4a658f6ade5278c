from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from textual_inversion_ext.core.data.images import (
    ALPHA_BACKGROUND,
    bucket_candidates,
    caption_from_filename,
    choose_bucket,
    load_rgb,
    resize_and_crop,
    scan_dataset,
    to_array,
    to_rgb,
    to_tensor,
)
from textual_inversion_ext.core.errors import DatasetError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _noise(w: int = 96, h: int = 80, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def _encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _near(a: tuple[int, ...], b: tuple[int, ...], tol: int = 8) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    _noise().save(d / "b_good.png")
    (d / "b_good.txt").write_text("  red car, blue sky \n", encoding="utf-8")
    _noise(seed=1).save(d / "00012-0-red_car-photo.jpg")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    png = _encoded(_noise(128, 128, 2), "PNG")
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    jpg = _encoded(_noise(128, 128, 3), "JPEG")
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "zero.png").write_bytes(b"")
    (d / "orphan.txt").write_text("no image for me", encoding="utf-8")
    (d / "meta.json").write_text('{"a": 1}', encoding="utf-8")
    _noise(8, 8).save(d / "tiny.png")
    _noise(seed=4).save(d / "café photo ü.png")
    (d / "café photo ü.txt").write_bytes("\ufeffunicode caption".encode())
    (d / ".DS_Store").write_bytes(b"\x00\x01junk")
    (d / "sub").mkdir()
    _noise(seed=5).save(d / "sub" / "nested.png")
    return d


def test_scan_messy_folder(messy: Path) -> None:
    scan = scan_dataset(messy)
    assert [(i.path.name, i.caption, i.width, i.height) for i in scan.items] == [
        ("00012-0-red_car-photo.jpg", "red car photo", 96, 80),
        ("b_good.png", "red car, blue sky", 96, 80),
        ("café photo ü.png", "unicode caption", 96, 80),
    ]
    assert scan.items[1].caption_file == messy / "b_good.txt"
    assert scan.items[0].caption_file is None
    reasons = {s.path.name: s.reason for s in scan.report}
    assert set(reasons) == {
        "corrupt.png", "truncated.png", "truncated.jpg", "zero.png",
        "orphan.txt", "meta.json", "tiny.png", "sub",
    }
    assert "corrupt" in reasons["corrupt.png"]
    assert "truncated" in reasons["truncated.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "0 bytes" in reasons["zero.png"]
    assert "without a matching image" in reasons["orphan.txt"]
    assert reasons["meta.json"] == "not an image"
    assert "too small" in reasons["tiny.png"] and "8×8" in reasons["tiny.png"]
    assert "recursive" in reasons["sub"]
    assert [s.path for s in scan.report] == sorted(s.path for s in scan.report)
    assert "3 image(s)" in scan.summary()


def test_scan_recursive_and_min_side(messy: Path) -> None:
    scan = scan_dataset(messy, recursive=True, min_side=8)
    paths = [i.path for i in scan.items]
    assert paths == sorted(paths)
    assert {"nested.png", "tiny.png"} <= {p.name for p in paths}
    assert messy / "sub" / "nested.png" in paths
    assert "sub" not in {s.path.name for s in scan.report}


def test_scan_is_deterministic(messy: Path) -> None:
    assert scan_dataset(messy) == scan_dataset(messy)


def test_missing_or_unusable_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_dataset(tmp_path / "file.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no files"):
        scan_dataset(empty)


def test_nothing_usable_lists_reasons(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.json").write_text("{}", encoding="utf-8")
    _noise(8, 8).save(tmp_path / "c.png")
    with pytest.raises(DatasetError) as info:
        scan_dataset(tmp_path)
    text = str(info.value)
    assert "a.png: empty file" in text and "b.json: not an image" in text and "c.png: too small" in text


def test_many_bad_files_are_summarised(tmp_path: Path) -> None:
    for i in range(12):
        (tmp_path / f"{i:02d}.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DatasetError, match="and 4 more"):
        scan_dataset(tmp_path)


def test_decompression_bomb_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _noise(100, 100).save(tmp_path / "bomb.png")
    _noise(30, 30).save(tmp_path / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 100×100 > 2×limit raises; 30×30 passes
    scan = scan_dataset(tmp_path, min_side=16)
    assert [i.path.name for i in scan.items] == ["ok.png"]
    assert "decompression-bomb" in scan.report[0].reason


def test_undecodable_caption_falls_back_to_file_name(tmp_path: Path) -> None:
    _noise().save(tmp_path / "red_car.png")
    (tmp_path / "red_car.txt").write_bytes(b"caf\xe9 \x80 bad")
    scan = scan_dataset(tmp_path)
    assert scan.items[0].caption == "red car"
    assert scan.report[0].path.name == "red_car.txt" and "UTF-8" in scan.report[0].reason


def test_utf16_and_case_insensitive_caption(tmp_path: Path) -> None:
    _noise().save(tmp_path / "IMG.PNG")
    (tmp_path / "img.txt").write_bytes("wide\u00a0caption".encode("utf-16"))
    scan = scan_dataset(tmp_path)
    assert scan.items[0].caption == "wide\u00a0caption"
    assert scan.report == []


def test_empty_caption_file_is_an_empty_caption(tmp_path: Path) -> None:
    _noise().save(tmp_path / "red_car.png")
    (tmp_path / "red_car.txt").write_text(" \n", encoding="utf-8")
    assert scan_dataset(tmp_path).items[0].caption == ""


@pytest.mark.parametrize(
    ("stem", "caption"),
    [
        ("00012-0-a_red-car", "a red car"),
        ("00012-a photo", "a photo"),
        ("3d_render", "3d render"),
        ("00012", ""),
        ("my__bmw--side", "my bmw side"),
    ],
)
def test_caption_from_filename(stem: str, caption: str) -> None:
    assert caption_from_filename(stem) == caption


# --- decoding -------------------------------------------------------------------------------


def test_exif_rotated_jpeg_is_upright(tmp_path: Path) -> None:
    # Stored 40×20: left half red, right half blue. Orientation 6 = "rotate 90° clockwise to view",
    # so the viewer sees 20×40 with red on top and blue below.
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    img = load_rgb(path)
    assert img.size == (20, 40)
    assert _near(img.getpixel((10, 5)), RED, 40)
    assert _near(img.getpixel((10, 35)), BLUE, 40)
    scan = scan_dataset(tmp_path, min_side=16)
    assert (scan.items[0].width, scan.items[0].height) == (20, 40)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    img = load_rgb(path)
    assert img.mode == "RGB" and _near(img.getpixel((8, 8)), RED, 16)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 257 * 64, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    img = load_rgb(path)
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    assert ALPHA_BACKGROUND == WHITE
    img = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 255, 0))
    img.putpixel((2, 0), (0, 0, 0, 128))
    path = tmp_path / "alpha.png"
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == RED
    assert out.getpixel((1, 0)) == WHITE
    assert _near(out.getpixel((2, 0)), (127, 127, 127), 2)
    assert load_rgb(path, background=(0, 0, 0)).getpixel((1, 0)) == (0, 0, 0)


def test_la_image(tmp_path: Path) -> None:
    img = Image.new("LA", (2, 1), (50, 255))
    img.putpixel((1, 0), (0, 0))
    path = tmp_path / "la.png"
    img.save(path)
    out = load_rgb(path)
    assert out.getpixel((0, 0)) == (50, 50, 50) and out.getpixel((1, 0)) == WHITE


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    out = load_rgb(path)
    assert out.getpixel((0, 0)) == WHITE  # index 0 (green) is transparent
    assert out.getpixel((1, 0)) == RED


def test_palette_with_alpha_entries() -> None:
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 255, 0, 0, 255, 0, 0, 255], rawmode="RGBA")
    img.putpixel((1, 0), 1)
    out = to_rgb(img)
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == RED


def test_grey_and_bilevel(tmp_path: Path) -> None:
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    Image.new("1", (2, 2), 1).save(tmp_path / "one.png")
    assert load_rgb(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)
    assert load_rgb(tmp_path / "one.png").getpixel((0, 0)) == WHITE


# --- buckets --------------------------------------------------------------------------------


def _log_aspect_error(bucket: tuple[int, int], w: int, h: int, max_aspect: float) -> float:
    limit = math.log(max_aspect)
    want = min(max(math.log(w / h), -limit), limit)
    return abs(math.log(bucket[0] / bucket[1]) - want)


@pytest.mark.parametrize("res", [256, 512, 768, 1024])
def test_square_image_gets_square_bucket(res: int) -> None:
    assert choose_bucket(300, 300, res) == (res, res)


def test_examples() -> None:
    assert choose_bucket(2000, 1000, 512) == (768, 384)
    assert choose_bucket(1000, 2000, 512) == (384, 768)
    assert choose_bucket(10000, 100, 512) == (768, 384)  # clamped to 2:1
    assert choose_bucket(1920, 1080, 512) == (704, 384)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 6000),
    st.integers(1, 6000),
    st.sampled_from([512, 576, 640, 768, 1024]),
    st.sampled_from([1.0, 1.5, 2.0, 3.0]),
)
def test_bucket_properties(w: int, h: int, res: int, max_aspect: float) -> None:
    bw, bh = choose_bucket(w, h, res, max_aspect=max_aspect)
    assert bw % 64 == 0 and bh % 64 == 0
    assert abs(bw * bh / res**2 - 1) <= 0.15 + 1e-9
    assert max(bw / bh, bh / bw) <= max_aspect + 1e-9
    # Independent brute force over every multiple-of-64 size in the area band: none crops less.
    sides = range(64, 4 * res, 64)
    band = [
        (x, y) for x in sides for y in sides
        if abs(x * y / res**2 - 1) <= 0.15 and max(x / y, y / x) <= max_aspect
    ]
    best = min(_log_aspect_error(c, w, h, max_aspect) for c in band)
    assert _log_aspect_error((bw, bh), w, h, max_aspect) <= best + 1e-9


def test_small_resolution_falls_back_to_a_square() -> None:
    assert bucket_candidates(100) == ((128, 128),)
    assert choose_bucket(500, 100, 100) == (128, 128)


def test_bucket_bad_arguments() -> None:
    with pytest.raises(ValueError):
        choose_bucket(0, 10, 512)
    with pytest.raises(ValueError):
        choose_bucket(10, 10, 32)
    with pytest.raises(ValueError):
        choose_bucket(10, 10, 512, max_aspect=0.5)


# --- resize, crop, tensor ------------------------------------------------------------------


def test_resize_and_crop_keeps_the_centre() -> None:
    img = Image.new("RGB", (300, 100), RED)
    img.paste(GREEN, (100, 0, 200, 100))
    img.paste(BLUE, (200, 0, 300, 100))
    out = resize_and_crop(img, (64, 64))
    assert out.size == (64, 64)
    assert _near(out.getpixel((32, 32)), GREEN, 2)
    assert _near(out.getpixel((3, 32)), GREEN, 2) and _near(out.getpixel((60, 32)), GREEN, 2)


def test_resize_and_crop_tall() -> None:
    img = Image.new("RGB", (100, 300), RED)
    img.paste(GREEN, (0, 100, 100, 200))
    out = resize_and_crop(img, (128, 64))  # 2:1 out of the middle: only green
    assert out.size == (128, 64)
    assert all(_near(out.getpixel((x, y)), GREEN, 2) for x in (2, 64, 125) for y in (2, 32, 61))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.sampled_from([(64, 64), (128, 64), (64, 192)]))
def test_resize_and_crop_exact_size(w: int, h: int, size: tuple[int, int]) -> None:
    assert resize_and_crop(Image.new("RGB", (w, h)), size).size == size


def test_to_tensor_and_array() -> None:
    img = Image.new("RGB", (4, 2), WHITE)
    img.putpixel((0, 0), (0, 0, 0))
    t = to_tensor(img)
    assert isinstance(t, torch.Tensor)
    assert t.shape == (3, 2, 4) and t.dtype == torch.float32
    assert t[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert t[:, 1, 3].tolist() == [1.0, 1.0, 1.0]
    arr = to_array(Image.new("L", (3, 5), 128))
    assert arr.shape == (3, 5, 3) and arr.dtype == np.float32
    assert float(arr.min()) >= -1.0 and float(arr.max()) <= 1.0
