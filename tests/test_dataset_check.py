from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from textual_inversion_ext.cli import main
from textual_inversion_ext.core.data.dataset_check import CheckParams, check_dataset, dhash, hamming, subject_words
from textual_inversion_ext.core.errors import DatasetError


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth random image (like a photo): structure a perceptual hash can see."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)


def _cap(folder: Path, stem: str, text: str) -> None:
    (folder / f"{stem}.txt").write_text(text, encoding="utf-8")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "set"
    d.mkdir()
    _photo(640, 512, 1).save(d / "good.png")
    _cap(d, "good", "a car on a street, trees")
    _photo(640, 512, 1).resize((660, 528)).save(d / "good2.jpg", quality=90)  # near-duplicate
    _cap(d, "good2", "street, trees")
    _photo(300, 200, 2).save(d / "small.png")
    _cap(d, "small", "small one")
    _photo(1600, 560, 3).save(d / "pano.png")
    _cap(d, "pano", "a panorama")
    rgba = _photo(512, 512, 4).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "alpha.png")
    _cap(d, "alpha", "cut-out")
    _photo(512, 512, 5).convert("CMYK").save(d / "cmyk.jpg")
    _cap(d, "cmyk", "print")
    sixteen = (np.asarray(_photo(512, 512, 6).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(d / "deep.png")
    _cap(d, "deep", "grey")
    _photo(512, 512, 7).convert("P").save(d / "palette.png")
    _cap(d, "palette", "few colours")
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo(640, 512, 8).save(d / "rotated.jpg", exif=exif)
    _cap(d, "rotated", "sideways")
    _photo(512, 512, 9).save(d / "nocaption.png")
    _photo(512, 512, 10).save(d / "empty caption.png")
    _cap(d, "empty caption", "  \n")
    _photo(512, 512, 11).save(d / "subject.png")
    _cap(d, "subject", "a Blue BMW in the snow")
    buf = io.BytesIO()
    _photo(512, 512, 12).save(buf, "PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[:2000])
    (d / "zero.jpg").write_bytes(b"")
    (d / "readme.md").write_text("notes", encoding="utf-8")
    _photo(40, 40, 13).save(d / "tiny.png")
    _cap(d, "orphan", "no image")
    return d


def test_every_problem_is_found(folder: Path) -> None:
    report = check_dataset(folder, CheckParams(subject="a blue bmw"))
    kinds = {(f.path.name, f.kind) for f in report.findings}
    expected = {
        ("good2.jpg", "duplicate"),
        ("small.png", "small"),
        ("pano.png", "aspect"),
        ("alpha.png", "mode"),
        ("cmyk.jpg", "mode"),
        ("deep.png", "mode"),
        ("palette.png", "mode"),
        ("rotated.jpg", "exif_rotation"),
        ("nocaption.png", "caption_missing"),
        ("empty caption.png", "caption_empty"),
        ("subject.png", "caption_subject"),
        ("truncated.png", "unreadable"),
        ("zero.jpg", "unreadable"),
        ("readme.md", "not_image"),
        ("tiny.png", "too_small_to_train"),
        ("orphan.txt", "caption_orphan"),
    }
    assert kinds == expected, kinds ^ expected
    usable = 12  # every decodable image with a side ≥ 64 px
    assert report.usable == usable and report.files == 16
    assert report.summary() == f"{usable} usable images, 6 warnings, 3 file(s) not usable"
    by_path = {f.path.name: f.message for f in report.findings}
    assert "good.png" in by_path["good2.jpg"]
    assert "×2.56" in by_path["small.png"] and "upscale" in by_path["small.png"]
    assert "bmw" in by_path["subject.png"] and "blue" in by_path["subject.png"]
    assert "composited onto white" in by_path["alpha.png"]
    assert "512×640" in by_path["rotated.jpg"]  # the upright size
    assert not report.for_file(folder / "good.png")


def test_options_turn_checks_off(folder: Path) -> None:
    report = check_dataset(folder, CheckParams(duplicate_distance=-1, max_aspect=4.0, width=256, height=256))
    kinds = {f.kind for f in report.findings}
    assert not kinds & {"duplicate", "aspect", "caption_subject"}
    assert "small" in kinds  # 300×200 is still smaller than 256×256
    with pytest.raises(DatasetError):
        check_dataset(folder / "missing")


def test_dhash_is_perceptual() -> None:
    a = _photo(512, 384, 1)
    assert hamming(dhash(a), dhash(a.resize((300, 225)))) <= 2
    assert hamming(dhash(a), dhash(_photo(512, 384, 2))) > 10
    assert subject_words("a photo of the Blue BMW") == ["blue", "bmw"]


def test_progress_and_stop(folder: Path) -> None:
    import threading

    stop = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int, message: str) -> None:
        seen.append(done)
        if done == 4:
            stop.set()

    report = check_dataset(folder, progress=progress, stop=stop)
    assert report.interrupted and seen == [1, 2, 3, 4]
    assert report.summary().endswith("(check interrupted)")


def test_cli_check_smoke(folder: Path, capsys) -> None:
    assert main(["check", str(folder), "--subject", "blue bmw"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("12 usable images, 6 warnings, 3 file(s) not usable")
    assert "subject.png" in out and "rotated.jpg" not in out  # info lines only with --all
    assert main(["check", str(folder), "--json", "--all"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["usable"] == 12 and any(f["kind"] == "exif_rotation" for f in data["findings"])
    empty = folder.parent / "empty"
    empty.mkdir()
    assert main(["check", str(empty)]) == 1
