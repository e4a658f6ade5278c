"""The SDXL loops of benchmarks/train_speed.py on the tiny SDXL model: the peers' loops train only their new token
rows (the rest restored, as the scripts do) through the benchmark's wiring, ours runs through its worker, and the FLOP
count puts our step below the peers' (no VAE in it). The SD1 peer loops still run on the shared backend base."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sdxl_loops
import train_speed

from textual_inversion_ext.backends.standalone import embedded_default
from textual_inversion_ext.core.data.dataset import TrainingSet
from textual_inversion_ext.core.embedding import Embedding

TRIGGER = "bench-token"


@pytest.mark.parametrize("loop", sdxl_loops.PEER_LOOPS)
def test_peer_loop_changes_only_the_new_rows(loop: str) -> None:
    backend = embedded_default("tiny-sdxl")
    tables = {key: enc.table.weight.detach().clone() for key, enc in backend.encoders.items()}
    unet = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    init = {key: rows.mean(0, keepdim=True).repeat(2, 1) for key, rows in backend.token_rows([1746, 7869]).items()}
    args = argparse.Namespace(loop=loop, warmup=1, steps=1)
    timer = train_speed.Timer(torch.device("cpu"), warmup=1)
    pixels = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1]
    # the benchmark's own wiring of the peer loops (prompts, pixels, steps, timer)
    train_speed.run_sdxl_peer(backend, TrainingSet(["shapes"], [], []), Embedding(TRIGGER, init), args, timer, pixels)
    assert timer.start is not None and timer.end > timer.start  # step 1 opened the window, step 2 closed it
    for te, key in ((backend.text_encoder, "clip_l"), (backend.text_encoder_2, "clip_g")):
        weight = te.get_input_embeddings().weight.detach()
        vocab = tables[key].shape[0]
        assert weight.shape == (vocab + 2, tables[key].shape[1])  # resize_token_embeddings by the 2 new tokens
        assert torch.equal(weight[:vocab], tables[key])  # weight decay and Adam moved them; restored every step
        assert not torch.allclose(weight[vocab:], init[key])  # the new rows trained
    # Both scripts leave clip_g's projection trainable (it takes a gradient it never uses).
    assert backend.text_encoder_2.text_projection.weight.grad is not None
    assert all(torch.equal(v, unet[k]) for k, v in backend.unet.state_dict().items())


def test_benchmark_worker_runs_ours_on_sdxl() -> None:
    args = argparse.Namespace(config="tiny-sdxl", size=64, steps=1, warmup=1, device="cpu", dtype="fp32",
                              loop="ours")
    result = train_speed.worker(args)  # the real trainer with both encoders' vectors
    assert result["loop"] == "ours" and result["size"] == 64
    # The peak starts at the RSS before training (the trainer may then free memory: the VAE); the kernel's RSS
    # counters lag by a few pages.
    assert result["s_per_step"] > 0 and result["peak_rss_mb"] >= result["rss_before_training_mb"] - 1 > 0


@pytest.mark.parametrize("loop", ["a1111-style", "diffusers-example-style"])
def test_benchmark_worker_still_runs_the_sd1_peers(loop: str) -> None:
    # the SD1 rows' loops run on the shared backend base too (diffusers-example-style reaches into its token table)
    args = argparse.Namespace(config="tiny", size=64, steps=1, warmup=1, device="cpu", dtype="fp32", loop=loop)
    assert train_speed.worker(args)["s_per_step"] > 0


def test_loops_follow_the_config_family() -> None:
    assert train_speed.default_loops("tiny-sdxl") == ("ours", "diffusers-sdxl-style", "kohya-style")
    assert train_speed.default_loops("sd15") == train_speed.LOOPS  # the SD1 rows unchanged


def test_count_flops_ours_is_below_the_peers() -> None:
    counts = sdxl_loops.count_flops("tiny-sdxl", [64], f"a photo of {TRIGGER}, shapes", TRIGGER)[64]
    assert counts["ours"] > 0
    # The peers add a VAE encode per step on top of the same UNet and text-encoder passes.
    assert all(counts["ours"] < counts[peer] for peer in sdxl_loops.PEER_LOOPS)
