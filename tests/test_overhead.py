"""Issue 12.11: validation within 10 % of the training cost by default, the comparison grid's cost told before it
starts, and an interrupt that stops it at once. Costs are counted (forward samples), not timed: deterministic."""

from __future__ import annotations

import importlib
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _linear_backend import LinearBackend

from textual_inversion_ext.core.create import CreateParams, create_embedding
from textual_inversion_ext.core.data import images
from textual_inversion_ext.core.data.dataset import prepare
from textual_inversion_ext.core.errors import Interrupted
from textual_inversion_ext.core.training.run import RunRequest, run_training
from textual_inversion_ext.core.training.train_params import TrainParams
from textual_inversion_ext.core.training.validation import (
    FORWARD_COST,
    ValidationSet,
    count_passes,
    plan_validation,
)
from textual_inversion_ext.jobs import Job

BUDGET = TrainParams().val_budget


class Counting:
    """The wrapped backend, counting samples through the UNet: training (forward + backward) and validation
    (forward only, under no_grad); and the previews it rendered."""

    def __init__(self, inner, on_preview=None) -> None:
        self._inner, self.on_preview = inner, on_preview
        self.train_samples = self.val_samples = self.val_calls = self.previews = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def training_loss(self, latents, *args, **kw):
        if torch.is_grad_enabled():
            self.train_samples += len(latents)
        else:
            self.val_samples += len(latents)
            self.val_calls += 1
        return self._inner.training_loss(latents, *args, **kw)

    def preview(self, *args, **kw):
        self.previews += 1
        if self.on_preview:
            self.on_preview(self.previews)
        return self._inner.preview(*args, **kw)


def _run(backend, data, tmp, messages=None, stop=None, **kw):
    emb = create_embedding(backend, CreateParams(name="toy", init_text="red robot", overwrite=True), tmp / "emb").path
    p = TrainParams(**{"save_every": 0, "preview_every": 0, "csv_every": 0, "comparison_grid": False,
                       "resolution": 64, "seed": 3, **kw})
    return run_training(backend, RunRequest(emb, data, tmp / "logs", p),
                        status=(messages.append if messages is not None else lambda text: None), stop=stop)


def test_plan_keeps_every_configuration_within_the_budget_and_says_how():
    for steps in (1, 6, 50, 300, 3000, 20000):
        for spp in (1, 4):
            for n_img, timesteps, every in ((6, 4, 50), (40, 4, 10), (3, 1, 1), (200, 8, 100)):
                plan = plan_validation(start=0, end=steps, samples_per_step=spp, images=n_img,
                                       timesteps=timesteps, every=every, budget=BUDGET)
                spent = count_passes(0, steps, plan.every) * plan.samples * FORWARD_COST
                assert spent <= BUDGET * steps * spp + 1e-9, (steps, spp, n_img, plan)
                assert plan.passes == count_passes(0, steps, plan.every) and plan.share <= BUDGET + 1e-9
                if plan.every:
                    assert plan.every >= every and 1 <= plan.samples <= n_img * timesteps
                    assert plan.passes >= 2  # at least the start and the end
                    assert f"every {plan.every} steps" in plan.note
    # what fits is left as asked; budget 0 = exactly what was asked
    kept = plan_validation(start=0, end=3000, samples_per_step=1, images=6, timesteps=4, every=500, budget=BUDGET)
    assert (kept.every, kept.samples) == (500, 24)
    asked = plan_validation(start=0, end=6, samples_per_step=1, images=6, timesteps=4, every=50, budget=0)
    assert (asked.every, asked.samples, asked.passes) == (50, 24, 2)
    # the defaults on 20 images, 3000 steps: a smaller fixed set, the interval kept
    plan = plan_validation(start=0, end=3000, samples_per_step=1, images=20, timesteps=4, every=50, budget=BUDGET)
    assert (plan.every, plan.samples) == (50, 9) and "fitted to the 10% validation budget" in plan.note
    # resuming at step 1000: the passes are counted from there
    assert count_passes(1000, 1100, 50) == 3 and count_passes(1000, 1110, 50) == 4


def test_default_validation_costs_at_most_a_tenth_of_training(demo_data, tmp_path):
    """300 steps with the defaults (validate every 50 on 6 images × 4 timesteps): before the budget 7 passes
    × 24 samples = 168 forward samples against 300 training samples (2 forwards' worth each) = 28 %."""
    backend = Counting(LinearBackend())
    out = _run(backend, demo_data, tmp_path, max_steps=300)
    assert backend.train_samples == 300 and backend.val_samples > 0
    assert backend.val_samples * FORWARD_COST <= BUDGET * backend.train_samples
    steps = [s for s, _ in out.result.validation]
    assert steps[0] == 0 and steps[-1] == 300 and len(steps) >= 3  # still a curve: start, between, end
    plan = json.loads(out.record_path.read_text())["validation_plan"]
    assert plan["passes"] == len(steps) and plan["samples"] * len(steps) == backend.val_samples


def test_six_step_run_skips_validation_and_says_so_before_training(demo_data, tmp_path):
    """The issue's host run: 6 steps cannot pay for a check at the start and the end."""
    backend, messages = Counting(LinearBackend()), []
    out = _run(backend, demo_data, tmp_path, messages, max_steps=6)
    assert backend.val_samples == 0 and out.result.validation == [] and out.result.status == "finished"
    note = next(m for m in messages if m.startswith("Validation: skipped"))
    assert "budget to 0" in note
    assert json.loads(out.record_path.read_text())["validation_plan"]["every"] == 0
    # the user's override: budget 0 validates at the start and the end as before
    again = Counting(LinearBackend())
    out = _run(again, demo_data, tmp_path / "all", max_steps=6, val_budget=0.0)
    assert [s for s, _ in out.result.validation] == [0, 6] and again.val_samples == 2 * 6 * 4


def test_reduced_set_is_fixed_stratified_over_the_noise_range_and_batched(demo_data):
    backend = Counting(LinearBackend())
    data = prepare(backend, images.scan_dataset(demo_data), resolution=64, use_buckets=False, with_flips=False,
                   latent_sampling="deterministic", seed=0)
    lines = ["a photo of [name], [filewords]"]
    small = ValidationSet(backend, data, "toy", lines, timesteps_per_image=4, samples=5, batch_size=2)
    assert len(small) == 5 and small.images == 5  # spread over 5 of the 6 images
    assert sorted(s.timestep for s in small.samples) == [100, 300, 500, 700, 900]  # one per fifth of the range
    vectors = {"default": torch.randn(2, 8)}
    first = small.loss(vectors)
    assert backend.val_calls == 3  # 5 samples in batches of 2
    again = ValidationSet(backend, data, "toy", lines, timesteps_per_image=4, samples=5, batch_size=2)
    assert again.loss(vectors) == first  # fixed: the same samples and noise every time
    # batching does not change the full set's loss
    full = ValidationSet(backend, data, "toy", lines, timesteps_per_image=4, batch_size=8)
    one = ValidationSet(backend, data, "toy", lines, timesteps_per_image=4, batch_size=1)
    backend.val_calls = 0
    assert len(full) == 24 and full.loss(vectors) == pytest.approx(one.loss(vectors), rel=1e-6)
    assert backend.val_calls == 3 + 24


def test_grid_cost_is_told_before_it_starts_and_an_interrupt_stops_it_within_a_cell(demo_data, tmp_path):
    messages, stop, seen = [], threading.Event(), []

    def on_preview(n: int) -> None:
        seen.append(list(messages))
        if n == 2:
            stop.set()  # the user presses Interrupt while the second image renders

    backend = Counting(LinearBackend(), on_preview)
    out = _run(backend, demo_data, tmp_path, messages, stop, max_steps=4, save_every=2, val_every=0,
               comparison_grid=True, preview_steps=5)
    assert out.result.status == "finished" and out.result.step == 4  # the embedding is saved either way
    cost = [m for m in seen[0] if m.startswith("Comparison grid: 3 images × 5 sampling steps, about ")]
    assert cost and "Interrupt skips it" in cost[0]  # told before the first image
    assert backend.previews == 2 and out.grid is None  # init, step 2, step 4: the third never started
    assert "No comparison grid: Comparison grid interrupted after 2 of 3 images." in messages


def test_standalone_preview_stops_between_sampling_steps(tiny_backend):
    calls = []
    hook = tiny_backend.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(Interrupted, match="after step 2 of 10"):
            tiny_backend.preview("a photo", "toy", {}, seed=1, steps=10, width=64, height=64, cfg_scale=7.0,
                                 should_stop=lambda: len(calls) >= 2)
    finally:
        hook.remove()
    assert len(calls) == 2  # not the 10 a cell takes


def test_host_preview_stop_presses_the_hosts_interrupt(monkeypatch):
    fake_host = Path(__file__).parent / "fake_host"
    monkeypatch.syspath_prepend(str(fake_host))
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        monkeypatch.delitem(sys.modules, name)
    shared = importlib.import_module("modules.shared")
    from textual_inversion_ext.backends.a1111.backend import _host_interrupt

    asked = threading.Event()
    with _host_interrupt(asked.is_set, poll_s=0.01) as stopped:
        assert not shared.state.interrupted
        asked.set()
        deadline = time.monotonic() + 5
        while not shared.state.interrupted and time.monotonic() < deadline:
            time.sleep(0.01)
    assert shared.state.interrupted and stopped.is_set()  # the host's samplers stop at their next step
    with _host_interrupt(None) as untouched:
        pass
    assert not untouched.is_set()


def test_interrupt_note_names_the_grid_once_training_is_saved():
    job = Job(id="train-1", kind="train", name="toy", status="running")
    job.stop.set()
    assert job.shown_message().startswith("Interrupting: the current step finishes")
    job.stage = "grid"
    assert "comparison grid" in job.shown_message() and "already saved" in job.shown_message()


def test_interrupt_during_the_grid_of_a_training_job_skips_it_and_keeps_the_run(demo_data, tmp_path):
    from _waiting import wait_for_job

    from textual_inversion_ext.service import Service

    shown = []

    def on_preview(n: int) -> None:  # the user presses Interrupt while the first grid image renders
        if n == 1:
            service.interrupt()
            shown.append(service.job_status()["message"])

    backend = Counting(LinearBackend(), on_preview)
    service = Service(backend=lambda: backend, embeddings_dir=tmp_path / "emb", log_root=tmp_path / "logs")
    service.create(CreateParams(name="toy", init_text="red robot"))
    params = TrainParams(max_steps=4, save_every=2, preview_every=0, val_every=0, resolution=64, preview_steps=3)
    status = wait_for_job(service, service.start_training("toy", demo_data, params).id)
    assert shown and shown[0].startswith("Stopping the comparison grid")
    assert status["status"] == "finished" and status["step"] == 4 and status["result"]["grid"] is None
    assert backend.previews == 1  # no second image after the interrupt
    # on demand: the estimate is the job's first message, there before it renders anything
    job = service.start_grid("toy")
    assert job.message.startswith("Comparison grid: 3 images × 3 sampling steps")
    assert wait_for_job(service, job.id)["status"] == "finished" and backend.previews == 4
    # interrupted on demand: an interrupted job, not an error
    backend.on_preview = lambda n: service.interrupt()
    status = wait_for_job(service, service.start_grid("toy").id)
    assert status["status"] == "interrupted" and status["message"] == "Comparison grid interrupted after 1 of 3 images."
