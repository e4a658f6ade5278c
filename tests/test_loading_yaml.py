"""A single-file checkpoint whose architecture is described by the ldm/sgm `.yaml` beside it (A1111's rule).

Tiny SDXL (sgm yaml) and SD1 (ldm yaml) files whose UNet/VAE are far from the bundled configs: with the
yaml they load as a weight-exact round trip, without it (or with a yaml that only sets the prediction)
the bundled architecture is used and refuses them. The bundled text encoders (real CLIP sizes) are
swapped for tiny ones here, since a yaml names its text encoders rather than describing them.
"""

from __future__ import annotations

from pathlib import Path

import _ldm_layout as ldm
import _ldm_sdxl as xl
import pytest
import safetensors.torch
import torch

from textual_inversion_ext.backends.standalone import load_checkpoint, loading
from textual_inversion_ext.backends.standalone.models import build_random, build_random_text_encoder_2, model_config
from textual_inversion_ext.core.errors import ModelError

_TEXT = {"attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "initializer_range": 0.02,
         "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 4, "num_hidden_layers": 1,
         "pad_token_id": 1, "vocab_size": 49408}
CLIP_L = {**_TEXT, "hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32}
CLIP_G = {**_TEXT, "hidden_act": "gelu", "hidden_size": 48, "intermediate_size": 96, "projection_dim": 40}
# ldm/sgm always use 32 GroupNorm groups, hence channels of 32/64; heads of 16 channels.
_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4, "layers_per_block": 1,
        "norm_num_groups": 32, "scaling_factor": 0.5}
_UNET = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "layers_per_block": 1,
         "in_channels": 4, "out_channels": 4, "norm_num_groups": 32}
XL = {
    "family": "sdxl", "resolution": 64,
    "unet": {**_UNET, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [2, 4],
             "transformer_layers_per_block": [1, 1], "use_linear_projection": True, "cross_attention_dim": 32 + 48,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 40 + 6 * 8},
    "vae": {**_VAE, "force_upcast": True},
    "text_encoder": CLIP_L, "text_encoder_2": CLIP_G,
    "scheduler": model_config("sdxl").scheduler,
}
SD1 = {
    "family": "sd1", "resolution": 64,
    "unet": {**_UNET, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 4,
             "cross_attention_dim": 32},
    "vae": _VAE, "text_encoder": CLIP_L,
    "scheduler": {**model_config("sd1").scheduler, "beta_end": 0.02},
}
_FIRST_STAGE = """
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        ddconfig: {double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 32,
                   ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}
"""
# As A1111's sd_xl_base.yaml / v1-inference.yaml, cut to what describes the architecture.
XL_YAML = """model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.5
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params: {adm_in_channels: 88, num_classes: sequential, in_channels: 4, out_channels: 4, model_channels: 32,
               attention_resolutions: [2], num_res_blocks: 1, channel_mult: [1, 2], num_head_channels: 16,
               use_spatial_transformer: true, use_linear_in_transformer: true, transformer_depth: [0, 1],
               context_dim: 80, legacy: false}
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - {input_key: txt, target: sgm.modules.encoders.modules.FrozenCLIPEmbedder}
          - {input_key: txt, target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2}
          - {input_key: original_size_as_tuple, target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND,
             params: {outdim: 8}}
""" + _FIRST_STAGE
SD1_YAML = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.02
    timesteps: 1000
    scale_factor: 0.5
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [1], num_res_blocks: 1,
               channel_mult: [1, 2], num_heads: 4, use_spatial_transformer: true, transformer_depth: 1,
               context_dim: 32, legacy: false}
""" + _FIRST_STAGE.replace("sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                           "ldm.models.autoencoder.AutoencoderKL")


@pytest.fixture(autouse=True)
def tiny_bundled_text_encoders(monkeypatch) -> None:
    """The bundled configs as shipped (full-size UNet/VAE), with tiny text encoders."""
    def bundled(source):
        cfg = model_config(source)
        if source in ("sd1", "sdxl"):
            cfg.text_encoder = CLIP_L
            cfg.text_encoder_2 = CLIP_G if source == "sdxl" else None
        return cfg
    monkeypatch.setattr(loading, "model_config", bundled)


def _source(config: dict) -> dict[str, torch.nn.Module]:
    cfg = model_config(config)
    unet, vae, text_encoder = build_random(cfg, seed=5)
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    if cfg.family == "sdxl":
        modules["text_encoder_2"] = build_random_text_encoder_2(cfg, seed=5)
    return modules


@pytest.fixture(scope="module")
def xl_source() -> dict[str, torch.nn.Module]:
    return _source(XL)


def _xl_state(source: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return xl.sdxl_to_ldm(*source.values(), XL)


def _write(state: dict[str, torch.Tensor], path: Path, yaml: str | None) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    if yaml is not None:
        path.with_suffix(".yaml").write_text(yaml)
    return path


def _assert_same_weights(source: dict[str, torch.nn.Module], loaded) -> None:
    for name, module in source.items():
        want = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        got = {k: v for k, v in getattr(loaded, name).state_dict().items() if not k.endswith("position_ids")}
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_sdxl_architecture_comes_from_the_sgm_yaml(xl_source, tmp_path) -> None:
    path = _write(_xl_state(xl_source), tmp_path / "tiny-xl.safetensors", XL_YAML)
    loaded = load_checkpoint(path)
    assert loaded.info.family == "sdxl" and loaded.info.vae_scale == 2
    _assert_same_weights(xl_source, loaded)
    assert loaded.vae.config.scaling_factor == 0.5  # the yaml's scale_factor, not SDXL's 0.13025
    # The size-conditioning width (outdim 8) is no weight shape: a forward shows the UNet got it.
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx = torch.randn(1, 3, 80)
    extra = {"text_embeds": torch.randn(1, 40), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        want = xl_source["unet"](x, t, encoder_hidden_states=ctx, added_cond_kwargs=extra).sample
        got = loaded.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=extra).sample
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("yaml", [None, 'model:\n  params:\n    parameterization: "v"\n'],
                         ids=["no-yaml", "prediction-only-yaml"])
def test_without_an_architecture_yaml_the_bundled_config_decides(xl_source, tmp_path, yaml) -> None:
    path = _write(_xl_state(xl_source), tmp_path / "tiny-xl.safetensors", yaml)
    with pytest.raises(ModelError, match="UNet"):
        load_checkpoint(path)


def test_explicit_config_wins_over_the_yaml_and_a_broken_yaml_is_named(xl_source, tmp_path) -> None:
    path = _write(_xl_state(xl_source), tmp_path / "tiny-xl.safetensors", "model: [unclosed\n")
    with pytest.raises(ModelError, match=r"tiny-xl\.yaml.*config="):
        load_checkpoint(path)
    _assert_same_weights(xl_source, load_checkpoint(path, config=XL))


def test_inpainting_stays_refused_when_its_yaml_says_9_channels(xl_source, tmp_path) -> None:
    state = _xl_state(xl_source)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.zeros(state[key].shape[0], 9, *state[key].shape[2:])
    yaml = XL_YAML.replace("in_channels: 4, out", "in_channels: 9, out")
    path = _write(state, tmp_path / "xl-inpaint.safetensors", yaml)
    with pytest.raises(ModelError, match="9 input channels"):
        load_checkpoint(path)


def test_sd1_architecture_and_schedule_come_from_the_ldm_yaml(tmp_path) -> None:
    source = _source(SD1)
    state = {**ldm.unet_to_ldm(source["unet"].state_dict(), SD1["unet"]),
             **ldm.vae_to_ldm(source["vae"].state_dict(), SD1["vae"]), **ldm.clip_to_ldm(source["text_encoder"])}
    path = _write(state, tmp_path / "tiny-sd1.safetensors", SD1_YAML)
    loaded = load_checkpoint(path)
    assert loaded.info.family == "sd1" and loaded.info.prediction == "epsilon"
    _assert_same_weights(source, loaded)
    assert loaded.noise_scheduler.config.beta_end == 0.02  # the yaml's linear_end, not SD1's 0.012
    assert loaded.vae.config.scaling_factor == 0.5
    with pytest.raises(ModelError, match="UNet"):
        load_checkpoint(_write(state, tmp_path / "no-yaml.safetensors", None))
