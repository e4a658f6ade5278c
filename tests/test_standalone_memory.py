"""The standalone backend's memory savings: the VAE freed during a CPU session and given back as it was, the
lean GEGLU (same gradients, less kept for the backward), the vocabulary norms read in chunks."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import _ldm_layout as ldm
import pytest
import safetensors.torch
import torch

from textual_inversion_ext.backends.standalone import StandaloneBackend, embedded_default, load_checkpoint
from textual_inversion_ext.backends.standalone.embedded import embedded_config
from textual_inversion_ext.backends.standalone.memory import lean_geglu
from textual_inversion_ext.core.backend import TrainingOptions
from textual_inversion_ext.core.embedding import SINGLE
from textual_inversion_ext.core.errors import ModelError
from textual_inversion_ext.core.tokens import VOCAB_SIZE
from textual_inversion_ext.core.training import health

TRIGGER = "my-bmw"
PREVIEW = {"seed": 3, "steps": 2, "width": 32, "height": 32, "cfg_scale": 3.0}


@pytest.fixture(scope="module")
def tiny() -> StandaloneBackend:
    return embedded_default()


def _vae_state(backend: StandaloneBackend) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backend.vae.state_dict().items()}


def _assert_vae(backend: StandaloneBackend, state: dict[str, torch.Tensor]) -> None:
    now = backend.vae.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) and now[k].dtype == v.dtype for k, v in state.items())


def _vectors(backend: StandaloneBackend, grad: bool = False) -> dict[str, torch.Tensor]:
    v = torch.randn(2, backend.embedding_dim, generator=torch.Generator().manual_seed(0)) * 0.5
    return {SINGLE: v.requires_grad_(grad)}


def test_cpu_session_frees_the_vae_and_gives_it_back(tiny: StandaloneBackend) -> None:
    before, params = _vae_state(tiny), list(tiny.vae.parameters())
    outside = tiny.preview(f"a {TRIGGER}", TRIGGER, _vectors(tiny), **PREVIEW)
    tiny.vae.requires_grad_(True)  # a caller's flag the session puts back
    with tiny.training_session(TrainingOptions()):
        assert all(p.numel() == 0 for p in tiny.vae.parameters())  # latents are cached: no weights held
        inside = tiny.preview(f"a {TRIGGER}", TRIGGER, _vectors(tiny), **PREVIEW)  # loaded for the preview...
        assert all(p.numel() == 0 for p in tiny.vae.parameters())  # ...and freed again
    assert list(tiny.vae.parameters()) == params and all(p.requires_grad for p in params)
    tiny.vae.requires_grad_(False)
    _assert_vae(tiny, before)
    assert inside.tobytes() == outside.tobytes()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_loaded_vae_comes_back_from_its_file(tiny: StandaloneBackend, tmp_path: Path, suffix: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    cfg = embedded_config("tiny").to_dict()
    state = {k: v.contiguous() for k, v in {**ldm.unet_to_ldm(tiny.unet.state_dict(), cfg["unet"]),
                                             **ldm.vae_to_ldm(tiny.vae.state_dict(), cfg["vae"]),
                                             **ldm.clip_to_ldm(tiny.text_encoder)}.items()}
    path = tmp_path / f"model{suffix}"
    save = (lambda s: safetensors.torch.save_file(s, str(path))) if suffix == ".safetensors" else \
        (lambda s: torch.save({"state_dict": s}, path))
    save(state)
    loaded = load_checkpoint(path, config=cfg)
    before = _vae_state(loaded)
    with loaded.training_session(TrainingOptions()):
        assert all(p.numel() == 0 for p in loaded.vae.parameters())
    _assert_vae(loaded, before)
    # A file replaced meanwhile is never read as this model's VAE: it stays freed, and using it says why.
    with caplog.at_level(logging.WARNING), loaded.training_session(TrainingOptions()):
        save({**state, "extra": torch.zeros(3)})
    assert "stays unloaded" in caplog.text
    with pytest.raises(ModelError, match="has changed since the model was loaded"):
        loaded.encode_images(torch.zeros(1, 3, 32, 32))


def test_lean_geglu_same_gradients_less_saved(tiny: StandaloneBackend) -> None:
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([100, 700])
    results = []
    for lean in (False, True):
        vec = _vectors(tiny, grad=True)
        saved: dict[int, int] = {}

        def pack(x: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
            if not isinstance(x, torch.nn.Parameter):
                saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
                lean_geglu(tiny.unet) if lean else contextlib.nullcontext():
            loss = tiny.training_loss(latents, tiny.encode_text([f"a {TRIGGER}"] * 2, TRIGGER, vec), noise, t)
        loss.sum().backward()
        results.append((loss.detach(), vec[SINGLE].grad, sum(saved.values())))
    with lean_geglu(tiny.unet) as switched:
        assert switched == sum(type(m).__name__ == "GEGLU" for m in tiny.unet.modules()) > 0
    assert not any("forward" in vars(m) for m in tiny.unet.modules())  # put back
    (loss_a, grad_a, saved_a), (loss_b, grad_b, saved_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b) and grad_a.abs().sum() > 0
    assert saved_b < saved_a


def test_vocabulary_norms_in_chunks_are_the_whole_tables_norms(tiny: StandaloneBackend) -> None:
    whole = health.vocabulary_median_norms(tiny, chunk=VOCAB_SIZE)
    assert health.vocabulary_median_norms(tiny, chunk=1000) == whole
    assert whole[SINGLE] > 0
