"""Snapshots across runs, promote, on-demand comparison grid, resume from a snapshot and presets — through
the Service, the REST handlers and the CLI."""

from __future__ import annotations

import json

import pytest
from _waiting import wait_for_job
from PIL import Image

from textual_inversion_ext import api, cli
from textual_inversion_ext.core import formats
from textual_inversion_ext.core.create import CreateParams
from textual_inversion_ext.core.errors import TIError
from textual_inversion_ext.core.training.train_params import TrainParams
from textual_inversion_ext.core.training.trainer import sidecar_path
from textual_inversion_ext.service import Service

FAST = dict(max_steps=6, save_every=3, preview_every=0, val_every=3, val_budget=0.0, csv_every=1, comparison_grid=False,
            preview_steps=2, learn_rate="0.05")


@pytest.fixture
def trained(service, demo_data) -> Service:
    service.create(CreateParams(name="toy", init_text="red robot"))
    status = wait_for_job(service, service.start_training("toy", demo_data, TrainParams(**FAST)).id)
    assert status["status"] == "finished", status
    return service


def test_job_reports_series_best_step_and_snapshots(trained):
    status = trained.job_status()
    assert [s for s, _ in status["validation"]] == [0, 3, 6]
    assert [s for s, _ in status["learn_rates"]] == list(range(1, 7))
    assert len(status["norms"]) == 6 and len(status["norm_ratios"]) == 2  # "red robot": 2 vectors
    result = status["result"]
    assert result["best_step"] == status["best_step"] == min(status["validation"], key=lambda sv: sv[1])[0]
    assert result["best_snapshot"].endswith(f"toy-{result['best_step']}.pt")
    # since_step filters every series; 0 means all of them (the start is measured at step 0)
    assert [s for s, _ in trained.job_status(status["id"], since_step=3)["validation"]] == [6]


def test_snapshots_list_promote_and_refusals(trained, tmp_path):
    snaps = trained.snapshots("toy")
    assert [s["step"] for s in snaps] == [0, 3, 6]
    assert sum(s["best"] for s in snaps) == 1 and all(s["val_loss"] is not None for s in snaps)
    step3 = next(s for s in snaps if s["step"] == 3)
    out = trained.promote("toy", step3["path"])
    target = trained.embedding_path("toy")
    emb = formats.load_embedding(target).embedding
    assert out["step"] == emb.step == 3 and emb.name == "toy"
    assert formats.optim_path(target).exists()
    assert json.loads(sidecar_path(target).read_text())["promoted_from"] == step3["path"]
    assert trained.list_embeddings()[0]["step"] == 3  # usable at once, under the embedding's name
    # only this tool's snapshots of that embedding
    stray = tmp_path / "stray-3.pt"
    formats.save_embedding(emb, stray)
    with pytest.raises(TIError, match="not a snapshot of this tool"):
        trained.promote("toy", stray)
    trained.create(CreateParams(name="other", init_text="cat"))
    with pytest.raises(TIError, match="not a snapshot of 'other'"):
        trained.promote("other", step3["path"])


def test_resume_from_a_snapshot_continues_step_exact(trained, demo_data):
    step3 = next(s for s in trained.snapshots("toy") if s["step"] == 3)
    status = wait_for_job(trained, trained.start_training("toy", demo_data, TrainParams(**FAST),
                                                  resume_from=step3["path"]).id)
    assert status["status"] == "finished" and [s for s, _ in status["losses"]] == [4, 5, 6]
    first_run = [s for s in trained.snapshots("toy") if s["step"] == 6][-1]  # the older run's step 6
    resumed = formats.load_embedding(trained.embedding_path("toy")).embedding
    original = formats.load_embedding(first_run["path"]).embedding
    assert resumed.step == 6
    assert (resumed.single() - original.single()).abs().max() < 1e-5


def test_grid_on_demand(trained):
    status = wait_for_job(trained, trained.start_grid("toy", prompts="a photo of toy\ntoy in the snow").id)
    assert status["kind"] == "grid" and status["status"] == "finished", status
    image = Image.open(status["result"]["grid"])
    assert image.width > image.height > 0  # 3 snapshot columns × 2 prompt rows
    with pytest.raises(TIError, match="no training runs"):
        trained.create(CreateParams(name="fresh", init_text="cat"))
        trained.start_grid("fresh")


def test_presets_round_trip_and_errors(service):
    custom = TrainParams(learn_rate="0.05:10, 0.01", max_steps=42, val_split=0.2, norm_cap=3.0,
                         preview_prompt="a photo of toy\ntoy on a beach")
    service.save_preset("my preset", custom, {"data_dir": "/data/toy"})
    assert service.presets() == ["my preset"]
    loaded = service.load_preset("my preset")
    assert TrainParams(**loaded["params"]) == custom and loaded["extra"] == {"data_dir": "/data/toy"}
    with pytest.raises(TIError, match="Preset name"):
        service.save_preset("../escape", custom)
    (service.presets_folder / "broken.json").write_text(json.dumps({"params": {"max_stepz": 3}}))
    with pytest.raises(TIError, match="max_stepz"):
        service.load_preset("broken")


def call(service, handler, body):
    return api.dispatch(handler, service, body)


def test_api_snapshots_promote_grid_presets(trained):
    status, body = call(trained, api.snapshots, {"name": "toy"})
    assert status == 200 and [s["step"] for s in body["snapshots"]] == [0, 3, 6]
    status, body = call(trained, api.promote, {"name": "toy", "snapshot": body["snapshots"][1]["path"]})
    assert status == 200 and body["step"] == 3
    assert call(trained, api.promote, {"name": "nope", "snapshot": "x"})[0] == 404
    assert call(trained, api.promote, {"name": "toy", "snapshot": "/etc/passwd"})[0] == 400
    status, body = call(trained, api.preset_save, {"preset": "fast", "max_steps": 7, "extra": {"subject": "robot"}})
    assert status == 200
    assert call(trained, api.presets, {})[1] == {"presets": ["fast"]}
    status, body = call(trained, api.preset_load, {"preset": "fast"})
    assert body["params"]["max_steps"] == 7 and body["extra"] == {"subject": "robot"}
    assert call(trained, api.preset_save, {"preset": "bad", "max_steps": "7"})[0] == 422
    status, body = call(trained, api.grid, {"name": "toy", "prompts": "a photo of toy"})
    assert status == 200 and wait_for_job(trained, body["job_id"])["result"]["grid"].endswith("toy-comparison.png")


def test_cli_promote_grid_and_presets(trained, tmp_path, capsys):
    snap = next(s for s in trained.snapshots("toy") if s["step"] == 3)["path"]
    target = trained.embedding_path("toy")
    assert cli.main(["promote", snap, str(target)]) == 0
    assert formats.load_embedding(target).embedding.step == 3
    log_dir = str(trained.job_status()["result"]["log_dir"])
    assert cli.main(["grid", log_dir, "--prompt", "a photo of toy"]) == 0
    assert "toy-comparison.png" in capsys.readouterr().out
    preset = tmp_path / "fast.json"
    trained.save_preset("fast", TrainParams(max_steps=9, learn_rate="0.02"))
    preset.write_text((trained.presets_folder / "fast.json").read_text())
    parser = cli.build_parser()
    cli._preset_defaults(parser, ["train", "e.pt", "d", "--preset", str(preset), "--learn-rate", "0.3"])
    args = parser.parse_args(["train", "e.pt", "d", "--preset", str(preset), "--learn-rate", "0.3"])
    assert args.max_steps == 9 and args.learn_rate == "0.3"  # the preset is the default; flags win
