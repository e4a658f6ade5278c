"""The standalone backend on tiny random models: splice, loss, session, preview, single-file loading."""

from __future__ import annotations

import builtins
import copy
import hashlib
import pickle
from dataclasses import replace
from pathlib import Path

import _ldm_layout as ldm
import pytest
import safetensors.torch
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from textual_inversion_ext.backends.standalone import StandaloneBackend, embedded_default, load_checkpoint, splice
from textual_inversion_ext.backends.standalone.embedded import embedded_config
from textual_inversion_ext.backends.standalone.models import build_random, model_config
from textual_inversion_ext.core.backend import Backend, TrainingOptions
from textual_inversion_ext.core.embedding import SINGLE
from textual_inversion_ext.core.errors import ModelError
from textual_inversion_ext.core.tokens import token_ids

TRIGGER = "my-bmw"  # several CLIP tokens


@pytest.fixture(scope="module")
def tiny() -> StandaloneBackend:
    return embedded_default()


def _vectors(backend: StandaloneBackend, n: int = 2, seed: int = 0, grad: bool = False
             ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, backend.embedding_dim, generator=g) * 0.5
    return {SINGLE: v.requires_grad_(grad)}


def _plain(backend: StandaloneBackend, prompt: str) -> torch.Tensor:
    """The text encoder on hand-made ids: BOS, tokens, EOS, EOS padding (SD1)."""
    ids = [splice.BOS, *token_ids(prompt), splice.EOS]
    ids += [splice.EOS] * (77 - len(ids))
    with torch.no_grad():
        return backend.text_encoder(torch.tensor([ids])).last_hidden_state


def _state(backend: StandaloneBackend) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(backend, name).state_dict().items()}


# ------------------------------------------------------------------- embedded default


def test_embedded_default_is_deterministic_per_seed(tiny: StandaloneBackend) -> None:
    again, other = embedded_default(seed=0), embedded_default(seed=1)
    a, b, c = _state(tiny), _state(again), _state(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert tiny.info.short_hash == again.info.short_hash != other.info.short_hash
    assert len(tiny.info.short_hash or "") == 10


def test_embedded_default_info(tiny: StandaloneBackend) -> None:
    assert isinstance(tiny, Backend)
    info = tiny.info
    assert (info.family, info.resolution, info.prediction, info.vae_scale) == ("sd1", 128, "epsilon", 8)
    assert info.encoders == {SINGLE: 64}
    assert tiny.text_encoder.config.vocab_size == 49408
    assert tiny.text_encoder.config.max_position_embeddings == 77
    assert tiny.num_train_timesteps == 1000
    assert embedded_config("tiny-real-clip").text_encoder["hidden_size"] == 768


def test_token_rows_are_detached_float32_table_rows(tiny: StandaloneBackend) -> None:
    ids = token_ids("a red car")
    rows = tiny.token_rows(ids)[SINGLE]
    assert rows.shape == (len(ids), 64) and rows.dtype == torch.float32 and not rows.requires_grad
    table = tiny.text_encoder.get_input_embeddings().weight
    assert torch.equal(rows, table[ids].detach())
    rows.add_(1)  # a copy: the model is untouched
    assert not torch.equal(rows, table[ids].detach())


# --------------------------------------------------------------------------- encode_text


def test_prompt_without_trigger_is_the_plain_encoder(tiny: StandaloneBackend) -> None:
    prompt = "a photo of a red car, detailed"
    expected = _plain(tiny, prompt)
    assert torch.equal(tiny.encode_text([prompt], TRIGGER, _vectors(tiny)), expected)
    assert torch.equal(tiny.encode_text([prompt], TRIGGER, {}), expected)


def test_splice_with_token_rows_reproduces_the_words(tiny: StandaloneBackend) -> None:
    # Vectors equal to the rows of "red car" must encode exactly like the words themselves.
    rows = tiny.token_rows(token_ids("red car"))
    assert len(token_ids(TRIGGER)) > 1 and rows[SINGLE].shape[0] == 2
    with torch.no_grad():
        got = tiny.encode_text([f"a {TRIGGER} by a {TRIGGER}"], TRIGGER, rows)
    torch.testing.assert_close(got, _plain(tiny, "a red car by a red car"), rtol=0, atol=1e-6)


def test_splice_slots_for_repeated_multi_token_trigger() -> None:
    p = splice.prompt_ids(f"{TRIGGER} and {TRIGGER}", TRIGGER, 3, splice.EOS)
    assert len(p.ids) == len(p.slots) == 77
    assert p.ids[0] == splice.BOS and [s for s in p.slots if s >= 0] == [0, 1, 2, 0, 1, 2]
    assert p.ids[p.ids.index(splice.EOS, 1)] == splice.EOS and p.truncated == 0
    assert splice.prompt_ids("x", "", 3, 0).ids[3:] == (0,) * 74  # SD2 pads with 0


def test_encode_text_gradient_and_dependence_on_vectors(tiny: StandaloneBackend) -> None:
    vec = _vectors(tiny, n=3, grad=True)
    prompts = [f"a photo of {TRIGGER}", f"{TRIGGER} next to {TRIGGER}"]
    cond = tiny.encode_text(prompts, TRIGGER, vec)
    assert cond.shape == (2, 77, 64)
    cond.pow(2).sum().backward()
    grad = vec[SINGLE].grad
    assert grad is not None and torch.isfinite(grad).all() and (grad.abs().sum(dim=1) > 0).all()
    with torch.no_grad():
        other = tiny.encode_text(prompts, TRIGGER, _vectors(tiny, n=3, seed=1))
        twice = tiny.encode_text([f"{TRIGGER} next to a car"], TRIGGER, vec)
    assert not torch.allclose(cond, other)
    assert not torch.allclose(cond[1], twice[0])


def test_fp16_model_takes_fp32_vectors(tiny: StandaloneBackend) -> None:
    half = copy.deepcopy(tiny.text_encoder).half()
    emb = splice.install(half)
    vec = _vectors(tiny, grad=True)
    ids, slots, _ = splice.batch_ids([f"a {TRIGGER}"], TRIGGER, 2, splice.EOS, torch.device("cpu"))
    with emb.splicing(slots, vec[SINGLE]):
        out = half(ids).last_hidden_state
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert vec[SINGLE].grad is not None and vec[SINGLE].grad.dtype == torch.float32


def test_wrong_vector_width_is_a_model_error(tiny: StandaloneBackend) -> None:
    with pytest.raises(ModelError, match="needs"):
        tiny.encode_text(["x"], "x", {SINGLE: torch.zeros(1, 768)})
    with pytest.raises(ModelError, match="clip_l"):
        tiny.encode_text(["x"], "x", {"clip_l": torch.zeros(1, 64), "clip_g": torch.zeros(1, 64)})


# ------------------------------------------------------------------ loss and session


def _batch(backend: StandaloneBackend, n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(n, 3, 64, 64, generator=g) * 2 - 1
    latents = backend.encode_images(pixels).mean
    return latents, torch.randn(latents.shape, generator=g), torch.tensor([10, 900][:n])


def test_encode_images_scaled_latents(tiny: StandaloneBackend) -> None:
    dist = tiny.encode_images(torch.zeros(2, 3, 64, 64))
    assert dist.mean.shape == dist.std.shape == (2, 4, 8, 8)
    assert not dist.mean.requires_grad and (dist.std >= 0).all()


def test_training_loss_reaches_only_the_vectors(tiny: StandaloneBackend) -> None:
    latents, noise, t = _batch(tiny)
    vec = _vectors(tiny, grad=True)
    modules = (tiny.unet, tiny.vae, tiny.text_encoder)
    before = [p.requires_grad for m in modules for p in m.parameters()]
    assert not any(before)  # frozen at load: a gradient computed outside a session cannot land on a weight
    with tiny.training_session(TrainingOptions()):
        cond = tiny.encode_text([f"a photo of {TRIGGER}"] * 2, TRIGGER, vec)
        loss = tiny.training_loss(latents, cond, noise, t)
        assert loss.shape == (2,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()
        loss.mean().backward()
        assert all(p.grad is None for m in modules for p in m.parameters())
    assert torch.isfinite(vec[SINGLE].grad).all() and vec[SINGLE].grad.abs().sum() > 0
    assert [p.requires_grad for m in modules for p in m.parameters()] == before


def test_session_applies_options_and_restores_on_error(tiny: StandaloneBackend) -> None:
    tiny.unet.set_attn_processor(AttnProcessor())
    modules = (tiny.unet, tiny.vae, tiny.text_encoder)
    options = TrainingOptions(gradient_checkpointing=True, attention_optimizations=True, offload_vae=True)
    tiny.vae.requires_grad_(True)  # a caller's flag the session must put back
    with pytest.raises(RuntimeError, match="boom"), tiny.training_session(options):
        assert tiny.unet.is_gradient_checkpointing
        assert all(isinstance(p, AttnProcessor2_0) for p in tiny.unet.attn_processors.values())
        assert not any(p.requires_grad for m in modules for p in m.parameters())
        raise RuntimeError("boom")
    assert not tiny.unet.is_gradient_checkpointing
    assert all(type(p) is AttnProcessor for p in tiny.unet.attn_processors.values())
    assert all(p.requires_grad for p in tiny.vae.parameters())
    assert not any(p.requires_grad for m in (tiny.unet, tiny.text_encoder) for p in m.parameters())
    tiny.vae.requires_grad_(False)
    assert tiny._vae_home is None


def test_gradient_checkpointing_gives_the_same_gradient(tiny: StandaloneBackend) -> None:
    latents, noise, t = _batch(tiny, n=1)
    grads = []
    for ckpt in (False, True):
        vec = _vectors(tiny, grad=True)
        with tiny.training_session(TrainingOptions(gradient_checkpointing=ckpt)):
            cond = tiny.encode_text([TRIGGER], TRIGGER, vec)
            tiny.training_loss(latents, cond, noise, t).sum().backward()
        grads.append(vec[SINGLE].grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_v_prediction_target(tiny: StandaloneBackend) -> None:
    v_backend = StandaloneBackend(
        tiny.unet, tiny.vae, tiny.text_encoder, {**tiny.scheduler_config, "prediction_type": "v_prediction"},
        replace(tiny.info, prediction="v_prediction"),
    )
    latents, noise, t = _batch(tiny)
    with torch.no_grad():
        cond = tiny.encode_text(["a car"] * 2, TRIGGER, {})
        loss = v_backend.training_loss(latents, cond, noise, t)
        eps_loss = tiny.training_loss(latents, cond, noise, t)
        acp = v_backend.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = acp.sqrt() * latents + (1 - acp).sqrt() * noise
        pred = tiny.unet(noisy, t, encoder_hidden_states=cond).sample
        velocity = acp.sqrt() * noise - (1 - acp).sqrt() * latents
    torch.testing.assert_close(loss, (pred - velocity).pow(2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(eps_loss, (pred - noise).pow(2).mean(dim=(1, 2, 3)))


# ------------------------------------------------------------------------------ preview


def test_preview_is_reproducible_and_uses_the_vectors(tiny: StandaloneBackend) -> None:
    kwargs = {"seed": 7, "steps": 3, "width": 64, "height": 48, "cfg_scale": 4.0, "negative_prompt": "blurry"}
    vec = _vectors(tiny, grad=True)
    rng = torch.get_rng_state()
    with tiny.training_session(TrainingOptions(offload_vae=True)):
        a = tiny.preview(f"a photo of {TRIGGER}", TRIGGER, vec, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng) and vec[SINGLE].grad is None
    b = tiny.preview(f"a photo of {TRIGGER}", TRIGGER, vec, **kwargs)
    c = tiny.preview(f"a photo of {TRIGGER}", TRIGGER, _vectors(tiny, seed=5), **kwargs)
    assert a.size == (64, 48) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny.preview("x", TRIGGER, vec, **{**kwargs, "width": 60})


# ------------------------------------------------------------------ single-file loading


def _sd2_config() -> dict:
    cfg = embedded_config("tiny").to_dict()
    cfg["family"] = "sd2"
    cfg["unet"].update(use_linear_projection=True, attention_head_dim=[2, 4], upcast_attention=True)
    cfg["text_encoder"]["hidden_act"] = "gelu"
    return cfg


def _write(state: dict[str, torch.Tensor], path: Path) -> Path:
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    return path


def _ldm_state(unet, vae, text_encoder, cfg: dict, family: str) -> dict[str, torch.Tensor]:
    text = ldm.clip_to_ldm(text_encoder) if family == "sd1" else ldm.open_clip_to_ldm(text_encoder)
    return {
        **ldm.unet_to_ldm(unet.state_dict(), cfg["unet"]),
        **ldm.vae_to_ldm(vae.state_dict(), cfg["vae"]),
        **text,
    }


def _assert_same_model(a: StandaloneBackend, b: StandaloneBackend) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 77, a.embedding_dim, generator=g)
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(b.unet(x, 500, encoder_hidden_states=cond).sample,
                                   a.unet(x, 500, encoder_hidden_states=cond).sample)
        torch.testing.assert_close(b.vae.decode(x).sample, a.vae.decode(x).sample)
        torch.testing.assert_close(b.encode_images(pixels).mean, a.encode_images(pixels).mean)
        prompt = [f"a photo of {TRIGGER}"]
        vec = _vectors(a)
        torch.testing.assert_close(b.encode_text(prompt, TRIGGER, vec), a.encode_text(prompt, TRIGGER, vec))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_load_sd1_single_file(tiny: StandaloneBackend, tmp_path: Path, suffix: str) -> None:
    cfg = embedded_config("tiny").to_dict()
    path = _write(_ldm_state(tiny.unet, tiny.vae, tiny.text_encoder, cfg, "sd1"), tmp_path / f"my-sd{suffix}")
    loaded = load_checkpoint(path, config=cfg)
    assert (loaded.info.family, loaded.info.prediction, loaded.info.name) == ("sd1", "epsilon", "my-sd")
    assert loaded.info.short_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert loaded.pad_id == splice.EOS
    _assert_same_model(tiny, loaded)


def test_load_sd1_text_encoder_without_text_model_level(tiny: StandaloneBackend, tmp_path: Path) -> None:
    cfg = embedded_config("tiny").to_dict()
    state = _ldm_state(tiny.unet, tiny.vae, tiny.text_encoder, cfg, "sd1")
    state = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
    _assert_same_model(tiny, load_checkpoint(_write(state, tmp_path / "old.safetensors"), config=cfg))


def test_load_sd2_single_file(tmp_path: Path) -> None:
    cfg = _sd2_config()
    unet, vae, text_encoder = build_random(model_config(cfg), seed=4)
    path = _write(_ldm_state(unet, vae, text_encoder, cfg, "sd2"), tmp_path / "sd2-tiny.safetensors")
    loaded = load_checkpoint(path, config=cfg, prediction="v_prediction")
    assert loaded.info.family == "sd2" and loaded.info.prediction == "v_prediction"
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    assert loaded.pad_id == 0
    scheduler = {**cfg["scheduler"], "prediction_type": "v_prediction"}
    reference = StandaloneBackend(unet, vae, text_encoder, scheduler, loaded.info)
    _assert_same_model(reference, loaded)
    # The file's own yaml decides when no override is given (A1111 convention).
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_checkpoint(path, config=cfg).info.prediction == "v_prediction"


def test_config_that_does_not_fit_is_refused(tiny: StandaloneBackend, tmp_path: Path) -> None:
    cfg = embedded_config("tiny").to_dict()
    state = _ldm_state(tiny.unet, tiny.vae, tiny.text_encoder, cfg, "sd1")
    path = _write(state, tmp_path / "tiny.safetensors")
    with pytest.raises(ModelError, match="does not fit"):
        load_checkpoint(path)  # the bundled full-size SD1 config
    with pytest.raises(ModelError, match="SD1"):
        load_checkpoint(path, family="sd2", config=cfg)


def test_partial_sdxl_and_unknown_layouts_are_refused(tmp_path: Path) -> None:
    w = torch.zeros(2, 2)
    half_xl = _write({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": w,
                      "model.diffusion_model.input_blocks.0.0.weight": w.clone()}, tmp_path / "xl.safetensors")
    with pytest.raises(ModelError, match=r"no clip_g .* not a complete SDXL base checkpoint"):
        load_checkpoint(half_xl)
    diffusers_unet = _write({"down_blocks.0.resnets.0.conv1.weight": w}, tmp_path / "unet.safetensors")
    with pytest.raises(ModelError, match=r"not a complete SD1\.x/SD2\.x/SDXL checkpoint"):
        load_checkpoint(diffusers_unet)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_ckpt_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    with pytest.raises(ModelError, match="safetensors") as info:
        load_checkpoint(path)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()
