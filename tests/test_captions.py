from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from textual_inversion_ext.cli import main
from textual_inversion_ext.core.data import captions
from textual_inversion_ext.core.data.captions import CaptionError


def _img(path: Path, w: int = 80, h: int = 64, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file except the undo history, byte for byte."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and captions.HISTORY_DIR not in p.parts}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for i, text in enumerate(["a photo of a blue bmw, street, trees", "blue bmw, snow, night",
                              "A Blue BMW parked by the sea"]):
        _img(d / f"img{i}.png", seed=i)
        (d / f"img{i}.txt").write_text(text + "\n", encoding="utf-8")
    _img(d / "nocap.jpg", seed=9)
    (d / "utf16.png").write_bytes((d / "img0.png").read_bytes())
    (d / "utf16.txt").write_bytes("blue bmw, rain".encode("utf-16"))  # Notepad "Unicode", no newline
    return d


# --- listing and thumbnails ------------------------------------------------------------------


def test_list_pages_and_thumbnails(data: Path, tmp_path: Path) -> None:
    _img(data / "big.png", 1200, 600, seed=3)
    cache = tmp_path / "cache"
    page = captions.list_captions(data, page=1, per_page=4, thumbnails=True, cache_dir=cache)
    assert page.total == 6 and page.pages == 2 and len(page.items) == 4
    assert [i.image.name for i in page.items] == ["big.png", "img0.png", "img1.png", "img2.png"]
    assert page.items[1].caption == "a photo of a blue bmw, street, trees"
    for item in page.items:
        assert item.thumbnail is not None and item.thumbnail.parent == cache
        with Image.open(item.thumbnail) as t:
            assert max(t.size) <= 256
    with Image.open(page.items[0].thumbnail) as t:
        assert t.size == (256, 128)
    last = captions.list_captions(data, page=99, per_page=4)
    assert last.page == 2 and [i.image.name for i in last.items] == ["nocap.jpg", "utf16.png"]
    assert not last.items[0].exists and last.items[0].caption_file == data / "nocap.txt"
    assert last.items[1].caption == "blue bmw, rain"
    again = captions.thumbnail(data / "big.png", cache)
    assert again == page.items[0].thumbnail  # cached, not remade
    with pytest.raises(CaptionError, match="outside the dataset"):
        captions.list_captions(data, thumbnails=True, cache_dir=data / "thumbs")


def test_broken_image_lists_with_an_error(data: Path, tmp_path: Path) -> None:
    (data / "broken.png").write_bytes(b"not a png")
    page = captions.list_captions(data, per_page=100, thumbnails=True, cache_dir=tmp_path / "c")
    broken = next(i for i in page.items if i.image.name == "broken.png")
    assert broken.thumbnail is None and "no thumbnail" in broken.error


# --- edits and undo --------------------------------------------------------------------------


def test_set_caption_and_undo(data: Path) -> None:
    before = _snapshot(data)
    result = captions.set_caption(data / "nocap.jpg", "  a new caption ")
    assert (data / "nocap.txt").read_text(encoding="utf-8") == "a new caption\n"
    assert captions.read_caption(data / "nocap.jpg") == "a new caption"
    assert result.changed == [data / "nocap.txt"]
    captions.set_caption(data / "img0.png", "edited")
    assert [h.operation for h in captions.history(data)] == ["edit img0.png", "edit nocap.jpg"]
    captions.undo(data)
    captions.undo(data)
    assert _snapshot(data) == before and not (data / "nocap.txt").exists()
    with pytest.raises(CaptionError, match="Nothing to undo"):
        captions.undo(data)


def test_find_replace_plain_regex_and_errors(data: Path) -> None:
    before = _snapshot(data)
    r = captions.find_replace(data, "blue bmw", "red car")
    assert len(r.changed) == 3  # "A Blue BMW" differs in case
    assert (data / "img1.txt").read_text(encoding="utf-8") == "red car, snow, night\n"
    assert (data / "utf16.txt").read_text(encoding="utf-8") == "red car, rain"  # no newline added
    r = captions.find_replace(data, r"(\w+) car", r"car of \1", regex=True, ignore_case=True)
    assert (data / "img1.txt").read_text(encoding="utf-8") == "car of red, snow, night\n"
    r = captions.find_replace(data, "\\1", "$", regex=False)  # plain: backslashes are literal
    assert r.changed == []
    with pytest.raises(CaptionError, match="Invalid regular expression"):
        captions.find_replace(data, "(unclosed", "x", regex=True)
    with pytest.raises(CaptionError, match="Invalid replacement"):
        captions.find_replace(data, "car", r"\3", regex=True)
    with pytest.raises(CaptionError, match="matches empty text"):
        captions.find_replace(data, "x*", "y", regex=True)
    with pytest.raises(CaptionError, match="Enter the text"):
        captions.find_replace(data, "", "y")
    captions.undo(data)
    captions.undo(data)
    assert _snapshot(data) == before


@pytest.mark.parametrize(("text", "phrases", "expected"), [
    ("a photo of a blue bmw, street, trees", ["blue bmw"], "a photo, street, trees"),
    ("blue bmw, snow, night", ["blue bmw"], "snow, night"),
    ("A Blue BMW parked by the sea", ["blue bmw"], "parked by the sea"),
    ("two blue bmws on a road", ["blue bmw"], "two on a road"),
    ("the blue-bmw's wheel, closeup", ["blue bmw"], "wheel, closeup"),
    ("a blue car, the blue car, blue sky", ["blue bmw", "a blue car"], "blue sky"),
    ("bmw logo on a bmwx", ["bmw"], "logo on a bmwx"),  # whole words only
    ("nothing to see", ["blue bmw"], "nothing to see"),
    ("  messy  ,, spacing ", ["zzz"], "  messy  ,, spacing "),  # untouched when nothing matched
])
def test_strip_phrases(text: str, phrases: list[str], expected: str) -> None:
    assert captions.strip_phrases(text, phrases) == expected


def test_strip_subject_folder_and_undo(data: Path) -> None:
    before = _snapshot(data)
    r = captions.strip_subject(data, "blue bmw", extra_phrases=["sea"])
    assert len(r.changed) == 4 and r.backup is not None
    assert (data / "img2.txt").read_text(encoding="utf-8") == "parked\n"  # no dangling "by the"
    assert (data / "utf16.txt").read_text(encoding="utf-8") == "rain"
    assert "undo restores" in r.message
    with pytest.raises(CaptionError, match="subject"):
        captions.strip_subject(data, "  ")
    captions.undo(data)
    assert _snapshot(data) == before


def test_prepend_append_are_idempotent_and_can_create(data: Path) -> None:
    before = _snapshot(data)
    captions.prepend(data, "photo")
    assert (data / "img1.txt").read_text(encoding="utf-8") == "photo, blue bmw, snow, night\n"
    assert captions.prepend(data, "photo").changed == []
    r = captions.append(data, "high quality", include_missing=True)
    assert (data / "nocap.txt").read_text(encoding="utf-8") == "high quality\n"
    assert len(r.changed) == 5
    with pytest.raises(CaptionError):
        captions.add_text(data, "x", where="middle")
    captions.undo(data)
    assert not (data / "nocap.txt").exists()
    captions.undo(data)
    assert _snapshot(data) == before


def test_tag_frequency(data: Path) -> None:
    tags = dict(captions.tag_frequency(data))
    assert tags["blue bmw"] == 2 and tags["street"] == 1
    assert captions.tag_frequency(data)[0] == ("blue bmw", 2)


def test_history_is_capped_and_hidden_from_scans(data: Path, monkeypatch) -> None:
    from textual_inversion_ext.core.data.images import scan_dataset

    monkeypatch.setattr(captions, "MAX_HISTORY", 2)
    for i in range(4):
        captions.set_caption(data / "img0.png", f"v{i}")
    assert [h.operation for h in captions.history(data)] == ["edit img0.png"] * 2
    (data / captions.HISTORY_DIR / "999999-interrupted").mkdir()  # no manifest: never an undo step
    assert len(captions.history(data)) == 2
    scan = scan_dataset(data)
    assert all(captions.HISTORY_DIR not in str(s.path) for s in scan.report)
    captions.undo(data)
    assert (data / "img0.txt").read_text(encoding="utf-8") == "v2\n"


# --- property: any find/replace, then undo, restores every byte ------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_raw = st.one_of(_text.map(lambda t: t.encode("utf-8")), _text.map(lambda t: t.encode("utf-16")),
                 st.binary(max_size=30))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(_raw, min_size=1, max_size=5), find=st.text(min_size=1, max_size=4),
       replace=_text, regex=st.booleans(), ignore_case=st.booleans(), missing=st.booleans())
def test_find_replace_then_undo_restores_every_byte(files, find, replace, regex, ignore_case, missing) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        png = folder / "0.png"
        _img(png, 8, 8)
        for i, raw in enumerate(files):
            if i:
                (folder / f"{i}.png").write_bytes(png.read_bytes())
            (folder / f"{i}.txt").write_bytes(raw)
        if missing:
            (folder / "extra.webp").write_bytes(png.read_bytes())  # an image without a caption
        before = _snapshot(folder)
        try:
            result = captions.find_replace(folder, find, replace, regex=regex, ignore_case=ignore_case)
        except CaptionError:
            assert _snapshot(folder) == before  # refused before touching anything
            return
        if result.changed:
            second = captions.prepend(folder, "p")  # a second bulk change on top (a no-op if already there)
            captions.undo(folder)
            if second.changed:
                captions.undo(folder)
        assert _snapshot(folder) == before
        assert captions.history(folder) == [] or not result.changed


# --- CLI -------------------------------------------------------------------------------------


def test_cli_captions_smoke(data: Path, capsys) -> None:
    before = _snapshot(data)
    assert main(["captions", "strip", str(data), "blue bmw", "--also", "sea"]) == 0
    assert "4 caption(s) changed" in capsys.readouterr().out
    assert main(["captions", "replace", str(data), "(", "x", "--regex"]) == 2
    assert "Invalid regular expression" in capsys.readouterr().err
    assert main(["captions", "list", str(data), "--per-page", "2", "--page", "2"]) == 0
    assert "page 2/3" in capsys.readouterr().out
    assert main(["captions", "tags", str(data), "--top", "3"]) == 0
    assert "distinct tag(s)" in capsys.readouterr().out
    assert main(["captions", "history", str(data)]) == 0
    assert "strip blue bmw, sea" in capsys.readouterr().out
    assert main(["captions", "undo", str(data)]) == 0
    assert _snapshot(data) == before
    assert main(["captions", "set", str(data / "img0.png"), "hello"]) == 0
    assert main(["captions", "prepend", str(data), "photo"]) == 0
    assert (data / "img0.txt").read_text(encoding="utf-8") == "photo, hello\n"
