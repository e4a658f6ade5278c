"""Findings of the hostile- and broken-input probes (issue 12, point 3): names read from files, the name length
rule, write failures, `info` escaping, `promote`'s optimizer state."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from _faults import FaultyBackend

from textual_inversion_ext.cli import main
from textual_inversion_ext.core import formats
from textual_inversion_ext.core.create import CreateParams, create_embedding
from textual_inversion_ext.core.embedding import MAX_NAME_BYTES, SINGLE, Embedding, validate_name
from textual_inversion_ext.core.errors import InvalidNameError, TrainingError, WriteError
from textual_inversion_ext.core.fileio import atomic_write_text
from textual_inversion_ext.core.formats import png
from textual_inversion_ext.core.training.run import RunRequest, render_run_grid, run_training
from textual_inversion_ext.core.training.snapshots import promote
from textual_inversion_ext.core.training.train_params import TrainParams


def _params(**kw) -> TrainParams:
    base = dict(max_steps=2, save_every=0, preview_every=0, csv_every=1, learn_rate="0.01", seed=5,
                comparison_grid=False, val_every=0)
    base.update(kw)
    return TrainParams(**base)


def _embedding(backend, folder: Path, name: str = "toy") -> Path:
    return create_embedding(backend, CreateParams(name=name, init_text="red robot", overwrite=True), folder).path


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------ names read from files


@pytest.mark.parametrize("stored", ["../../escaped", "ABSOLUTE", "..", ".hidden"])
def test_a_png_cards_stored_name_cannot_lead_training_out_of_the_log_folder(tiny_backend, demo_data, tmp_path,
                                                                           stored):
    if stored == "ABSOLUTE":
        stored = str(tmp_path / "absolute-escape")
    embedding = formats.load_embedding(_embedding(tiny_backend, tmp_path / "src")).embedding
    embedding.name = stored  # as a hostile card would store it (the writer refuses such names)
    card = tmp_path / "emb" / "card.png"
    card.parent.mkdir()
    png.write(embedding, card)
    assert formats.load_embedding(card).embedding.name == stored
    before = _files_under(tmp_path)
    with pytest.raises(InvalidNameError, match=r"card\.png holds a name this tool cannot use"):
        run_training(tiny_backend, RunRequest(card, demo_data, tmp_path / "a" / "b" / "logs", _params()))
    assert _files_under(tmp_path) == before  # no run.json, CSV or snapshot anywhere


def test_a_run_records_name_is_checked_before_the_grid_writes(tiny_backend, tmp_path):
    run = tmp_path / "logs" / "toy" / "run1"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"embedding": {"name": "../../../escaped", "file": "x.pt"},
                                              "preview": {"prompts": ["a"], "settings": {}}}))
    with pytest.raises(InvalidNameError, match=r"run\.json holds a name"):
        render_run_grid(tiny_backend, run)
    assert not list(tmp_path.rglob("*comparison*"))


# ------------------------------------------------------------ one length rule


def test_the_longest_accepted_name_trains_to_the_highest_step(tiny_backend, demo_data, tmp_path):
    assert MAX_NAME_BYTES == 189
    highest = TrainParams.__dataclass_fields__["max_steps"].metadata["param"].maximum
    assert len(f"-{int(highest)}") <= 200 - MAX_NAME_BYTES  # the rule keeps room for the highest step
    with pytest.raises(InvalidNameError, match="190 bytes long; the limit is 189"):
        _embedding(tiny_backend, tmp_path, "n" * 190)
    with pytest.raises(InvalidNameError, match="limit is 189"):
        validate_name("é" * 95)  # bytes, not characters: 190 bytes
    name = "n" * 187 + "é"  # 189 bytes
    path = _embedding(tiny_backend, tmp_path, name)
    loaded = formats.load_embedding(path).embedding
    loaded.step = 999_999
    formats.save_embedding(loaded, path)
    out = run_training(tiny_backend, RunRequest(path, demo_data, tmp_path / "logs",
                                                _params(max_steps=1_000_000, save_every=1)))
    assert out.result.status == "finished" and out.result.step == 1_000_000
    snapshot = out.paths.snapshots / f"{name}-1000000.pt"
    assert formats.load_embedding(snapshot).embedding.step == 1_000_000
    assert formats.optim_path(snapshot).is_file()


# ------------------------------------------------------------ info


def test_info_escapes_control_characters_of_a_stored_name(tmp_path, capsys):
    hostile = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\u202etxt.exe\x9b"
    card = tmp_path / "card.png"
    png.write(Embedding(hostile, {SINGLE: torch.randn(1, 768)}), card)
    assert main(["info", str(card)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\u202e\x9b")
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x1b[31mred\\u202etxt.exe\\x9b" in out  # shown, escaped
    assert main(["info", str(card), "--json"]) == 0
    raw = capsys.readouterr().out
    assert not any(c in raw for c in "\x1b\x07\u202e\x9b") and json.loads(raw)["stored_name"] == hostile


# ------------------------------------------------------------ promote


class _Evil:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _snapshot(folder: Path) -> tuple[Path, Embedding]:
    emb = Embedding("toy", {SINGLE: torch.randn(1, 768)}, step=7)
    snapshot = folder / "logs" / "toy-7.pt"
    snapshot.parent.mkdir(parents=True)
    formats.save_embedding(Embedding("toy-7", emb.vectors, step=7), snapshot)
    return snapshot, emb


def test_promote_rewrites_a_valid_optimizer_state_through_the_safe_loader(tmp_path):
    snapshot, emb = _snapshot(tmp_path)
    state = {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]}
    formats.save_optimizer_state(emb, snapshot, state, None)
    target = promote(snapshot, tmp_path / "toy.pt")
    assert formats.load_training_state(emb, target).optimizer == state


@pytest.mark.parametrize("kind", ["hostile", "damaged", "stale"])
def test_promote_leaves_out_a_hostile_damaged_or_stale_optimizer_state(tmp_path, caplog, kind):
    snapshot, emb = _snapshot(tmp_path)
    optim = formats.optim_path(snapshot)
    _Evil.marker = tmp_path / "pwned"
    if kind == "hostile":
        torch.save({"hash": emb.a1111_checksum(), "optimizer_state_dict": {"state": _Evil()}}, optim,
                   pickle_protocol=pickle.DEFAULT_PROTOCOL)
    elif kind == "damaged":
        optim.write_bytes(b"\x80\x02garbage that is no pickle")
    else:
        formats.save_optimizer_state(Embedding("x", {SINGLE: torch.ones(1, 768)}), snapshot, {"state": {}}, None)
    target = tmp_path / "toy.pt"
    formats.optim_path(target).write_bytes(b"an older state of the replaced vectors")
    with caplog.at_level(logging.WARNING):
        promote(snapshot, target)
    assert formats.load_embedding(target).embedding.step == 7  # the vectors are promoted
    assert not formats.optim_path(target).exists() and not _Evil.marker.exists()
    assert "toy-7.pt.optim" in caplog.text  # said, in the log


# ------------------------------------------------------------ write failures


def test_a_folder_in_the_way_of_the_final_save_gets_a_fallback_that_is_said(tiny_backend, demo_data, tmp_path):
    emb = _embedding(tiny_backend, tmp_path / "emb")
    blocked = tmp_path / "out.pt"
    blocked.mkdir()  # a folder where the trained file should go
    out = run_training(tiny_backend, RunRequest(emb, demo_data, tmp_path / "logs", _params(), output_path=blocked))
    result = out.result
    assert result.status == "finished" and result.final_path == out.paths.log_dir / "out.pt"
    assert formats.load_embedding(result.final_path).embedding.step == 2  # the trained vectors are kept
    assert result.warnings[-1] == (f"Could not write {blocked}: Is a directory (a folder named out.pt is in the way). "
                                   f"The trained embedding was saved to {result.final_path} instead; move it to "
                                   f"{blocked} once that is solved.")
    assert result.message.endswith(result.warnings[-1])  # the final message says it too


@pytest.fixture
def full_disk(monkeypatch):
    """Atomic writes fail as on a full disk into the folders in the returned set, and of files named so."""
    full: set[Path | str] = set()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).parent in full or Path(dst).name in full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return full


def test_an_error_and_a_full_disk_at_the_end_still_keep_the_vectors(tiny_backend, demo_data, tmp_path, full_disk):
    emb = _embedding(tiny_backend, tmp_path / "emb")
    full_disk.add(emb.parent)
    with pytest.raises(TrainingError, match="injected failure") as info:
        run_training(FaultyBackend(tiny_backend, bad_calls=range(2, 10**6), fault="raise"),
                     RunRequest(emb, demo_data, tmp_path / "logs", _params(max_steps=5)))
    saved = next((tmp_path / "logs" / "toy").glob("*/toy.pt"))  # the run's log folder
    assert str(info.value) == (f"Training stopped at step 1 by RuntimeError: injected failure. Could not write {emb}: "
                               "No space left on device (free some disk space). The trained embedding was saved to "
                               f"{saved} instead; move it to {emb} once that is solved.")
    assert formats.load_embedding(saved).embedding.step == 1
    assert formats.load_embedding(emb).embedding.step == 0  # the target is untouched


def test_nothing_writable_is_a_clear_error(tiny_backend, demo_data, tmp_path, full_disk):
    emb = _embedding(tiny_backend, tmp_path / "emb")
    full_disk.add("toy.pt")  # the target and every fallback
    with pytest.raises(TrainingError, match=r"^Could not write .*toy\.pt: No space left on device \(free some disk "
                                            r"space\)\. Nor could the trained embedding be saved in the run's log "
                                            r"folder or the temp folder; the latest snapshot in .* is what is left"):
        run_training(tiny_backend, RunRequest(emb, demo_data, tmp_path / "logs", _params()))


def test_cli_write_failures_are_messages_not_tracebacks(tiny_backend, demo_data, tmp_path, capsys):
    (tmp_path / "file").write_text("in the way")
    assert main(["create", "toy", "--init-text", "red robot", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Could not write") and "a file is in the way of its folder" in err
    src = _embedding(tiny_backend, tmp_path)
    (tmp_path / "copy.safetensors").mkdir()
    assert main(["convert", str(src), str(tmp_path / "copy.safetensors")]) == 2
    assert "a folder named copy.safetensors is in the way" in capsys.readouterr().err
    (tmp_path / "trained.pt").mkdir()
    code = main(["train", str(src), str(demo_data), "--output", str(tmp_path / "trained.pt"), "--max-steps", "1",
                 "--log-dir", str(tmp_path / "logs"), "--save-every", "0", "--preview-every", "0", "--val-every", "0",
                 "--no-comparison-grid"])
    out = capsys.readouterr().out
    assert code == 1 and "warning: Could not write" in out and "instead; move it to" in out


def test_torch_reporting_a_failed_write_is_a_write_error_naming_the_file(tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):  # what torch.save raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteError, match=r"^Could not write .*toy\.pt: \[enforce fail.*\(check the folder and the "
                                         r"disk space\)\.$") as info:
        formats.save_embedding(Embedding("toy", {SINGLE: torch.randn(1, 768)}), tmp_path / "toy.pt")
    assert isinstance(info.value, OSError) and info.value.filename == str(tmp_path / "toy.pt")
    assert list(tmp_path.iterdir()) == []  # no temp file left


@pytest.mark.parametrize(("code", "hint"), [(errno.EACCES, "the folder is not writable"),
                                            (errno.EROFS, "the disk is read-only"),
                                            (errno.ENOSPC, "free some disk space")])
def test_atomic_writes_name_the_file_and_what_to_check(tmp_path, monkeypatch, code, hint):
    target = tmp_path / "notes.txt"
    target.write_text("before")

    def refuse(src, dst, *args, **kwargs):  # a read-only folder (root ignores chmod) or a full disk
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteError) as info:
        atomic_write_text(target, "after")
    assert str(info.value) == f"Could not write {target}: {os.strerror(code)} ({hint})."
    assert info.value.errno == code and target.read_text() == "before" and len(list(tmp_path.iterdir())) == 1


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """mkstemp's 0600 must not leak into outputs: a new file gets 0666 & ~umask, a replaced file keeps its mode."""
    from textual_inversion_ext.core.fileio import _UMASK, atomic_write_text

    new = tmp_path / "new.txt"
    atomic_write_text(new, "a")
    assert new.stat().st_mode & 0o777 == 0o666 & ~_UMASK
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o640)
    atomic_write_text(kept, "new")
    assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text() == "new"
