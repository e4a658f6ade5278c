"""Single-file SDXL checkpoints in the standalone backend: a tiny SDXL-shaped file in the real sgm/A1111
key layout loads offline (a true round trip), trains, and refiner / inpainting files are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import _ldm_sdxl as xl
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from textual_inversion_ext.backends.standalone import load_checkpoint
from textual_inversion_ext.backends.standalone.models import build_random, build_random_text_encoder_2, model_config
from textual_inversion_ext.backends.standalone.sdxl import StandaloneSDXLBackend
from textual_inversion_ext.core import formats
from textual_inversion_ext.core.create import CreateParams, create_embedding
from textual_inversion_ext.core.errors import ModelError
from textual_inversion_ext.core.training.run import RunRequest, run_training
from textual_inversion_ext.core.training.train_params import TrainParams

_TEXT = {"attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "initializer_range": 0.02,
         "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 4, "num_hidden_layers": 2,
         "pad_token_id": 1, "vocab_size": 49408}
# SDXL's structure at tiny widths: no attention at the first level, 2 resnets per level, several transformer
# layers in the last, size conditioning ("text_time"); clip_g's projection (40) differs from its width (48)
# so a missing transpose of OpenCLIP's text_projection cannot go unnoticed.
CONFIG = {
    "family": "sdxl",
    "resolution": 64,
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "attention_head_dim": [2, 2, 4],
        "block_out_channels": [16, 32, 32],
        "cross_attention_dim": 32 + 48,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "in_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 40 + 6 * 8,
        "sample_size": 16,
        "transformer_layers_per_block": [1, 1, 2],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "force_upcast": True,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.13025,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
    },
    "text_encoder": {**_TEXT, "hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64,
                     "projection_dim": 32},
    "text_encoder_2": {**_TEXT, "hidden_act": "gelu", "hidden_size": 48, "intermediate_size": 96,
                       "projection_dim": 40},
    "scheduler": {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
                  "steps_offset": 1, "timestep_spacing": "leading"},
}
NAMES = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def source() -> dict[str, torch.nn.Module]:
    cfg = model_config(CONFIG)
    unet, vae, text_encoder = build_random(cfg, seed=11)
    return dict(zip(NAMES, (unet, vae, text_encoder, build_random_text_encoder_2(cfg, seed=11))))


@pytest.fixture(scope="module")
def ldm_state(source) -> dict[str, torch.Tensor]:
    return xl.sdxl_to_ldm(*(source[n] for n in NAMES), CONFIG)


def _write(state: dict[str, torch.Tensor], path: Path) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def sdxl_file(ldm_state, tmp_path_factory) -> Path:
    return _write(ldm_state, tmp_path_factory.mktemp("sdxl") / "tiny-xl.safetensors")


@pytest.fixture(scope="module")
def loaded(sdxl_file) -> StandaloneSDXLBackend:
    return load_checkpoint(sdxl_file, config=CONFIG)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def test_sdxl_file_has_the_real_key_layout(ldm_state) -> None:
    keys = set(ldm_state)
    assert {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.ln_final.bias",
            "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.8.1.transformer_blocks.1"
            ".attn2.to_k.weight", "model.diffusion_model.output_blocks.2.2.conv.weight",
            "first_stage_model.decoder.up.2.upsample.conv.weight"} <= keys
    assert all(k.split(".")[0] in ("model", "first_stage_model", "conditioner") for k in keys)


def test_load_sdxl_single_file_is_a_true_round_trip(source, loaded, sdxl_file) -> None:
    assert isinstance(loaded, StandaloneSDXLBackend)
    info = loaded.info
    assert (info.family, info.prediction, info.resolution, info.name) == ("sdxl", "epsilon", 64, "tiny-xl")
    assert info.encoders == {"clip_l": 32, "clip_g": 48} and info.vae_scale == 4
    assert isinstance(loaded.text_encoder, CLIPTextModel)
    assert isinstance(loaded.text_encoder_2, CLIPTextModelWithProjection)
    for name in NAMES:
        want, got = _weights(source[name]), _weights(getattr(loaded, name))
        assert got.keys() == want.keys(), name
        different = [k for k in want if not torch.equal(got[k], want[k])]
        assert not different, f"{name}: {different[:5]}"
    assert loaded.noise_scheduler.config.prediction_type == "epsilon"


def test_sdxl_vae_stays_float32_and_family_is_checked(sdxl_file) -> None:
    half = load_checkpoint(sdxl_file, config=CONFIG, dtype=torch.bfloat16, family="sdxl")
    assert half.unet.dtype == half.text_encoder.dtype == half.text_encoder_2.dtype == torch.bfloat16
    assert half.vae.dtype == torch.float32
    with pytest.raises(ModelError, match="SDXL, not SD1"):
        load_checkpoint(sdxl_file, config=CONFIG, family="sd1")


def test_v_pred_key_makes_a_v_prediction_sdxl(ldm_state, tmp_path) -> None:
    path = _write({**ldm_state, "v_pred": torch.tensor([])}, tmp_path / "xl-v.safetensors")
    backend = load_checkpoint(path, config=CONFIG)
    assert backend.info.prediction == backend.noise_scheduler.config.prediction_type == "v_prediction"


def test_loaded_sdxl_trains(loaded, demo_data, tmp_path) -> None:
    emb = create_embedding(loaded, CreateParams(name="xl-toy", init_text="red robot", overwrite=True), tmp_path).path
    before = formats.load_embedding(emb).embedding.vectors
    params = TrainParams(max_steps=5, save_every=0, preview_every=0, csv_every=1, learn_rate="0.01", seed=5,
                         comparison_grid=False, val_every=0)
    out = run_training(loaded, RunRequest(emb, demo_data, tmp_path / "logs", params))
    after = formats.load_embedding(emb).embedding
    assert out.result.status == "finished" and after.step == 5
    for key in ("clip_l", "clip_g"):
        assert torch.isfinite(after.vectors[key]).all() and not torch.equal(before[key], after.vectors[key])
    for name in NAMES:
        assert all(p.grad is None for p in getattr(loaded, name).parameters())


def test_refiner_is_refused_with_a_pointer_to_the_base_model(source, ldm_state, tmp_path) -> None:
    refiner = {k: v for k, v in ldm_state.items() if not k.startswith("conditioner.")}
    refiner.update(xl.clip_g_to_ldm(source["text_encoder_2"], prefix=xl.REFINER_G))
    path = _write(refiner, tmp_path / "refiner.safetensors")
    with pytest.raises(ModelError, match="SDXL refiner") as refused:
        load_checkpoint(path)
    assert "base model" in str(refused.value) and "clip_g" in str(refused.value)


def test_inpainting_sdxl_is_refused(ldm_state, tmp_path) -> None:
    state = dict(ldm_state)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.zeros(state[key].shape[0], 9, *state[key].shape[2:])
    with pytest.raises(ModelError, match=r"9 input channels.*SDXL inpainting"):
        load_checkpoint(_write(state, tmp_path / "xl-inpaint.safetensors"), config=CONFIG)


def test_half_an_sdxl_conditioner_or_a_wrong_clip_g_is_refused(ldm_state, tmp_path) -> None:
    no_g = {k: v for k, v in ldm_state.items() if not k.startswith(xl.CLIP_G)}
    with pytest.raises(ModelError, match="no clip_g"):
        load_checkpoint(_write(no_g, tmp_path / "no-g.safetensors"), config=CONFIG)
    wider = copy.deepcopy(CONFIG)
    wider["text_encoder_2"].update(hidden_size=64, intermediate_size=128)
    with pytest.raises(ModelError, match="clip_g"):
        load_checkpoint(_write(ldm_state, tmp_path / "xl.safetensors"), config=wider)


def test_bundled_sdxl_config_has_sdxl_base_parameter_counts() -> None:
    cfg = model_config("sdxl")
    assert (cfg.family, cfg.resolution, cfg.vae["scaling_factor"]) == ("sdxl", 1024, 0.13025)
    with torch.device("meta"):  # counts without allocating ~3.5 B weights
        modules = (UNet2DConditionModel.from_config(cfg.unet), AutoencoderKL.from_config(cfg.vae),
                   CLIPTextModel(CLIPTextConfig(**cfg.text_encoder)),
                   CLIPTextModelWithProjection(CLIPTextConfig(**cfg.text_encoder_2)))
    counts = [sum(p.numel() for p in m.parameters()) for m in modules]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]
    unet = modules[0].config
    assert unet.cross_attention_dim == cfg.text_encoder["hidden_size"] + cfg.text_encoder_2["hidden_size"]
    assert unet.projection_class_embeddings_input_dim == (
        cfg.text_encoder_2["projection_dim"] + 6 * unet.addition_time_embed_dim)
