"""SDXL end to end on the tiny SDXL models: CLI create/train/info/convert and demo, the loss, file keys and shapes,
diffusers' two-call `load_textual_inversion`, resume, size conditioning and create's rows per encoder."""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_trainer import params, run

from textual_inversion_ext.backends.standalone import embedded_default
from textual_inversion_ext.cli import main
from textual_inversion_ext.core import create_hints, formats, tokens
from textual_inversion_ext.core.create import CreateParams, create_embedding
from textual_inversion_ext.core.embedding import SDXL_KEYS
from textual_inversion_ext.core.training.metrics import read_loss_csv
from textual_inversion_ext.core.training.records import recorded_step, sidecar_path
from textual_inversion_ext.core.training.run import RunRequest, run_training
from textual_inversion_ext.core.training.train_params import TrainParams

CPU = ["--model", "tiny-sdxl", "--device", "cpu"]
QUIET = ["--save-every", "0", "--preview-every", "0", "--no-comparison-grid", "--val-every", "0"]


@pytest.fixture(scope="module")
def sdxl():
    return embedded_default("tiny-sdxl", device="cpu")


def quick(**kw) -> TrainParams:
    """test_trainer's params without validation (its own test is the loss test here)."""
    return params(**{"val_every": 0, **kw})


def fresh(backend, folder: Path, suffix: str | None = None, name: str = "toy") -> Path:
    return create_embedding(backend, CreateParams(name=name, init_text="red robot", overwrite=True), folder,
                            suffix=suffix).path


def offline_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer from open_clip's bundled BPE vocabulary (the one core/tokens counts with): no
    download. SDXL's second tokenizer pads with '!' (id 0)."""
    from transformers import CLIPTokenizer

    bpe = tokens._tokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip's spelling
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def test_demo_runs_on_tiny_sdxl_from_the_cli(tmp_path, monkeypatch, capsys):
    # One sampling step per preview and grid image: the demo's own 20 would be most of this test's time.
    from textual_inversion_ext import demo

    monkeypatch.setattr(demo, "TrainParams", functools.partial(TrainParams, preview_steps=1))
    assert main(["demo", "--steps", "3", "--out", str(tmp_path), *CPU]) == 0
    out = capsys.readouterr().out
    embeddings = tmp_path / "embeddings"
    trained = formats.load_embedding(embeddings / "demo-robot.safetensors").embedding  # the file trained
    assert trained.step == 3 and trained.dims == {"clip_l": 32, "clip_g": 64}
    assert formats.load_embedding(embeddings / "demo-robot.pt").embedding.dims == trained.dims
    assert "demo-robot.safetensors" in out and "Validation loss" in out
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list(tmp_path.glob("logs/demo-robot/*/demo-robot-comparison.png"))


def test_cli_create_train_info_for_both_file_types(demo_data, tmp_path, capsys):
    out = tmp_path / "embeddings"
    assert main(["create", "robo-st", "--init-text", "red robot", "--out", str(out), *CPU]) == 0
    created = capsys.readouterr().out
    assert "clip_l 32 + clip_g 64 wide" in created  # create says what a vector is per encoder
    assert main(["create", "robo-pt", "--init-text", "red robot", "--format", ".pt", "--out", str(out), *CPU]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["robo-pt.pt", "robo-st.safetensors"]  # SDXL default: .safetensors
    for path in (out / "robo-st.safetensors", out / "robo-pt.pt"):
        assert main(["train", str(path), str(demo_data), "--log-dir", str(tmp_path / "logs"), "--max-steps", "2",
                     *QUIET, *CPU]) == 0
        capsys.readouterr()
        assert main(["info", str(path), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["encoders"] == {"clip_l": {"vectors": 2, "dim": 32}, "clip_g": {"vectors": 2, "dim": 64}}
        assert info["step"] == 2  # the .pt holds none: its run record does
        assert main(["info", str(path)]) == 0
        assert "clip_l: 2 × 32, clip_g: 2 × 64" in capsys.readouterr().out
    # A1111/Forge read every value of this dict as a tensor: nothing but the two
    assert set(torch.load(out / "robo-pt.pt", weights_only=True)) == {"clip_l", "clip_g"}


def test_loss_falls_both_tensors_change_and_norm_health_is_recorded(sdxl, demo_data, tmp_path):
    emb = fresh(sdxl, tmp_path)
    before = formats.load_embedding(emb).embedding
    out = run(sdxl, emb, demo_data, tmp_path, params(max_steps=24, val_every=12, val_budget=0.0))
    after = formats.load_embedding(emb).embedding
    (first_step, first), *_, (last_step, last) = out.result.validation  # fixed noise and timesteps
    assert (first_step, last_step) == (0, 24) and last < first
    for key in SDXL_KEYS:
        assert not torch.equal(before.vectors[key], after.vectors[key]), key
    rows = read_loss_csv(out.paths.loss_csv)
    assert len(rows) == 24 and all(math.isfinite(r["norm_ratio"]) and r["norm_ratio"] > 0 for r in rows)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_resume_in_place_or_from_a_snapshot_equals_the_uninterrupted_run(sdxl, demo_data, tmp_path, suffix):
    straight = fresh(sdxl, tmp_path / "a", suffix)
    snapshot = run(sdxl, straight, demo_data, tmp_path / "a", quick(max_steps=6, save_every=3)).paths.snapshots
    in_place = fresh(sdxl, tmp_path / "b", suffix)
    run(sdxl, in_place, demo_data, tmp_path / "b", quick(max_steps=3))
    second = run(sdxl, in_place, demo_data, tmp_path / "b", quick(max_steps=6))
    assert json.loads(sidecar_path(in_place).read_text())["saved"]["steps_done"] == 3
    other = fresh(sdxl, tmp_path / "c", suffix)
    run_training(sdxl, RunRequest(other, demo_data, tmp_path / "c" / "logs", quick(max_steps=6),
                                  resume_from=snapshot / "toy-3.pt"))
    expected = formats.load_embedding(straight).embedding
    assert second.result.step == 6
    for path in (in_place, other):
        got = formats.load_embedding(path).embedding
        assert recorded_step(got, path) == 6
        for key in SDXL_KEYS:
            torch.testing.assert_close(got.vectors[key], expected.vectors[key], rtol=1e-4, atol=1e-6)


def test_size_conditioning_reaches_the_unet(sdxl, tmp_path):
    data = tmp_path / "sizes"
    data.mkdir()
    Image.new("RGB", (300, 200), (200, 30, 30)).save(data / "wide.png")  # 300 wide, 200 high
    Image.new("RGB", (128, 128), (30, 30, 200)).save(data / "square.png")
    seen: set[tuple[int, ...]] = set()

    def spy(module, args, kwargs):
        seen.update(tuple(int(v) for v in row) for row in kwargs["added_cond_kwargs"]["time_ids"].tolist())

    handle = sdxl.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        out = run(sdxl, fresh(sdxl, tmp_path), data, tmp_path, quick(max_steps=2, batch_size=2, buckets=False))
    finally:
        handle.remove()
    cuts = {p.name: g for p, g in zip(out.data.paths, out.data.geometry)}
    wide = cuts["wide.png"]
    assert wide.original == (200, 300) and wide.crop[0] == 0 and wide.crop[1] > 0 and wide.target == (128, 128)
    assert cuts["square.png"].as_tuple() == (128, 128, 0, 0, 128, 128)
    assert seen == {wide.as_tuple(), (128, 128, 0, 0, 128, 128)}  # each image's own time ids, nothing else


def test_create_starts_each_encoder_from_its_own_token_rows(sdxl, tmp_path):
    created = create_embedding(sdxl, CreateParams(name="robo", init_text="red robot"), tmp_path)
    ids = tokens.token_ids("red robot")
    assert created.path.suffix == ".safetensors" and len(ids) == 2
    for key, module in zip(SDXL_KEYS, (sdxl.text_encoder, sdxl.text_encoder_2)):
        table = module.get_input_embeddings().weight.detach()
        assert torch.equal(created.embedding.vectors[key], table[ids].float()), key
    assert not torch.equal(created.embedding.vectors["clip_l"][:, :32], created.embedding.vectors["clip_g"][:, :32])
    note = create_hints.init_text_hints("red robot", 0, "pool", sdxl.info.encoders)[-1]
    assert note.text.startswith("clip_l 32 + clip_g 64 wide: each vector is one row in each text encoder")
    assert create_hints.init_text_hints("red robot", 0, "pool", {"default": 768}) == create_hints.init_text_hints(
        "red robot")  # one encoder: nothing to add


def test_real_shaped_file_loads_in_diffusers_sdxl_pipeline(demo_data, tmp_path, capsys):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    backend = embedded_default("tiny-sdxl-real", device="cpu")
    path = fresh(backend, tmp_path / "emb", name="robo-ti")
    run(backend, path, demo_data, tmp_path, quick(max_steps=2))
    state = load_file(path)
    assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}

    # The user's own pipeline: fresh copies of the text encoders (with our splice wrapper on their token tables:
    # diffusers resizes those), the rest shared with the backend.
    pipe = StableDiffusionXLPipeline(
        vae=backend.vae, text_encoder=copy.deepcopy(backend.text_encoder),
        text_encoder_2=copy.deepcopy(backend.text_encoder_2), tokenizer=offline_tokenizer(tmp_path / "tok"),
        tokenizer_2=offline_tokenizer(tmp_path / "tok", pad_token="!"), unet=backend.unet,
        scheduler=EulerDiscreteScheduler.from_config(backend.scheduler_config), add_watermarker=False,
    )
    assert pipe.tokenizer("red robot").input_ids == [49406, *tokens.token_ids("red robot"), 49407]
    # diffusers' documented SDXL recipe for A1111-style files
    pipe.load_textual_inversion(state["clip_g"], token="robo-ti", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state["clip_l"], token="robo-ti", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)

    for key, tok, enc in (("clip_l", pipe.tokenizer, pipe.text_encoder),
                          ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok.convert_tokens_to_ids(["robo-ti", "robo-ti_1"])  # diffusers' names for a 2-vector token
        assert min(ids) >= 49408, (key, ids)  # added tokens, not vocabulary words
        assert torch.equal(enc.get_input_embeddings().weight[ids].detach(), state[key]), key
    for tok in (pipe.tokenizer, pipe.tokenizer_2):  # the pipeline's prompt reaches both encoders' new rows
        prompt = pipe.maybe_convert_prompt("a photo of robo-ti", tok)
        assert tok(prompt).input_ids[4:6] == tok.convert_tokens_to_ids(["robo-ti", "robo-ti_1"])
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of robo-ti", num_inference_steps=2, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert image.size == (64, 64)

    # The diffusers pair (as diffusers' SDXL script saves: learned_embeds + learned_embeds_2), one file per encoder
    # holding only {token: vectors}, the single-key layout `load_textual_inversion` takes file by file. (Not loaded
    # into the pipeline again: each load resizes a 49408-row table, the bulk of this test's time.)
    pair = tmp_path / "pair" / "learned_embeds.safetensors"
    assert main(["convert", str(path), str(pair), "--format", "diffusers-sdxl-pair", "--name", "robo-pair"]) == 0
    assert "learned_embeds_2.safetensors" in capsys.readouterr().out
    for key, file in (("clip_l", pair), ("clip_g", pair.with_name("learned_embeds_2.safetensors"))):
        half = load_file(file)
        assert list(half) == ["robo-pair"] and torch.equal(half["robo-pair"], state[key]), key
    back = formats.load_embedding(pair)  # and our reader joins the pair into one SDXL embedding again
    assert back.format == "diffusers-sdxl-pair" and back.embedding.dims == {"clip_l": 768, "clip_g": 1280}
