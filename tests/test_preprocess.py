from __future__ import annotations

import io
import itertools
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from textual_inversion_ext.cli import main
from textual_inversion_ext.core.data import crops
from textual_inversion_ext.core.data.captioners import (
    CaptionerUnavailable,
    available_captioners,
    get_captioner,
    register_captioner,
    unregister_captioner,
)
from textual_inversion_ext.core.data.preprocess import PreprocessError, PreprocessParams, combine_captions, preprocess
from textual_inversion_ext.core.params import ParameterError

GREY = (128, 128, 128)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _patched(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    """A flat grey image with one high-entropy noise patch."""
    img = Image.new("RGB", (w, h), GREY)
    img.paste(_noise(box[2] - box[0], box[3] - box[1], seed=7), box[:2])
    return img


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _close(a: Image.Image, b: Image.Image, tol: float = 2.0) -> bool:
    return a.size == b.size and float(np.abs(_arr(a) - _arr(b)).mean()) <= tol


def _run(src: Path, **kw) -> tuple:
    params = PreprocessParams(source=str(src), **kw)
    result = preprocess(params)
    return result, Path(result.destination)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    return d


# --- sizes, crops, flips, tiles --------------------------------------------------------------


def test_outputs_have_target_size_and_keep_the_stem(src: Path) -> None:
    _noise(1024, 768).save(src / "wide one.jpg")
    _noise(300, 900, 1).save(src / "tall.png")
    result, dst = _run(src, width=640, height=384)
    assert dst == src.with_name("photos-Processed") and dst.is_dir()
    assert sorted(p.name for p in dst.iterdir()) == ["tall.png", "wide one.png"]
    for p in dst.iterdir():
        with Image.open(p) as img:
            assert img.size == (640, 384)
    assert result.status == "finished" and result.processed == 2 and result.outputs == 2


def test_centre_crop_matches_resize_and_crop_and_flip_is_a_mirror(src: Path) -> None:
    img = _noise(600, 300)
    img.save(src / "a.png")
    _result, dst = _run(src, width=300, height=300, flip=True)
    out, flipped = Image.open(dst / "a.png"), Image.open(dst / "a-flip.png")
    assert _close(out, img.crop((150, 0, 450, 300)))
    assert np.array_equal(np.asarray(flipped), np.asarray(out)[:, ::-1])


def _window_offset(out: Image.Image, img: Image.Image) -> int:
    """Where along its long axis `img` was cut to give `out` (a same-scale crop): best-matching offset."""
    o = np.asarray(out.convert("L"), dtype=np.int16)
    a = np.asarray(img.convert("L"), dtype=np.int16)
    horizontal = a.shape[1] > a.shape[0]
    span = (a.shape[1] - o.shape[1]) if horizontal else (a.shape[0] - o.shape[0])
    errs = [np.abs((a[:, d:d + o.shape[1]] if horizontal else a[d:d + o.shape[0]]) - o).mean() for d in range(span + 1)]
    return int(np.argmin(errs))


@pytest.mark.parametrize(("size", "box", "offset"), [
    # every window holding the whole patch is equally good: the crop takes the middle of that range
    ((900, 300), (720, 60, 860, 240), 580),
    ((900, 300), (20, 60, 160, 240), 10),
    ((900, 300), (400, 40, 520, 260), 310),
    ((300, 900), (60, 40, 240, 200), 20),  # portrait: the window slides vertically
    ((300, 900), (60, 650, 240, 880), 595),
])
def test_focal_crop_finds_the_high_entropy_patch(src, size, box, offset) -> None:
    img = _patched(*size, box)
    img.save(src / "p.png")
    _result, dst = _run(src, width=300, height=300, focal_crop=True)
    focal = Image.open(dst / "p.png")
    got = _window_offset(focal, img)
    assert abs(got - offset) <= 8
    lo, hi = (box[0], box[2]) if size[0] > size[1] else (box[1], box[3])
    assert got <= lo and hi <= got + 300  # the whole patch is in the crop
    if not 300 <= lo < hi <= 600:  # a centre crop, for contrast, misses (most of) the patch
        _result, centre = _run(src, destination=str(src.with_name("centre")), width=300, height=300)
        assert np.asarray(Image.open(centre / "p.png")).std() < 0.5 * np.asarray(focal).std()


def test_focal_centre_flat_image_and_same_aspect_fall_back_to_the_centre() -> None:
    assert crops.focal_centre(Image.new("RGB", (900, 300), GREY), (300, 300)) == 0.5
    assert crops.focal_centre(_noise(400, 400), (300, 300)) == 0.5


def test_face_detector_pulls_the_crop_towards_faces(src: Path) -> None:
    img = _patched(900, 300, (720, 60, 860, 240))  # entropy/edges say right…
    img.save(src / "f.png")

    def detector(image: Image.Image):  # …a face on the left (in the image it is given)
        return [(image.width * 0.02, 10, image.width * 0.1, 100)]

    params = PreprocessParams(source=str(src), width=300, height=300, focal_crop=True, focal_face_weight=1.0,
                              focal_entropy_weight=0.05, focal_edges_weight=0.05)
    result = preprocess(params, face_detector=detector)
    assert not any("Face detection is not available" in m for m in result.messages)
    out = np.asarray(Image.open(result.destination / "f.png").convert("L"), dtype=np.int16)
    assert out[:, -20:].std() < 5  # the right end of the crop is flat grey: the crop moved left


def test_no_face_detector_is_said_once(src: Path) -> None:
    _noise(200, 100).save(src / "a.png")
    result, _ = _run(src, width=100, height=100, focal_crop=True)
    assert sum("Face detection is not available" in m for m in result.messages) == 1


@pytest.mark.parametrize(("length", "tile", "overlap", "expected"), [
    (900, 300, 0.2, [0, 200, 400, 600]),
    (900, 300, 0.0, [0, 300, 600]),
    (600, 300, 0.5, [0, 150, 300]),
    (300, 300, 0.2, [0]),
    (1000, 300, 0.2, [0, 700 / 3, 1400 / 3, 700]),  # 4 tiles: 67 px overlap ≥ 60
])
def test_tile_offsets_golden(length, tile, overlap, expected) -> None:
    assert crops.tile_offsets(length, tile, overlap) == pytest.approx(expected)


@settings(max_examples=200, deadline=None)
@given(st.floats(1, 50), st.floats(1, 10), st.floats(0, 0.9))
def test_tile_offsets_cover_overlap_and_are_minimal(ratio: float, tile: float, overlap: float) -> None:
    length = tile * ratio
    offs = crops.tile_offsets(length, tile, overlap)
    assert offs[0] == 0 and offs[-1] + tile == pytest.approx(max(length, tile))
    for a, b in itertools.pairwise(offs):
        assert b - a <= tile * (1 - overlap) + 1e-6  # neighbours overlap at least `overlap`
    if len(offs) > 2:  # one tile fewer could not keep that overlap
        assert (length - tile) / (len(offs) - 2) > tile * (1 - overlap) - 1e-6


def test_split_tiles_are_the_expected_overlapping_crops(src: Path) -> None:
    img = _noise(900, 300)
    img.save(src / "pano.png")
    result, dst = _run(src, width=300, height=300, split=True, split_overlap=0.2, flip=True)
    names = sorted(p.name for p in dst.iterdir())
    assert names == sorted([f"pano-tile{i}{f}.png" for i in range(1, 5) for f in ("", "-flip")])
    for i, x in enumerate([0, 200, 400, 600], 1):
        assert _close(Image.open(dst / f"pano-tile{i}.png"), img.crop((x, 0, x + 300, 300)))
    assert result.outputs == 8


def test_split_threshold_decides_and_portrait_tiles_go_down(src: Path) -> None:
    _noise(600, 300).save(src / "w.png")  # one crop keeps 50 % of the long side
    _noise(200, 800, 1).save(src / "t.png")  # 25 %
    _result, dst = _run(src, width=200, height=200, split=True, split_threshold=0.4, split_overlap=0.0)
    assert sorted(p.name for p in dst.iterdir()) == ["t-tile1.png", "t-tile2.png", "t-tile3.png",
                                                    "t-tile4.png", "w.png"]
    assert _close(Image.open(dst / "t-tile2.png"), Image.open(src / "t.png").crop((0, 200, 200, 400)))


def test_autosized_crop_picks_the_size_and_reports_no_fit(src: Path) -> None:
    _noise(1000, 500).save(src / "wide.png")
    _noise(1000, 100, 1).save(src / "strip.png")  # 10:1 fits nothing within 10 % error
    result, dst = _run(src, autosize=True)
    assert Image.open(dst / "wide.png").size == (768, 384)
    assert Image.open(dst / "strip.png").size == (512, 512)
    notes = {f.source.name: f.notes for f in result.files}
    assert any("no auto-size" in n for n in notes["strip.png"])
    assert crops.autosize((1000, 500), 384, 768, 4096, 409600, "min_error", 0.1) == (768, 384)
    assert crops.autosize((1000, 700), 384, 768, 4096, 409600, "max_area", 0.1) == (768, 512)
    assert crops.autosize((1000, 700), 384, 768, 4096, 409600, "min_error", 0.1) == (640, 448)


def test_exif_rotated_input_comes_out_upright(src: Path) -> None:
    stored = Image.new("RGB", (200, 100), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 100, 100))  # red left half as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise: the stored left becomes the top
    stored.save(src / "rot.png", exif=exif)
    _result, dst = _run(src, width=100, height=200)
    out = np.asarray(Image.open(dst / "rot.png"))
    assert out.shape == (200, 100, 3)
    assert tuple(out[20, 50]) == (255, 0, 0) and tuple(out[180, 50]) == (0, 0, 255)


def test_small_images_are_enlarged_with_a_note_or_the_injected_upscaler(src: Path) -> None:
    _noise(100, 100).save(src / "small.png")
    result, dst = _run(src)
    assert Image.open(dst / "small.png").size == (512, 512)
    assert any("plain resizing" in n for n in result.files[0].notes)
    calls = []

    def upscaler(img: Image.Image, w: int, h: int) -> Image.Image:
        calls.append((img.size, w, h))
        return img.resize((w, h), Image.Resampling.NEAREST)

    params = PreprocessParams(source=str(src), destination=str(dst.with_name("up")), upscale=True)
    result = preprocess(params, upscale=upscaler)
    assert calls == [((100, 100), 512, 512)]
    assert any("upscaled" in n for n in result.files[0].notes)


# --- captions --------------------------------------------------------------------------------


class FakeCaptioner:
    name = "fake"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.closed = False

    def caption(self, img: Image.Image) -> str:
        self.seen.append(img.size)
        return "  generated   text "

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(("action", "with_existing", "without_existing"), [
    ("ignore", "generated text", "generated text"),
    ("copy", "old words", "generated text"),
    ("prepend", "old words, generated text", "generated text"),
    ("append", "generated text, old words", "generated text"),
])
def test_caption_sidecars_for_each_action(src, action, with_existing, without_existing) -> None:
    _noise(64, 64).save(src / "a.png")
    (src / "a.txt").write_text("old   words\n", encoding="utf-8")
    _noise(64, 64, 1).save(src / "b.png")
    cap = FakeCaptioner()
    params = PreprocessParams(source=str(src), width=64, height=64, flip=True, caption_action=action)
    result = preprocess(params, captioners=[cap])
    dst = result.destination
    for stem, text in (("a", with_existing), ("b", without_existing)):
        for suffix in ("", "-flip"):
            assert (dst / f"{stem}{suffix}.txt").read_text(encoding="utf-8") == text + "\n"
    assert cap.seen == [(64, 64), (64, 64)]  # once per crop, the flip reuses it
    assert cap.closed


def test_registered_captioners_are_combined(src: Path) -> None:
    class Tags:
        name = "tags"

        def caption(self, img):
            return "tag1, tag2"

    register_captioner("fake", FakeCaptioner)
    register_captioner("tags", Tags)
    try:
        assert {"fake", "tags"} <= set(available_captioners())
        _noise(64, 64).save(src / "a.png")
        result, dst = _run(src, width=64, height=64, captioners="fake, tags", caption_action="ignore")
        assert (dst / "a.txt").read_text(encoding="utf-8") == "generated text, tag1, tag2\n"
        assert result.messages == []
    finally:
        unregister_captioner("fake")
        unregister_captioner("tags")


def test_missing_captioner_weights_skip_the_caption_step_clearly(src: Path) -> None:
    _noise(64, 64).save(src / "a.png")
    (src / "a.txt").write_text("kept", encoding="utf-8")
    with pytest.raises(CaptionerUnavailable, match="not available offline"):
        get_captioner("blip")
    result, dst = _run(src, width=64, height=64, captioners="blip,deepbooru")
    assert result.processed == 1 and (dst / "a.png").exists()
    assert (dst / "a.txt").read_text(encoding="utf-8") == "kept\n"
    text = " ".join(result.messages)
    assert "'blip' is not available" in text and "'deepbooru' is not available" in text
    assert sum("Caption step skipped" in m for m in result.messages) == 1


def test_combine_captions() -> None:
    assert combine_captions("", "", "prepend") == ""
    assert combine_captions(" a ", "", "append") == "a"
    with pytest.raises(ValueError, match="caption action"):
        combine_captions("a", "b", "merge")


# --- bad input and safety --------------------------------------------------------------------


def test_bad_files_are_reported_never_raised(src: Path, monkeypatch) -> None:
    _noise(80, 80).save(src / "good ü café.png")
    (src / "good ü café.txt").write_text("unicode", encoding="utf-8")
    (src / "zero.png").write_bytes(b"")
    buf = io.BytesIO()
    _noise(128, 128).save(buf, "PNG")
    (src / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + b"junk" * 20)
    (src / "notes.md").write_text("hello", encoding="utf-8")
    _noise(400, 400).save(src / "bomb.png")
    os.symlink(src / "good ü café.png", src / "link.png")
    os.symlink(src / "missing.png", src / "broken.png")
    (src / "sub").mkdir()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 2)  # 400² > 2× the limit: a "bomb"
    before = _snapshot(src)
    result, dst = _run(src, width=64, height=64, workers=2)
    reasons = {f.source.name: (f.status, " ".join(f.notes)) for f in result.files}
    assert reasons["good ü café.png"][0] == "ok" and reasons["link.png"][0] == "ok"
    assert reasons["zero.png"] == ("skipped", "empty file (0 bytes)")
    assert reasons["truncated.png"][0] == "skipped" and "truncated" in reasons["truncated.png"][1]
    assert reasons["corrupt.jpg"][0] == "skipped"
    assert reasons["notes.md"] == ("skipped", "not an image")
    assert "decompression-bomb" in reasons["bomb.png"][1]
    assert reasons["broken.png"][0] == "skipped"
    assert "sub-folders" in reasons["sub"][1]
    assert (dst / "good ü café.txt").read_text(encoding="utf-8") == "unicode\n"
    assert _snapshot(src) == before  # the source folder is never modified


def test_destination_inside_or_equal_to_source_is_refused(src: Path, tmp_path: Path) -> None:
    _noise(64, 64).save(src / "a.png")
    for bad in (src, src / "out", src / "." / "x" / ".."):
        with pytest.raises(PreprocessError, match="source"):
            preprocess(PreprocessParams(source=str(src), destination=str(bad)))
    os.symlink(src, tmp_path / "alias")
    with pytest.raises(PreprocessError, match="inside the source"):
        preprocess(PreprocessParams(source=str(src), destination=str(tmp_path / "alias" / "out")))
    with pytest.raises(PreprocessError, match="does not exist"):
        preprocess(PreprocessParams(source=str(tmp_path / "nope")))
    with pytest.raises(ParameterError, match="Split overlap"):
        preprocess(PreprocessParams(source=str(src), split_overlap=0.95))
    with pytest.raises(ParameterError, match="lower bound"):
        preprocess(PreprocessParams(source=str(src), autosize=True, autosize_min_dim=768, autosize_max_dim=512))
    assert not list(src.iterdir())[1:]  # nothing created in the source


def test_recursive_keeps_layout_and_same_stems_do_not_collide(src: Path) -> None:
    (src / "a" / "deep").mkdir(parents=True)
    _noise(64, 64).save(src / "x.png")
    _noise(64, 64, 1).save(src / "x.jpg")
    _noise(64, 64, 2).save(src / "a" / "deep" / "x.png")
    result, dst = _run(src, width=64, height=64, recursive=True)
    outputs = sorted(str(p.relative_to(dst)) for p in dst.rglob("*.png"))
    assert outputs == ["a/deep/x.png", "x.png", "x_png.png"]
    assert result.processed == 3


@pytest.mark.parametrize("workers", [1, 2])
def test_stop_flag_interrupts_and_progress_counts(src: Path, workers: int) -> None:
    for i in range(12):
        _noise(64, 64, i).save(src / f"{i:02d}.png")
    stop = threading.Event()
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int, message: str) -> None:
        calls.append((done, total))
        if done == 3:
            stop.set()

    params = PreprocessParams(source=str(src), width=64, height=64, workers=workers)
    result = preprocess(params, progress=progress, stop=stop)
    assert result.status == "interrupted" and 3 <= result.processed < 12
    assert calls[0] == (0, 12) and [d for d, _ in calls] == list(range(len(calls)))
    assert any("Interrupted after" in m for m in result.messages)
    full = preprocess(PreprocessParams(source=str(src), width=64, height=64, workers=workers),
                      progress=lambda d, t, m: calls.append((d, t)))
    assert full.status == "finished" and calls[-1] == (12, 12)


# --- CLI -------------------------------------------------------------------------------------


def test_cli_preprocess_smoke(src: Path, capsys) -> None:
    _noise(300, 200).save(src / "a.png")
    (src / "bad.png").write_bytes(b"nope")
    assert main(["preprocess", str(src), "--width", "128", "--height", "128", "--flip"]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 file(s) processed into 2 image(s)" in out and "bad.png" in out and "Not for faces" in out
    assert Image.open(src.with_name("photos-Processed") / "a-flip.png").size == (128, 128)
    assert main(["preprocess", str(src), str(src / "inner")]) == 2
    assert "inside the source" in capsys.readouterr().err


def test_params_are_declared_once_and_options_default_off() -> None:
    import argparse

    from textual_inversion_ext.core.params import add_arguments, fields_of, from_namespace, json_schema

    parser = argparse.ArgumentParser()
    add_arguments(parser, PreprocessParams)
    assert from_namespace(PreprocessParams, parser.parse_args([])) == PreprocessParams()
    toggles = [f.name for f in fields_of(PreprocessParams) if f.type is bool]
    assert toggles and not any(getattr(PreprocessParams(), name) for name in toggles)
    schema = json_schema(PreprocessParams)["properties"]
    assert schema["caption_action"]["enum"] == ["ignore", "copy", "prepend", "append"]
    assert "Not for faces or text" in schema["flip"]["description"]
