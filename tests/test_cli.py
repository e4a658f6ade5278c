from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from textual_inversion_ext.cli import build_parser, main
from textual_inversion_ext.core import formats
from textual_inversion_ext.core.embedding import SINGLE, Embedding


def write_pt(path: Path, n: int = 3, dim: int = 768, step: int = 42) -> Path:
    emb = Embedding("x", {SINGLE: torch.randn(n, dim)}, step=step, sd_checkpoint="abcdef0123",
                    sd_checkpoint_name="model-a")
    formats.save_embedding(emb, path)
    return path


def test_help_explains_every_command(capsys):
    parser = build_parser()
    for command in ("create", "train", "info", "convert", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "usage:" in text
    parser.parse_args(["train", "e.pt", "data"])  # the two positionals are enough


def test_info_prints_trigger_vectors_step_and_hash(tmp_path, capsys):
    path = write_pt(tmp_path / "my-thing.pt")
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    text = json.dumps(info)
    assert "my-thing" in text and "42" in text and "abcdef0123" in text and "768" in text


def test_info_fails_clearly_for_unsafe_and_unreadable_files(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Evil()}}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    assert main(["info", str(evil)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not marker.exists()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert main(["info", str(junk)]) == 2
    assert "junk.safetensors" in capsys.readouterr().err


def test_convert_between_formats(tmp_path, capsys):
    src = write_pt(tmp_path / "thing.pt")
    assert main(["convert", str(src), str(tmp_path / "thing.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "thing.safetensors"), str(tmp_path / "thing.png")]) == 0
    back = formats.load_embedding(tmp_path / "thing.png").embedding
    torch.testing.assert_close(back.single(), formats.load_embedding(src).embedding.single())
    assert back.step == 42


def test_create_counts_tokens_for_vectors(tmp_path, capsys):
    assert main(["create", "car-x", "--init-text", "blue bmw", "--out", str(tmp_path)]) == 0
    emb = formats.load_embedding(tmp_path / "car-x.pt").embedding
    assert emb.num_vectors == 2
    assert main(["create", "car-x", "--init-text", "blue bmw", "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["create", "../escape", "--out", str(tmp_path)]) == 2


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "textual_inversion_ext", "--version"], capture_output=True,
                         text=True, check=True)
    assert "textual_inversion_ext" in out.stdout


def test_create_with_more_tokens_than_vectors_says_what_it_did(tmp_path, capsys):
    assert main(["create", "long", "--init-text", "a red vintage sports car", "--num-vectors", "2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 vectors" in out and "vintage" in out  # the pooling message names the words


@pytest.mark.parametrize(("flag", "device", "precision", "loaded"), [
    ("auto", "cuda", "auto", "fp16"), ("auto", "cuda:1", "auto", "fp16"), ("auto", "cpu", "auto", "fp32"),
    ("auto", "cuda", "bf16", "bf16"), ("auto", "cuda", "fp32", "fp32"),  # auto follows an explicit --precision
    ("auto", "cpu", "fp16", "fp32"),  # CPU: fp32 weights, fp16 autocast (opt-in)
    ("bf16", "cpu", "auto", "bf16"), ("fp32", "cuda", "auto", "fp32"),  # an explicit --dtype wins
])
def test_dtype_flag_chooses_the_frozen_weights_dtype(flag, device, precision, loaded):
    from textual_inversion_ext.cli import weight_dtype_name

    assert weight_dtype_name(flag, device, precision) == loaded


def test_dtype_flag_loads_the_standalone_model_in_that_dtype():
    from textual_inversion_ext.cli import load_backend

    args = build_parser().parse_args(["train", "e.pt", "data", "--device", "cpu", "--dtype", "bf16"])
    backend = load_backend(args)
    assert backend.weight_dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for m in (backend.unet, backend.vae, backend.text_encoder)
               for p in m.parameters())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "e.pt", "data", "--dtype", "fp8"])
