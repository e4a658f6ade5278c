from __future__ import annotations

import csv
import threading
from pathlib import Path

import pytest
import torch
from _faults import FaultyBackend
from torch.optim.optimizer import register_optimizer_step_pre_hook

from textual_inversion_ext.core import formats
from textual_inversion_ext.core.create import CreateParams, create_embedding
from textual_inversion_ext.core.data.dataset import TrainingSet
from textual_inversion_ext.core.embedding import Embedding
from textual_inversion_ext.core.errors import ModelError, TrainingError
from textual_inversion_ext.core.training.run import RunRequest, run_training
from textual_inversion_ext.core.training.train_params import TrainParams


def fresh_embedding(backend, folder: Path, name: str = "toy") -> Path:
    return create_embedding(backend, CreateParams(name=name, init_text="red robot", overwrite=True), folder).path


def params(**kw) -> TrainParams:
    base = dict(max_steps=12, save_every=0, preview_every=0, csv_every=1, learn_rate="0.01", seed=5,
                comparison_grid=False)
    base.update(kw)
    return TrainParams(**base)


def run(backend, emb: Path, data: Path, tmp: Path, p: TrainParams, **kw):
    return run_training(backend, RunRequest(emb, data, tmp / "logs", p), **kw)


def test_training_changes_vectors_writes_csv_and_snapshots(tiny_backend, demo_data, tmp_path):
    emb = fresh_embedding(tiny_backend, tmp_path)
    before = formats.load_embedding(emb).embedding
    out = run(tiny_backend, emb, demo_data, tmp_path, params(save_every=5))
    after = formats.load_embedding(emb).embedding
    assert out.result.status == "finished" and after.step == 12
    assert not torch.equal(before.single(), after.single())
    assert torch.isfinite(after.single()).all()
    rows = list(csv.reader(out.paths.loss_csv.open()))
    # A1111's five columns first, then ours (empty where not measured at that step)
    assert rows[0] == ["step", "epoch", "epoch_step", "loss", "learn_rate", "val_loss", "norm_ratio"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 13))
    assert all(float(r[6]) > 0 for r in rows[1:])
    assert [r[5] != "" for r in rows[1:]] == [step == 12 for step in range(1, 13)]  # val_every 50: the last step
    # snapshots are named by the exact step and hold that step (the host is off by one); step 0 = the start
    snaps = sorted(out.paths.snapshots.glob("toy-*.pt"))
    assert {s.name for s in snaps} >= {"toy-0.pt", "toy-5.pt", "toy-10.pt"}
    assert formats.load_embedding(out.paths.snapshots / "toy-10.pt").embedding.step == 10
    assert (out.paths.snapshots / "toy-10.pt.optim").exists()
    # the model stays frozen: no gradients on any weight
    for module in (tiny_backend.unet, tiny_backend.text_encoder, tiny_backend.vae):
        assert all(p.grad is None for p in module.parameters())


def test_resume_equals_uninterrupted_run(tiny_backend, demo_data, tmp_path):
    straight = fresh_embedding(tiny_backend, tmp_path / "a")
    run(tiny_backend, straight, demo_data, tmp_path / "a", params(max_steps=10))
    halves = fresh_embedding(tiny_backend, tmp_path / "b")
    run(tiny_backend, halves, demo_data, tmp_path / "b", params(max_steps=5))
    assert formats.load_embedding(halves).embedding.step == 5
    out = run(tiny_backend, halves, demo_data, tmp_path / "b", params(max_steps=10))
    a = formats.load_embedding(straight).embedding.single()
    b = formats.load_embedding(halves).embedding.single()
    assert out.result.step == 10
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_interrupt_saves_the_step_reached(tiny_backend, demo_data, tmp_path):
    emb = fresh_embedding(tiny_backend, tmp_path)
    stop = threading.Event()

    def on_progress(p):
        if p.step >= 4:
            stop.set()

    out = run(tiny_backend, emb, demo_data, tmp_path, params(), progress=on_progress, stop=stop)
    assert out.result.status == "interrupted"
    assert formats.load_embedding(emb).embedding.step == 4


def test_nan_guard_keeps_last_good_vectors(tiny_backend, demo_data, tmp_path):
    emb = fresh_embedding(tiny_backend, tmp_path)
    out = run(FaultyBackend(tiny_backend, bad_calls=range(7, 10**6), fault="nan"), emb, demo_data, tmp_path, params())
    saved = formats.load_embedding(emb).embedding
    assert out.result.status == "nan" and "step 7" in out.result.message
    assert saved.step == 6 and torch.isfinite(saved.single()).all()
    assert not formats.optim_path(emb).exists()  # the optimizer's moments are past the kept vectors


def test_error_inside_the_loop_saves_then_reports(tiny_backend, demo_data, tmp_path):
    emb = fresh_embedding(tiny_backend, tmp_path)
    with pytest.raises(TrainingError, match="injected failure") as info:
        run(FaultyBackend(tiny_backend, bad_calls=range(4, 10**6), fault="raise"), emb, demo_data, tmp_path, params())
    assert str(emb) in str(info.value)
    assert formats.load_embedding(emb).embedding.step == 3


def test_gradient_accumulation_and_clipping_run(tiny_backend, demo_data, tmp_path):
    emb = fresh_embedding(tiny_backend, tmp_path)
    out = run(tiny_backend, emb, demo_data, tmp_path,
              params(max_steps=3, batch_size=2, grad_accum=2, clip_grad_mode="norm", clip_grad_value="0.01",
                     flip_p=0.5, latent_sampling="random", shuffle_tags=True, tag_dropout=0.2))
    assert out.result.status == "finished" and out.result.step == 3
    rates = {row[4] for row in list(csv.reader(out.paths.loss_csv.open()))[1:]}
    assert rates == {str(0.01 * 2 * 2)}  # LR scaled by batch × accumulation


def test_already_trained_is_refused(tiny_backend, demo_data, tmp_path):
    emb = fresh_embedding(tiny_backend, tmp_path)
    run(tiny_backend, emb, demo_data, tmp_path, params(max_steps=2))
    with pytest.raises(TrainingError, match="already at step 2"):
        run(tiny_backend, emb, demo_data, tmp_path, params(max_steps=2))


def test_same_seed_same_vectors_other_seed_differs(tiny_backend, demo_data, tmp_path):
    results = []
    for folder, seed in (("a", 1), ("b", 1), ("c", 2)):
        emb = fresh_embedding(tiny_backend, tmp_path / folder)
        run(tiny_backend, emb, demo_data, tmp_path / folder, params(max_steps=4, seed=seed, flip_p=0.5))
        results.append(formats.load_embedding(emb).embedding.single())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def _pinned_runs(backend, data, tmp_path, monkeypatch) -> tuple[list[bool], torch.Tensor, torch.Tensor]:
    """(per call of TrainingSet.pin: were all cached latents pinned after it, unpinned vectors, pinned vectors)."""
    calls: list[bool] = []
    original = TrainingSet.pin

    def spy(self):
        original(self)
        calls.append(all(c.sample.is_pinned() and c.mean.is_pinned() for v in self.latents for c in v.values()))

    monkeypatch.setattr(TrainingSet, "pin", spy)
    a, b = (fresh_embedding(backend, tmp_path / d) for d in ("a", "b"))
    run(backend, a, data, tmp_path / "a", params(max_steps=3, val_every=0))
    assert calls == []  # off by default
    run(backend, b, data, tmp_path / "b", params(max_steps=3, val_every=0, pin_memory=True))
    return calls, formats.load_embedding(a).embedding.single(), formats.load_embedding(b).embedding.single()


def test_pin_memory_is_skipped_on_cpu_and_changes_nothing(tiny_backend, demo_data, tmp_path, monkeypatch):
    # Page-locking needs CUDA: on a CPU device the setting is ignored and the run is the unpinned one.
    calls, plain, pinned = _pinned_runs(tiny_backend, demo_data, tmp_path, monkeypatch)
    assert calls == []
    assert torch.equal(plain, pinned)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_pins_the_cached_latents_on_cuda(demo_data, tmp_path, monkeypatch):
    from textual_inversion_ext.backends.standalone import embedded_default

    backend = embedded_default("tiny", device="cuda")
    calls, plain, pinned = _pinned_runs(backend, demo_data, tmp_path, monkeypatch)
    assert calls == [True]  # pinned once, before the loop, every cached latent
    # Same numbers up to CUDA's run-to-run noise (fp16 autocast, atomics: ~1e-4 after 3 steps on an H200); a copy
    # that raced the compute would be off by the vectors' whole movement (~3e-2 at this learning rate).
    torch.testing.assert_close(plain, pinned, rtol=0, atol=1e-3)


class _HugeGradientBackend:
    """The wrapped backend with its training loss scaled by 1e6, so every gradient is far above a clip value."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def training_loss(self, *args):
        loss = self._inner.training_loss(*args)
        return loss * 1e6 if torch.is_grad_enabled() else loss


def _gradients_seen_by_the_optimizer(backend, data, tmp_path, **kw) -> list[torch.Tensor]:
    """The flattened gradient of the trainable vectors at every optimizer step (after any clipping)."""
    seen: list[torch.Tensor] = []

    def before_step(optimizer, args, kwargs):
        seen.append(torch.cat([p.grad.detach().flatten().clone() for g in optimizer.param_groups
                               for p in g["params"] if p.grad is not None]))

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        emb = fresh_embedding(backend, tmp_path)
        out = run(backend, emb, data, tmp_path, params(max_steps=3, val_every=0, **kw))
    finally:
        handle.remove()
    assert out.result.status == "finished" and len(seen) == 3
    return seen


def test_clipping_bounds_the_gradient_the_optimizer_steps_on(tiny_backend, demo_data, tmp_path):
    huge = _HugeGradientBackend(tiny_backend)
    unclipped = _gradients_seen_by_the_optimizer(huge, demo_data, tmp_path / "off")
    assert min(float(g.norm()) for g in unclipped) > 100  # clipping at 0.5 has work to do
    by_norm = _gradients_seen_by_the_optimizer(huge, demo_data, tmp_path / "norm",
                                               clip_grad_mode="norm", clip_grad_value="0.5")
    assert all(0.49 < float(g.norm()) <= 0.5 * (1 + 1e-5) for g in by_norm)
    by_value = _gradients_seen_by_the_optimizer(huge, demo_data, tmp_path / "value",
                                                clip_grad_mode="value", clip_grad_value="0.01")
    assert all(float(g.abs().max()) <= 0.01 for g in by_value)
    assert all(float(g.abs().max()) == pytest.approx(0.01) for g in by_value)  # the large components were cut


def test_an_embedding_of_another_family_is_refused_before_any_work(tiny_backend, demo_data, tmp_path):
    """The run uses the same vector check as the backends, and names the file it read."""
    sd2 = tmp_path / "wide.pt"
    formats.save_embedding(Embedding("wide", {"default": torch.zeros(2, 1024)}), sd2)
    with pytest.raises(ModelError, match=r"wide\.pt: .*shape \(2, 1024\).*another model family"):
        run(tiny_backend, sd2, demo_data, tmp_path, params())
    assert not (tmp_path / "logs").exists()  # refused before the log folder is made
