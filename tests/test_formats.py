"""Embedding file formats: round trips, A1111 compatibility, safety and error messages."""

from __future__ import annotations

import logging
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from textual_inversion_ext.core.embedding import SINGLE, Embedding
from textual_inversion_ext.core.errors import EmbeddingFormatError, InvalidNameError, UnsafeFileError
from textual_inversion_ext.core.formats import (
    FORMATS,
    convert,
    describe,
    load_embedding,
    load_optimizer_state,
    optim_path,
    save_embedding,
    save_optimizer_state,
)
from textual_inversion_ext.core.formats import png as png_fmt

FIXTURE_PARTS = ("shared", "fixtures", "a1111", "test_embedding.png")

A1111_PT_KEYS = {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}


def _find_fixture() -> Path | None:
    # The fixture lives in the workspace next to the repository, not inside it: look upward.
    for parent in Path(__file__).resolve().parents:
        candidate = parent.joinpath(*FIXTURE_PARTS)
        if candidate.is_file():
            return candidate
    return None


FIXTURE = _find_fixture()
needs_fixture = pytest.mark.skipif(
    FIXTURE is None, reason=f"{'/'.join(FIXTURE_PARTS)} not found in any parent folder of the tests"
)


def make_single(name: str = "rick", n: int = 3, dim: int = 768, seed: int = 0, **kw) -> Embedding:
    g = torch.Generator().manual_seed(seed)
    vec = torch.randn(n, dim, generator=g) * 0.02
    kw.setdefault("step", 123)
    kw.setdefault("sd_checkpoint", "abcdef1234")
    kw.setdefault("sd_checkpoint_name", "v1-5-pruned")
    return Embedding(name=name, vectors={SINGLE: vec}, **kw)


def make_sdxl(name: str = "xlthing", n: int = 2, seed: int = 1, **kw) -> Embedding:
    g = torch.Generator().manual_seed(seed)
    vectors = {"clip_l": torch.randn(n, 768, generator=g), "clip_g": torch.randn(n, 1280, generator=g)}
    kw.setdefault("step", 40)
    kw.setdefault("sd_checkpoint", "31e35c80fc")
    kw.setdefault("sd_checkpoint_name", "sd_xl_base_1.0")
    return Embedding(name=name, vectors=vectors, **kw)


def assert_same_vectors(a: Embedding, b: Embedding) -> None:
    assert set(a.vectors) == set(b.vectors)
    for key in a.vectors:
        assert b.vectors[key].dtype == torch.float32
        assert torch.equal(a.vectors[key], b.vectors[key]), key


def strip_text_chunk(src: Path, dst: Path) -> Path:
    """Re-save only the pixels, so the pixel payload is the only carrier left."""
    with Image.open(src) as im:
        pixels = im.convert("RGB")
    pixels.save(dst, format="PNG")
    with Image.open(dst) as im:
        assert png_fmt.TEXT_KEY not in getattr(im, "text", {})
    return dst


# ---------------------------------------------------------------- round trips


SINGLE_CASES = [
    # (format, file name, keeps step/checkpoint metadata)
    ("a1111-pt", "rick.pt", True),
    ("safetensors", "rick.safetensors", True),
    ("diffusers-bin", "rick.bin", False),  # diffusers wants the token as the only key: no room for metadata
    ("diffusers-safetensors", "rick.safetensors", True),
    ("a1111-png", "rick.png", True),
]


@pytest.mark.parametrize(("fmt", "filename", "keeps_metadata"), SINGLE_CASES)
def test_single_encoder_round_trip(tmp_path: Path, fmt: str, filename: str, keeps_metadata: bool) -> None:
    emb = make_single()
    written = save_embedding(emb, tmp_path / filename, fmt)
    assert written == [tmp_path / filename]

    loaded = load_embedding(written[0])
    assert loaded.format == fmt
    assert loaded.paths == (tmp_path / filename,)
    assert loaded.embedding.name == "rick"
    assert_same_vectors(emb, loaded.embedding)
    if keeps_metadata:
        assert loaded.embedding.step == 123
        assert loaded.embedding.sd_checkpoint == "abcdef1234"
        assert loaded.embedding.sd_checkpoint_name == "v1-5-pruned"
    else:
        assert loaded.embedding.step == 0
    assert loaded.embedding.content_hash() == emb.content_hash()


def test_format_is_inferred_from_suffix(tmp_path: Path) -> None:
    emb = make_single()
    expected = {
        ".pt": "a1111-pt",
        ".safetensors": "safetensors",
        ".bin": "diffusers-bin",
        ".png": "a1111-png",
    }
    for suffix, fmt in expected.items():
        (path,) = save_embedding(emb, tmp_path / f"rick{suffix}")
        assert load_embedding(path).format == fmt
    assert set(expected.values()) <= set(FORMATS)
    with pytest.raises(EmbeddingFormatError, match=r"\.pt, \.safetensors"):
        save_embedding(emb, tmp_path / "rick.ckpt")


def test_format_and_suffix_must_agree(tmp_path: Path) -> None:
    # A1111 picks its loader by suffix: a pickle named .safetensors would not load there.
    with pytest.raises(EmbeddingFormatError, match=r"\.safetensors"):
        save_embedding(make_single(), tmp_path / "rick.pt", "safetensors")
    with pytest.raises(EmbeddingFormatError, match="unknown embedding format"):
        save_embedding(make_single(), tmp_path / "rick.pt", "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_trigger_word_is_file_stem_not_stored_name(tmp_path: Path) -> None:
    (path,) = save_embedding(make_single(name="rick"), tmp_path / "morty.v2.pt")
    loaded = load_embedding(path)
    assert loaded.embedding.name == "morty.v2"  # A1111: os.path.splitext stem
    assert loaded.stored_name == "rick"


def test_png_trigger_word_is_stored_name(tmp_path: Path) -> None:
    (path,) = save_embedding(make_single(name="rick"), tmp_path / "renamed.png")
    loaded = load_embedding(path)
    assert loaded.embedding.name == "rick"
    assert loaded.carrier == "text-chunk"


def test_format_detected_from_content_not_suffix(tmp_path: Path) -> None:
    emb = make_single()
    (st_path,) = save_embedding(emb, tmp_path / "rick.safetensors")
    disguised = tmp_path / "disguised.pt"
    disguised.write_bytes(st_path.read_bytes())
    loaded = load_embedding(disguised)
    assert loaded.format == "safetensors"
    assert_same_vectors(emb, loaded.embedding)

    (pt_path,) = save_embedding(emb, tmp_path / "rick.pt")
    disguised_png = tmp_path / "disguised.png"
    disguised_png.write_bytes(pt_path.read_bytes())
    assert load_embedding(disguised_png).format == "a1111-pt"


# ---------------------------------------------------------------- A1111 structure


def test_written_pt_has_a1111_structure(tmp_path: Path) -> None:
    emb = make_single(n=4)
    (path,) = save_embedding(emb, tmp_path / "rick.pt")
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert set(data) == A1111_PT_KEYS
    assert data["string_to_token"] == {"*": 265}
    assert list(data["string_to_param"]) == ["*"]
    vec = data["string_to_param"]["*"]
    assert type(vec) is torch.Tensor
    assert vec.dtype == torch.float32
    assert vec.device.type == "cpu"
    assert vec.shape == (4, 768)
    assert vec.requires_grad is False
    assert torch.equal(vec, emb.single())
    assert data["name"] == "rick"
    assert data["step"] == 123 and type(data["step"]) is int
    assert data["sd_checkpoint"] == "abcdef1234"
    assert data["sd_checkpoint_name"] == "v1-5-pruned"


def test_trainable_tensor_is_saved_detached(tmp_path: Path) -> None:
    emb = make_single()
    emb.vectors[SINGLE].requires_grad_(True)
    (path,) = save_embedding(emb, tmp_path / "rick.pt")
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert data["string_to_param"]["*"].requires_grad is False


def test_written_safetensors_have_kohya_layout(tmp_path: Path) -> None:
    emb = make_single(n=2)
    (path,) = save_embedding(emb, tmp_path / "rick.safetensors")
    tensors = load_file(path)  # what A1111 calls
    assert list(tensors) == ["emb_params"]
    assert tensors["emb_params"].shape == (2, 768)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["name"] == "rick" and meta["step"] == "123"
    assert meta["sd_checkpoint"] == "abcdef1234" and meta["sd_checkpoint_name"] == "v1-5-pruned"


def test_diffusers_files_hold_only_the_token(tmp_path: Path) -> None:
    emb = make_single(n=2)
    emb.extra["token"] = "<rick>"
    (bin_path,) = save_embedding(emb, tmp_path / "learned_embeds.bin")
    data = torch.load(bin_path, weights_only=True)
    assert list(data) == ["<rick>"] and data["<rick>"].shape == (2, 768)
    (st_path,) = save_embedding(emb, tmp_path / "rick.safetensors", "diffusers-safetensors")
    assert list(load_file(st_path)) == ["<rick>"]
    loaded = load_embedding(st_path)
    assert loaded.format == "diffusers-safetensors"
    assert loaded.embedding.extra["token"] == "<rick>"


def test_diffusers_single_vector_1d(tmp_path: Path) -> None:
    path = tmp_path / "cat.bin"
    vec = torch.randn(768)
    torch.save({"<cat>": vec}, path)
    loaded = load_embedding(path)
    assert loaded.format == "diffusers-bin"
    assert loaded.embedding.name == "cat"
    assert loaded.embedding.single().shape == (1, 768)
    assert torch.equal(loaded.embedding.single()[0], vec)


def test_reads_legacy_parameter_dict_files(tmp_path: Path) -> None:
    if not hasattr(torch.serialization, "safe_globals"):
        pytest.skip("this torch cannot allowlist ParameterDict for weights-only loading")
    # The original TI repo (torch 1.11) pickled string_to_param as a ParameterDict.
    vec = torch.randn(2, 768)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    path = tmp_path / "old.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "old", "step": 5}, path)
    loaded = load_embedding(path)
    assert torch.equal(loaded.embedding.single(), vec)
    assert loaded.embedding.step == 5


# ---------------------------------------------------------------- SDXL


def test_sdxl_pt_round_trip_and_structure(tmp_path: Path) -> None:
    emb = make_sdxl()
    (path,) = save_embedding(emb, tmp_path / "xlthing.pt")
    data = torch.load(path, map_location="cpu", weights_only=True)
    # Only tensors: A1111/Forge call .detach() on every value of a clip_l/clip_g dict.
    assert set(data) == {"clip_l", "clip_g"}
    assert data["clip_l"].shape == (2, 768) and data["clip_g"].shape == (2, 1280)
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in data.values())

    loaded = load_embedding(path)
    assert loaded.format == "a1111-pt"
    assert loaded.embedding.is_sdxl
    assert loaded.embedding.name == "xlthing"
    assert_same_vectors(emb, loaded.embedding)


def test_sdxl_pt_with_metadata_keys_is_read(tmp_path: Path) -> None:
    emb = make_sdxl()
    path = tmp_path / "withmeta.pt"
    torch.save({**emb.vectors, "name": "withmeta", "step": 77, "sd_checkpoint": "deadbeef00"}, path)
    loaded = load_embedding(path)
    assert loaded.embedding.step == 77 and loaded.embedding.sd_checkpoint == "deadbeef00"
    assert_same_vectors(emb, loaded.embedding)


def test_sdxl_safetensors_round_trip(tmp_path: Path) -> None:
    emb = make_sdxl()
    (path,) = save_embedding(emb, tmp_path / "xlthing.safetensors")
    tensors = load_file(path)
    assert set(tensors) == {"clip_l", "clip_g"}
    assert tensors["clip_l"].shape == (2, 768) and tensors["clip_g"].shape == (2, 1280)
    loaded = load_embedding(path)
    assert loaded.format == "safetensors"
    assert_same_vectors(emb, loaded.embedding)
    assert (loaded.embedding.step, loaded.embedding.sd_checkpoint) == (40, "31e35c80fc")
    assert loaded.embedding.sd_checkpoint_name == "sd_xl_base_1.0"


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_diffusers_sdxl_pair_round_trip(tmp_path: Path, suffix: str) -> None:
    emb = make_sdxl(n=3)
    first = tmp_path / f"learned_embeds{suffix}"
    written = save_embedding(emb, first, "diffusers-sdxl-pair")
    second = tmp_path / f"learned_embeds_2{suffix}"
    assert written == [first, second]

    # each half is a plain diffusers file for its text encoder
    load = load_file if suffix == ".safetensors" else (lambda p: torch.load(p, weights_only=True))
    half_1, half_2 = load(first), load(second)
    assert len(half_1) == len(half_2) == 1
    assert next(iter(half_1.values())).shape == (3, 768)
    assert next(iter(half_2.values())).shape == (3, 1280)

    loaded = load_embedding(first)
    assert loaded.format == "diffusers-sdxl-pair"
    assert loaded.paths == (first, second)
    assert loaded.embedding.name == "learned_embeds"
    assert_same_vectors(emb, loaded.embedding)
    if suffix == ".safetensors":
        assert loaded.embedding.step == 40


def test_pair_sibling_with_wrong_width_is_not_joined(tmp_path: Path) -> None:
    save_file({"<a>": torch.randn(1, 768)}, tmp_path / "learned_embeds.safetensors")
    save_file({"<a>": torch.randn(1, 1024)}, tmp_path / "learned_embeds_2.safetensors")
    loaded = load_embedding(tmp_path / "learned_embeds.safetensors")
    assert loaded.format == "diffusers-safetensors"
    assert not loaded.embedding.is_sdxl


def test_unsafe_pair_sibling_is_reported(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"<a>": torch.randn(1, 768)}, tmp_path / "learned_embeds.bin")
    torch.save({"<a>": _RunsCommand(marker)}, tmp_path / "learned_embeds_2.bin")
    with pytest.raises(UnsafeFileError, match=r"learned_embeds_2\.bin"):
        load_embedding(tmp_path / "learned_embeds.bin")
    assert not marker.exists()


def test_sdxl_refused_where_format_holds_one_encoder(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingFormatError, match="diffusers-sdxl-pair"):
        save_embedding(make_sdxl(), tmp_path / "xl.bin")
    with pytest.raises(EmbeddingFormatError, match="one text encoder"):
        save_embedding(make_sdxl(), tmp_path / "xl.png")
    with pytest.raises(EmbeddingFormatError, match="clip_l and clip_g"):
        save_embedding(make_single(), tmp_path / "one.safetensors", "diffusers-sdxl-pair")
    assert list(tmp_path.iterdir()) == []


def test_sdxl_wrong_widths_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"clip_l": torch.randn(2, 1024), "clip_g": torch.randn(2, 1280)}, path)
    with pytest.raises(EmbeddingFormatError, match=r"clip_l.*1024 wide.*768"):
        load_embedding(path)
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)}, path)
    with pytest.raises(EmbeddingFormatError, match="same count"):
        load_embedding(path)


# ---------------------------------------------------------------- PNG


def test_lcg_key_stream_matches_reference() -> None:
    assert png_fmt.lcg_values(4).tolist() == [253, 242, 127, 44]
    assert int(png_fmt.lcg_values(100_100)[100:].astype(np.int64).sum()) == 12731374


@needs_fixture
def test_fixture_png_loads() -> None:
    loaded = load_embedding(FIXTURE)
    assert loaded.format == "a1111-png"
    assert loaded.carrier == "text-chunk"
    emb = loaded.embedding
    assert emb.name == "rick"
    assert emb.step == 60
    assert emb.single().shape == (8, 768)
    assert emb.sd_checkpoint is None and emb.sd_checkpoint_name is None


@needs_fixture
def test_fixture_carriers_decode_independently(tmp_path: Path) -> None:
    with Image.open(FIXTURE) as im:
        text = im.text[png_fmt.TEXT_KEY]
        rgb = np.asarray(im.convert("RGB"))
    from_text = png_fmt.decode_text_chunk(text)
    from_pixels = png_fmt.from_json_bytes(png_fmt.extract_payload(rgb), "pixels")
    t_text, t_pixels = from_text["string_to_param"]["*"], from_pixels["string_to_param"]["*"]
    assert t_text.shape == (8, 768)
    assert torch.equal(t_text, t_pixels)
    assert from_text["name"] == from_pixels["name"] == "rick"

    stripped = strip_text_chunk(FIXTURE, tmp_path / "pixels_only.png")
    loaded = load_embedding(stripped)
    assert loaded.carrier == "pixels"
    assert loaded.embedding.name == "rick" and loaded.embedding.step == 60
    assert torch.equal(loaded.embedding.single(), t_text.float())


def test_written_png_reads_back_through_pixels_only(tmp_path: Path) -> None:
    emb = make_single(n=5)
    (path,) = save_embedding(emb, tmp_path / "rick.png")
    loaded = load_embedding(strip_text_chunk(path, tmp_path / "stripped.png"))
    assert loaded.carrier == "pixels"
    assert loaded.embedding.name == "rick"
    assert loaded.embedding.step == 123
    assert loaded.embedding.sd_checkpoint_name == "v1-5-pruned"
    assert_same_vectors(emb, loaded.embedding)


def test_png_keeps_the_given_picture_between_separators(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    picture = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    emb = make_single(n=2)
    (path,) = save_embedding(emb, tmp_path / "rick.png", image=Image.fromarray(picture))
    with Image.open(path) as im:
        out = np.asarray(im.convert("RGB"))
    assert out.shape[0] == 64
    cols = (out.shape[1] - 80 - 2) // 2
    assert out.shape[1] == 2 * cols + 82
    # layout: [low block][black column][picture][black column][high block]
    assert not out[:, cols].any() and not out[:, cols + 81].any()
    assert np.array_equal(out[:, cols + 1 : cols + 81], picture)
    assert (out[:, :cols] > 0).all() and (out[:, cols + 82 :] > 0).all()  # no black pixel to crop away
    assert_same_vectors(emb, load_embedding(strip_text_chunk(path, tmp_path / "s.png")).embedding)


def test_pixel_payload_follows_the_a1111_layout(tmp_path: Path) -> None:
    """Decode a written PNG by the published recipe, written out here independently of png.py."""
    emb = make_single(n=1)
    (path,) = save_embedding(emb, tmp_path / "rick.png")
    with Image.open(path) as im:
        low = np.asarray(im.convert("RGB")) & 0x0F
    zero_cols = [x for x in range(low.shape[1]) if not low[:, x, :].any()]
    left, right = low[:, : zero_cols[0], :], low[:, zero_cols[-1] + 1 :, :]
    seed, key = 0, []
    for _ in range(left.size):
        seed = (1664525 * seed + 1013904223) % 2**32
        key.append((seed % 255) & 0x0F)
    key_arr = np.array(key, np.uint8).reshape(left.shape)
    raw = ((right ^ key_arr) << 4 | (left ^ key_arr)).astype(np.uint8).reshape(-1).tobytes()
    data = png_fmt.from_json_bytes(zlib.decompressobj().decompress(raw), "recipe")
    assert set(data) == A1111_PT_KEYS
    assert torch.equal(data["string_to_param"]["*"].float(), emb.single())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(min_size=1, max_size=3000), height=st.integers(png_fmt.MIN_HEIGHT, 70))
def test_pixel_codec_round_trips_any_payload(payload: bytes, height: int) -> None:
    picture = Image.new("RGB", (20, height), (0, 0, 0))  # black picture: separators must still be found
    shades = np.array([1, 5, 15], np.uint8)
    image = png_fmt.embed_payload(picture, payload, shades)
    assert png_fmt.extract_payload(np.asarray(image)) == payload


def test_png_too_small_picture_refused(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingFormatError, match="px high"):
        save_embedding(make_single(), tmp_path / "rick.png", image=Image.new("RGB", (32, 8)))
    assert not (tmp_path / "rick.png").exists()


def test_plain_image_is_not_an_embedding(tmp_path: Path) -> None:
    path = tmp_path / "preview.png"
    Image.fromarray(np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    with pytest.raises(EmbeddingFormatError, match="image without an embedding"):
        load_embedding(path)


def test_broken_text_chunk_falls_back_to_pixels(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from PIL import PngImagePlugin

    emb = make_single()
    (path,) = save_embedding(emb, tmp_path / "rick.png")
    with Image.open(path) as im:
        pixels = im.convert("RGB")
    info = PngImagePlugin.PngInfo()
    info.add_text(png_fmt.TEXT_KEY, "not base64 at all!")
    broken = tmp_path / "broken.png"
    pixels.save(broken, pnginfo=info)
    with caplog.at_level(logging.WARNING):
        loaded = load_embedding(broken)
    assert loaded.carrier == "pixels"
    assert_same_vectors(emb, loaded.embedding)
    assert "base64" in caplog.text


# ---------------------------------------------------------------- safety


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_torch_zip_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}, "x": _RunsCommand(marker)}, path)
    with pytest.raises(UnsafeFileError, match=r"system") as info:
        load_embedding(path)
    assert "evil.pt" in str(info.value)
    assert not marker.exists()


# torch's restricted unpickler refuses protocol 4 at the FRAME opcode, before the global; the refusal
# still names it (found by reading the opcodes; more cases in test_formats_damaged.py).
@pytest.mark.parametrize(("protocol", "message"), [(2, r"(posix|nt)\.system"), (4, r"(posix|nt)\.system")])
def test_malicious_plain_pickle_refused(tmp_path: Path, protocol: int, message: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"<x>": _RunsCommand(marker)}, protocol=protocol))
    with pytest.raises(UnsafeFileError, match=message):
        load_embedding(path)
    assert not marker.exists()


def test_malicious_optim_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    emb = make_single()
    (path,) = save_embedding(emb, tmp_path / "rick.pt")
    torch.save({"hash": emb.a1111_checksum(), "optimizer_state_dict": _RunsCommand(marker)}, optim_path(path))
    with pytest.raises(UnsafeFileError, match="system"):
        load_optimizer_state(emb, path)
    assert not marker.exists()


# ---------------------------------------------------------------- optimizer state


def _adamw_state(emb: Embedding) -> dict:
    param = emb.single().clone().requires_grad_(True)
    opt = torch.optim.AdamW([param], lr=5e-3)
    param.sum().backward()
    opt.step()
    return opt.state_dict()


def test_optimizer_state_round_trip(tmp_path: Path) -> None:
    emb = make_single()
    (path,) = save_embedding(emb, tmp_path / "rick.pt")
    state = _adamw_state(emb)
    written = save_optimizer_state(emb, path, state)
    assert written == tmp_path / "rick.pt.optim"

    raw = torch.load(written, weights_only=True)
    assert set(raw) == {"hash", "optimizer_state_dict"}
    assert raw["hash"] == emb.a1111_checksum() and len(raw["hash"]) == 4

    reloaded = load_embedding(path).embedding
    restored = load_optimizer_state(reloaded, path)
    assert restored is not None
    assert restored["param_groups"][0]["lr"] == 5e-3
    assert torch.equal(restored["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    # it must be usable by a fresh optimizer
    opt = torch.optim.AdamW([reloaded.single().clone().requires_grad_(True)], lr=1.0)
    opt.load_state_dict(restored)


def test_optimizer_state_checksum_mismatch_and_missing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    emb = make_single()
    (path,) = save_embedding(emb, tmp_path / "rick.pt")
    with caplog.at_level(logging.DEBUG):
        assert load_optimizer_state(emb, path) is None
    assert "no optimizer state" in caplog.text

    save_optimizer_state(emb, path, _adamw_state(emb))
    other = make_single(seed=99)
    assert other.a1111_checksum() != emb.a1111_checksum()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert load_optimizer_state(other, path) is None
    assert "checksum" in caplog.text


def test_grad_scaler_state_round_trips_beside_a1111s_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """fp16 runs save the GradScaler's state in the .optim too (step-exact resume); A1111's keys are unchanged."""
    from textual_inversion_ext.core.formats import load_training_state

    emb = make_single()
    (path,) = save_embedding(emb, tmp_path / "rick.pt")
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    save_optimizer_state(emb, path, _adamw_state(emb), scaler.state_dict())
    raw = torch.load(optim_path(path), weights_only=True)
    assert set(raw) == {"hash", "optimizer_state_dict", "scaler_state_dict"}
    state = load_training_state(emb, path)
    assert state is not None and state.scaler == scaler.state_dict() and state.scaler["scale"] == 512.0
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(state.scaler)
    assert fresh.get_scale() == 512.0 and fresh.get_growth_interval() == 7
    assert load_optimizer_state(emb, path)["param_groups"] == state.optimizer["param_groups"]

    save_optimizer_state(emb, path, _adamw_state(emb), {})  # a disabled scaler's state: nothing stored
    assert "scaler_state_dict" not in torch.load(optim_path(path), weights_only=True)
    assert load_training_state(emb, path).scaler is None

    torch.save({**raw, "scaler_state_dict": {"scale": "big"}}, optim_path(path))
    with caplog.at_level(logging.WARNING):
        state = load_training_state(emb, path)
    assert state is not None and state.scaler is None and state.optimizer  # the optimizer state still resumes
    assert "GradScaler state" in caplog.text


# ---------------------------------------------------------------- atomic writes and names


def test_failed_write_leaves_existing_file_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rick.pt"
    save_embedding(make_single(seed=1), path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_embedding(make_single(seed=2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rick.pt"]  # no temp file left behind


def test_failed_pair_write_replaces_neither_half(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tmp_path / "learned_embeds.safetensors"
    save_embedding(make_sdxl(seed=1), first, "diffusers-sdxl-pair")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    from textual_inversion_ext.core.formats import diffusers_fmt

    calls = []

    def flaky(tensors, metadata, tmp):
        calls.append(tmp)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, str(tmp), metadata=metadata)

    monkeypatch.setattr(diffusers_fmt, "write_tensors", flaky)
    with pytest.raises(OSError, match="disk full"):
        save_embedding(make_sdxl(seed=2), first, "diffusers-sdxl-pair")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("bad", ["", "a/b", "x:y", ".hidden", "tab\there"])
def test_invalid_names_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidNameError):
        save_embedding(make_single(name=bad), tmp_path / "ok.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("filename", [".hidden.pt", "a*b.safetensors", "what?.bin"])
def test_invalid_file_stem_refused(tmp_path: Path, filename: str) -> None:
    # For .pt/.bin/.safetensors the file stem becomes the trigger word.
    with pytest.raises(InvalidNameError):
        save_embedding(make_single(), tmp_path / filename)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad files


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.touch()
    with pytest.raises(EmbeddingFormatError, match="empty"):
        load_embedding(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingFormatError, match="does not exist"):
        load_embedding(tmp_path / "nope.pt")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(os.urandom(64) + b"not an embedding")
    with pytest.raises(EmbeddingFormatError, match="not an embedding file"):
        load_embedding(path)


@pytest.mark.parametrize("filename", ["rick.pt", "rick.safetensors", "rick.png"])
def test_truncated_files(tmp_path: Path, filename: str) -> None:
    (path,) = save_embedding(make_single(), tmp_path / filename)
    with pytest.raises(EmbeddingFormatError) as info:
        load_embedding(_truncate(path))
    assert not isinstance(info.value, UnsafeFileError)
    assert "rick" in str(info.value)


BAD_CONTENTS = {
    "non-dict": ([torch.zeros(1, 768)], "not a dict"),
    "bare tensor": (torch.zeros(1, 768), "not a dict"),
    "empty dict": ({}, "empty dict"),
    "multiple terms": (
        {"string_to_param": {"*": torch.zeros(1, 768), "x": torch.zeros(1, 768)}},
        "2 terms",
    ),
    "nan": ({"string_to_param": {"*": torch.tensor([[0.0, float("nan")]])}}, "NaN/inf"),
    "inf": ({"emb_params": torch.tensor([[1.0, float("inf")]])}, "NaN/inf"),
    "3-D": ({"string_to_param": {"*": torch.zeros(1, 2, 768)}}, r"shape \(1, 2, 768\)"),
    "no vectors": ({"string_to_param": {"*": torch.zeros(0, 768)}}, "no vectors"),
    "ints": ({"string_to_param": {"*": torch.zeros(2, 768, dtype=torch.int64)}}, "must be floats"),
    "not a tensor": ({"string_to_param": {"*": [1.0, 2.0]}}, "not a tensor"),
    "several tensors": ({"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, "2 tensors"),
    "tensor plus keys": ({"a": torch.zeros(1, 8), "name": "x"}, "single key"),
    "unknown dict": ({"hello": "world"}, "neither"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTENTS))
def test_bad_contents(tmp_path: Path, case: str) -> None:
    data, message = BAD_CONTENTS[case]
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    with pytest.raises(EmbeddingFormatError, match=message):
        load_embedding(path)


def test_bad_vectors_are_not_written(tmp_path: Path) -> None:
    emb = make_single()
    emb.vectors[SINGLE][0, 0] = float("nan")
    with pytest.raises(EmbeddingFormatError, match="NaN"):
        save_embedding(emb, tmp_path / "rick.pt")
    assert list(tmp_path.iterdir()) == []


def test_png_with_ragged_tensor_json(tmp_path: Path) -> None:
    import base64

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    raw = b'{"string_to_param": {"*": {"TORCHTENSOR": [[1.0, 2.0], [3.0]]}}, "name": "x"}'
    info.add_text(png_fmt.TEXT_KEY, base64.b64encode(raw).decode())
    path = tmp_path / "ragged.png"
    Image.new("RGB", (16, 16), (200, 200, 200)).save(path, pnginfo=info)
    with pytest.raises(EmbeddingFormatError, match="rectangular"):
        load_embedding(path)


# ---------------------------------------------------------------- describe / convert


def test_describe_single_and_sdxl(tmp_path: Path) -> None:
    (path,) = save_embedding(make_single(n=4), tmp_path / "rick.safetensors")
    info = describe(path)
    assert info["trigger_word"] == "rick" and info["format"] == "safetensors"
    assert info["encoders"] == {SINGLE: {"vectors": 4, "dim": 768}}
    assert (info["step"], info["sd_checkpoint"], info["sd_checkpoint_name"]) == (
        123,
        "abcdef1234",
        "v1-5-pruned",
    )
    assert info["content_hash"] == make_single(n=4).content_hash()
    assert len(info["shorthash"]) == 12 and info["sha256"].startswith(info["shorthash"])

    xl_paths = save_embedding(make_sdxl(n=2), tmp_path / "learned_embeds.safetensors", "diffusers-sdxl-pair")
    xl = describe(xl_paths[0])
    assert xl["sdxl"] is True and xl["format"] == "diffusers-sdxl-pair"
    assert xl["encoders"] == {"clip_l": {"vectors": 2, "dim": 768}, "clip_g": {"vectors": 2, "dim": 1280}}
    assert xl["files"] == [str(p) for p in xl_paths]
    assert "clip_g: 2 × 1280" in xl["shape"]


def test_convert_chain_keeps_vectors(tmp_path: Path) -> None:
    emb = make_single(name="rick")
    (start,) = save_embedding(emb, tmp_path / "rick.pt")
    (as_st,) = convert(start, tmp_path / "rick.safetensors").paths
    (as_png,) = convert(as_st, tmp_path / "card.png", name="rick").paths
    (back,) = convert(as_png, tmp_path / "out" / "rick.pt").paths
    final = load_embedding(back)
    assert final.format == "a1111-pt"
    assert final.embedding.step == 123
    assert_same_vectors(emb, final.embedding)
    assert load_embedding(as_png).embedding.name == "rick"  # the PNG stores the name it was given


def test_convert_sdxl_to_pair_and_back(tmp_path: Path) -> None:
    emb = make_sdxl()
    (src,) = save_embedding(emb, tmp_path / "xlthing.safetensors")
    pair = convert(src, tmp_path / "pair" / "xlthing.safetensors", "diffusers-sdxl-pair").paths
    assert [p.name for p in pair] == ["xlthing.safetensors", "xlthing_2.safetensors"]
    (back,) = convert(pair[0], tmp_path / "xlthing.pt").paths
    assert_same_vectors(emb, load_embedding(back).embedding)


def test_every_format_label_can_be_written_and_read(tmp_path: Path) -> None:
    suffix = {"a1111-pt": ".pt", "safetensors": ".safetensors", "diffusers-bin": ".bin",
              "diffusers-safetensors": ".safetensors", "a1111-png": ".png", "diffusers-sdxl-pair": ".safetensors"}
    for fmt in FORMATS:
        emb = make_sdxl() if fmt == "diffusers-sdxl-pair" else make_single()
        written = save_embedding(emb, tmp_path / fmt / f"thing{suffix[fmt]}", fmt=fmt)
        loaded = load_embedding(written[0])
        assert loaded.format == fmt
        assert_same_vectors(emb, loaded.embedding)

