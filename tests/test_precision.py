"""Precision decided once (issue 12 point 4): the decision table, refusals before any work, the record in
run.json, half weights with fp32 vectors, and an fp16 resume that continues the GradScaler's state."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _linear_backend import LinearBackend

from textual_inversion_ext.core import formats
from textual_inversion_ext.core.create import CreateParams, create_embedding
from textual_inversion_ext.core.params import ParameterError
from textual_inversion_ext.core.training.precision import resolve_precision
from textual_inversion_ext.core.training.run import RunRequest, run_training
from textual_inversion_ext.core.training.train_params import TrainParams
from textual_inversion_ext.demo import make_sample_dataset

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _model(weights: torch.dtype, device: str = "cuda") -> SimpleNamespace:
    return SimpleNamespace(weight_dtype=weights, device=torch.device(device))


@pytest.mark.parametrize(("weights", "requested", "autocast", "scaler"), [
    (F16, "auto", F16, True), (F16, "fp16", F16, True),
    (BF16, "auto", BF16, False), (BF16, "bf16", BF16, False),
    (F32, "auto", None, False), (F32, "fp32", None, False),
    (F32, "fp16", F16, True), (F32, "bf16", BF16, False),  # half compute over fp32 weights: torch's AMP
])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_autocast_follows_the_weights(monkeypatch, weights, requested, autocast, scaler, device):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    precision = resolve_precision(TrainParams(precision=requested), _model(weights, device))
    assert (precision.autocast, precision.grad_scaler, precision.weights) == (autocast, scaler, weights)


@pytest.mark.parametrize(("weights", "requested", "message"), [
    (F16, "fp32", r"loaded in fp16: choose precision auto or fp16, or load it in fp32 \(web UI: --no-half; "
                  r"standalone: --dtype fp32\)"),
    (F16, "bf16", r"loaded in fp16: choose precision auto or fp16, or load it in bf16 \(standalone: --dtype bf16\)"),
    (BF16, "fp16", r"loaded in bf16: choose precision auto or bf16, or load it in fp16"),
    (BF16, "fp32", r"loaded in bf16: .*--no-half"),
    (torch.float64, "auto", r"weights are torch.float64; training supports models loaded in fp32, fp16 or bf16"),
])
def test_conflicting_choices_are_refused_with_the_way_out(weights, requested, message):
    with pytest.raises(ParameterError, match=message):
        resolve_precision(TrainParams(precision=requested), _model(weights))


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ParameterError, match="no bf16 support; choose fp16 or auto"):
        resolve_precision(TrainParams(precision="bf16"), _model(F32))
    assert resolve_precision(TrainParams(precision="bf16"), _model(F32, "cpu")).autocast == BF16  # CPU autocast


# ----------------------------------------------------------------- in a run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("precision-data")
    make_sample_dataset(folder, size=64, seed=0)
    return folder


def _params(**kw) -> TrainParams:
    base = dict(max_steps=2, save_every=0, preview_every=0, csv_every=0, val_every=0, learn_rate="0.01", seed=5,
                comparison_grid=False, resolution=64)
    return TrainParams(**{**base, **kw})


def _run(backend, emb: Path, data: Path, logs: Path, p: TrainParams):
    return run_training(backend, RunRequest(emb, data, logs, p))


def _embedding(backend, folder: Path) -> Path:
    return create_embedding(backend, CreateParams(name="toy", init_text="red robot", overwrite=True), folder).path


class _HalfLinear(LinearBackend):
    """Claims fp16 weights: enough for a decision made before any compute."""

    weight_dtype = torch.float16


def test_a_conflict_is_refused_before_any_work(data, tmp_path):
    backend = _HalfLinear()
    emb = _embedding(backend, tmp_path)
    with pytest.raises(ParameterError, match="loaded in fp16"):
        _run(backend, emb, data, tmp_path / "logs", _params(precision="fp32"))
    assert not (tmp_path / "logs").exists()  # no log folder, nothing encoded


def test_the_decision_is_recorded_in_run_json(data, tmp_path):
    backend = LinearBackend()
    out = _run(backend, _embedding(backend, tmp_path), data, tmp_path / "logs", _params(precision="bf16"))
    record = json.loads(out.record_path.read_text("utf-8"))
    assert record["precision"] == {"requested": "bf16", "weights": "fp32", "autocast": "bf16", "grad_scaler": False}
    assert record["params"]["precision"] == "bf16"


@pytest.mark.parametrize("weights", [BF16, F16])
def test_half_weights_keep_the_vectors_and_their_gradient_fp32(weights):
    """The standalone splice mixes an fp32 vector into a half table by casting at use; autocast (as resolved)
    runs the half model; the gradient reaching the vector is fp32 and finite."""
    from textual_inversion_ext.backends.standalone import embedded_default

    backend = embedded_default("tiny", dtype=weights)
    assert backend.weight_dtype == weights
    assert all(p.dtype == weights for m in (backend.unet, backend.vae, backend.text_encoder) for p in m.parameters())
    precision = resolve_precision(TrainParams(), backend)
    assert precision.autocast == weights
    vec = torch.randn(2, backend.embedding_dim, generator=torch.Generator().manual_seed(0)).mul_(0.01)
    vec.requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    with torch.autocast("cpu", dtype=precision.autocast):
        cond = backend.encode_text(["a photo of toy"], "toy", {"default": vec})
        loss = backend.training_loss(latents, cond, noise, torch.tensor([500])).mean()
    loss.float().backward()
    assert vec.grad is not None and vec.grad.dtype == torch.float32
    assert torch.isfinite(vec.grad).all() and vec.grad.abs().sum() > 0


# ----------------------------------------------------------------- fp16 resume


class _LoudLinear(LinearBackend):
    """A loss 100× larger: its fp16 gradients overflow at the GradScaler's initial scale (2**16), so the first
    steps are skipped while the scale halves, as in real fp16 runs. (CPU autocast; torch's CPU GradScaler.)"""

    def training_loss(self, *args, **kwargs):
        return super().training_loss(*args, **kwargs) * 100


def _scaler_state(path: Path) -> dict:
    return torch.load(formats.optim_path(path), weights_only=True)["scaler_state_dict"]


def test_fp16_resume_is_step_exact_with_the_grad_scaler(data, tmp_path):
    backend = _LoudLinear()
    straight = _embedding(backend, tmp_path / "a")
    _run(backend, straight, data, tmp_path / "a" / "logs", _params(max_steps=8, precision="fp16"))
    halves = _embedding(backend, tmp_path / "b")
    _run(backend, halves, data, tmp_path / "b" / "logs", _params(max_steps=4, precision="fp16"))
    assert _scaler_state(halves)["scale"] < 2.0**16  # steps were skipped: the state a fresh scaler would lose
    _run(backend, halves, data, tmp_path / "b" / "logs", _params(max_steps=8, precision="fp16"))
    torch.testing.assert_close(formats.load_embedding(halves).embedding.single(),
                               formats.load_embedding(straight).embedding.single(), rtol=0, atol=0)
    assert _scaler_state(halves) == _scaler_state(straight)
