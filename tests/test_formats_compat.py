"""Format compatibility with other clients (issue 12, points 14-16): convert names the output after the
output, keeps a diffusers token where it fits, recognises diffusers' SDXL checkpoint pairs and writes the
one-vector layout InvokeAI accepts; diffusers itself loads what we write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from textual_inversion_ext.cli import main
from textual_inversion_ext.core.embedding import SINGLE, Embedding
from textual_inversion_ext.core.errors import EmbeddingFormatError
from textual_inversion_ext.core.formats import convert, load_embedding, save_embedding
from textual_inversion_ext.service import Service

TOKEN = "<cat-toy>"


def _vectors(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * 0.02


def _diffusers_file(path: Path, n: int = 2, dim: int = 768, seed: int = 0) -> torch.Tensor:
    """What diffusers' training scripts save: {placeholder token: (n, dim)}, metadata {"format": "pt"}."""
    vectors = _vectors(n, dim, seed)
    if path.suffix == ".safetensors":
        save_file({TOKEN: vectors}, str(path), metadata={"format": "pt"})
    else:
        torch.save({TOKEN: vectors}, path)
    return vectors


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# ---------------------------------------------------------------- 14: names and tokens in convert


def test_convert_names_the_output_after_the_output_file(tmp_path: Path) -> None:
    src = tmp_path / "learned_embeds.bin"
    _diffusers_file(src)

    as_pt = convert(src, tmp_path / "cat.pt")
    assert as_pt.name == "cat"
    assert torch.load(as_pt.paths[0], weights_only=True)["name"] == "cat"  # was "learned_embeds"
    assert any(TOKEN in note and "not kept" in note for note in as_pt.notes)

    (card,) = convert(src, tmp_path / "cat.png").paths
    assert load_embedding(card).embedding.name == "cat"  # a PNG's trigger word is its stored name

    named = convert(src, tmp_path / "card.png", name="kitty")
    assert named.name == "kitty" and load_embedding(named.paths[0]).stored_name == "kitty"


def test_convert_keeps_the_diffusers_token_where_the_format_holds_it(tmp_path: Path) -> None:
    src = tmp_path / "learned_embeds.bin"
    _diffusers_file(src)

    as_st = convert(src, tmp_path / "cat.safetensors")  # kohya layout: the token goes into the metadata
    assert _metadata(as_st.paths[0])["token"] == TOKEN and _metadata(as_st.paths[0])["name"] == "cat"
    assert any("emb_params" in note for note in as_st.notes)

    (back,) = convert(as_st.paths[0], tmp_path / "again.bin").paths  # ... and back into the diffusers key
    assert list(torch.load(back, weights_only=True)) == [TOKEN]
    (direct,) = convert(src, tmp_path / "dog.safetensors", "diffusers-safetensors").paths
    assert list(load_file(direct)) == [TOKEN]


def test_cli_convert_name_option_and_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "learned_embeds.bin"
    _diffusers_file(src)
    assert main(["convert", str(src), str(tmp_path / "cat.pt"), "--name", "kitty"]) == 0
    out = capsys.readouterr().out
    assert "cat.pt (name 'kitty')" in out and f"note: the diffusers token {TOKEN!r}" in out
    assert torch.load(tmp_path / "cat.pt", weights_only=True)["name"] == "kitty"


# ---------------------------------------------------------------- 15: diffusers' SDXL pair


@pytest.mark.parametrize("stem", ["learned_embeds-steps-500", "learned_embeds"])
def test_diffusers_sdxl_training_pair_is_recognised_from_either_half(tmp_path: Path, stem: str) -> None:
    base, _, steps = stem.partition("-steps-")
    first = tmp_path / f"{stem}.safetensors"
    second = tmp_path / f"{base}_2{'-steps-' + steps if steps else ''}.safetensors"
    clip_l = _diffusers_file(first, n=2, dim=768, seed=1)
    clip_g = _diffusers_file(second, n=2, dim=1280, seed=2)

    for opened in (first, second):
        loaded = load_embedding(opened)
        assert loaded.format == "diffusers-sdxl-pair" and loaded.paths == (first, second)
        assert torch.equal(loaded.embedding.vectors["clip_l"], clip_l)
        assert torch.equal(loaded.embedding.vectors["clip_g"], clip_g)

    (out,) = convert(second, tmp_path / "cat.safetensors").paths  # SDXL in, SDXL out: nothing dropped
    assert set(load_file(out)) == {"clip_l", "clip_g"}


def test_pair_written_with_a_steps_name_follows_diffusers_naming(tmp_path: Path) -> None:
    emb = Embedding(name="x", vectors={"clip_l": _vectors(2, 768), "clip_g": _vectors(2, 1280)})
    written = save_embedding(emb, tmp_path / "learned_embeds-steps-10.safetensors", "diffusers-sdxl-pair")
    assert [p.name for p in written] == ["learned_embeds-steps-10.safetensors", "learned_embeds_2-steps-10.safetensors"]
    assert load_embedding(written[1]).format == "diffusers-sdxl-pair"


def test_lone_clip_g_half_is_refused_naming_its_partner(tmp_path: Path) -> None:
    half = tmp_path / "learned_embeds_2-steps-500.safetensors"
    _diffusers_file(half, dim=1280)
    with pytest.raises(EmbeddingFormatError, match=r"clip_g.*learned_embeds-steps-500\.safetensors, which is missing"):
        load_embedding(half)
    with pytest.raises(EmbeddingFormatError, match=r"learned_embeds-steps-500\.safetensors"):
        convert(half, tmp_path / "cat.safetensors")
    assert not (tmp_path / "cat.safetensors").exists()

    renamed = tmp_path / "mystery.safetensors"  # 1280 wide without diffusers' `_2` name
    _diffusers_file(renamed, dim=1280)
    with pytest.raises(EmbeddingFormatError, match=r"clip_g.*learned_embeds_2"):
        load_embedding(renamed)


def test_lone_clip_l_half_converts_with_a_note_naming_the_missing_half(tmp_path: Path) -> None:
    half = tmp_path / "learned_embeds-steps-500.safetensors"  # SD1 scripts write the same name and layout
    _diffusers_file(half)
    converted = convert(half, tmp_path / "cat.safetensors")
    assert any("learned_embeds_2-steps-500.safetensors" in note for note in converted.notes)


def test_embedding_list_shows_a_pair_once(tmp_path: Path) -> None:
    folder = tmp_path / "emb"
    folder.mkdir()
    _diffusers_file(folder / "learned_embeds.safetensors", dim=768)
    _diffusers_file(folder / "learned_embeds_2.safetensors", dim=1280)
    service = Service(backend=lambda: None, embeddings_dir=folder, log_root=tmp_path / "logs")
    found, skipped = service.scan_embeddings()
    assert [(e["file"], e["dims"]) for e in found] == [("learned_embeds.safetensors", {"clip_l": 768, "clip_g": 1280})]
    assert skipped == []


# ---------------------------------------------------------------- 16: InvokeAI's layout, the .bin warning


def _invokeai_token_dim(state_dict: dict[str, torch.Tensor]) -> int:
    """InvokeAI's probe for a diffusers-style file (one key): the width is read from shape[0]."""
    return next(iter(state_dict.values())).shape[0]


@pytest.mark.parametrize(("fmt", "name"), [("diffusers-bin", "cat.bin"), ("diffusers-safetensors", "cat.safetensors")])
def test_one_vector_diffusers_file_is_1d(tmp_path: Path, fmt: str, name: str) -> None:
    (path,) = save_embedding(Embedding("cat", {SINGLE: _vectors(1, 768)}), tmp_path / name, fmt)
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    assert next(iter(state.values())).shape == (768,)
    assert _invokeai_token_dim(state) == 768  # InvokeAI accepts 768/1024/1280; (1, 768) read as 1
    assert load_embedding(path).embedding.single().shape == (1, 768)

    (multi,) = save_embedding(Embedding("cat", {SINGLE: _vectors(3, 768)}), tmp_path / f"multi{path.suffix}", fmt)
    state = load_file(multi) if multi.suffix == ".safetensors" else torch.load(multi, weights_only=True)
    assert next(iter(state.values())).shape == (3, 768)  # several vectors keep diffusers' 2-D layout


def test_one_vector_pair_halves_are_1d(tmp_path: Path) -> None:
    emb = Embedding("x", {"clip_l": _vectors(1, 768), "clip_g": _vectors(1, 1280)})
    first, second = save_embedding(emb, tmp_path / "learned_embeds.safetensors", "diffusers-sdxl-pair")
    assert [next(iter(load_file(p).values())).shape for p in (first, second)] == [(768,), (1280,)]
    assert load_embedding(first).embedding.vectors["clip_g"].shape == (1, 1280)


def test_convert_to_diffusers_bin_warns_what_is_lost(tmp_path: Path) -> None:
    emb = Embedding("rick", {SINGLE: _vectors(2, 768)}, step=500, sd_checkpoint="abcdef1234",
                    sd_checkpoint_name="v1-5")
    (src,) = save_embedding(emb, tmp_path / "rick.safetensors")
    converted = convert(src, tmp_path / "rick.bin")
    (note,) = [n for n in converted.notes if "not kept" in n]
    assert "step 500" in note and "v1-5" in note and ".safetensors" in note
    assert convert(src, tmp_path / "kept.safetensors", "diffusers-safetensors").notes == []


# ---------------------------------------------------------------- diffusers loads what we write


@pytest.fixture(scope="module")
def diffusers_loader(tmp_path_factory: pytest.TempPathFactory):
    """diffusers' own `load_textual_inversion` on a tiny CLIP text encoder and tokenizer."""
    transformers = pytest.importorskip("transformers")
    mixin = pytest.importorskip("diffusers.loaders").TextualInversionLoaderMixin
    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "photo</w>": 3, "of</w>": 4}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=768, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=8,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)

    class Pipeline(mixin):
        hf_device_map = None
        components: ClassVar[dict] = {}

    def load(path: Path, **kwargs):
        tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
        encoder = transformers.CLIPTextModel(config)
        Pipeline().load_textual_inversion(str(path), tokenizer=tokenizer, text_encoder=encoder, **kwargs)
        new = sorted((i, t) for t, i in tokenizer.get_added_vocab().items() if t not in vocab)
        return {t: encoder.get_input_embeddings().weight[i].detach() for i, t in new}

    return load


def test_diffusers_loads_our_files(tmp_path: Path, diffusers_loader) -> None:
    one = Embedding("cat", {SINGLE: _vectors(1, 768, seed=3)}, extra={"token": TOKEN})
    (bin_path,) = save_embedding(one, tmp_path / "cat.bin")
    added = diffusers_loader(bin_path)
    assert list(added) == [TOKEN] and torch.allclose(added[TOKEN], one.single()[0])

    three = Embedding("dog", {SINGLE: _vectors(3, 768, seed=4)})
    (st_path,) = save_embedding(three, tmp_path / "dog.safetensors", "diffusers-safetensors")
    added = diffusers_loader(st_path)
    assert list(added) == ["dog", "dog_1", "dog_2"]
    assert torch.allclose(torch.stack(list(added.values())), three.single())

    (kohya,) = save_embedding(three, tmp_path / "kohya.safetensors")  # emb_params: the README says so
    assert list(diffusers_loader(kohya)) == ["emb_params", "emb_params_1", "emb_params_2"]
    assert list(diffusers_loader(kohya, token="dog")) == ["dog", "dog_1", "dog_2"]

    (pt,) = convert(bin_path, tmp_path / "kitty.pt").paths  # A1111 .pt: diffusers takes the stored name
    assert list(diffusers_loader(pt)) == ["kitty"]
