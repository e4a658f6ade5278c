"""The A1111 backend's SDXL parts against small fakes (the real host: tests/host/test_host_sdxl.py): what goes
into sgm's conditioner per sample, gradient through its text encoders, and checkpointing of sgm's blocks."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from textual_inversion_ext.core.backend import SampleGeometry

FAKE_HOST = Path(__file__).parent / "fake_host"


@pytest.fixture
def host(monkeypatch):
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(FAKE_HOST))
    importlib.import_module("modules.devices")
    yield
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        del sys.modules[name]


class _TextEmbedder(torch.nn.Module):
    """A hijacked text encoder as the host leaves it in the conditioner: `wrapped.model.token_embedding` is the
    hijack's EmbeddingsWithFixes (here: a module with the key and the table)."""

    def __init__(self, key: str, width: int) -> None:
        super().__init__()
        fixes = torch.nn.Module()
        fixes.wrapped = torch.nn.Embedding(10, width)
        fixes.textual_inversion_key = key
        self.wrapped = SimpleNamespace(model=SimpleNamespace(token_embedding=fixes))
        self.width, self.is_trainable, self.input_key = width, False, "txt"
        self.vec: torch.Tensor | None = None  # what the host's splice would put in

    def encode_embedding_init_text(self, text: str, n: int) -> torch.Tensor:
        raise AssertionError("not used by the backend")

    def forward(self, texts: list[str]) -> torch.Tensor:
        rows = self.vec.sum(0) if self.vec is not None else torch.zeros(self.width)
        return rows.expand(len(texts), 77, self.width) * 1.0


class _Conditioner(torch.nn.Module):
    """Records the batch and whether each embedder ran with gradient (sgm: no_grad unless is_trainable)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedders = torch.nn.ModuleList([_TextEmbedder("clip_l", 768), _TextEmbedder("clip_g", 1280),
                                              torch.nn.Identity()])
        self.embedders[2].is_trainable = False
        self.seen: dict = {}

    def forward(self, batch: dict) -> dict:
        self.seen = {"batch": batch, "trainable": [e.is_trainable for e in self.embedders],
                     "ucg": [getattr(e, "ucg_rate", None) for e in self.embedders]}
        outs = []
        for embedder in self.embedders[:2]:
            with torch.enable_grad() if embedder.is_trainable else torch.no_grad():
                outs.append(embedder(batch["txt"]))
        sizes = torch.cat([batch[k] for k in ("original_size_as_tuple", "crop_coords_top_left",
                                              "target_size_as_tuple")], dim=1)
        return {"crossattn": torch.cat(outs, dim=2), "vector": sizes}


def test_sdxl_text_feeds_per_sample_sizes_and_lets_gradient_through(host):
    from textual_inversion_ext.backends.a1111.text import SDXLText

    model = SimpleNamespace(conditioner=_Conditioner())
    model.conditioner.embedders[0].ucg_rate = 0.1  # as a config with caption dropout would leave it
    text = SDXLText(model, 1024)
    assert text.encoders == {"clip_l": 768, "clip_g": 1280}
    vec = {"clip_l": torch.ones(2, 768, requires_grad=True), "clip_g": torch.ones(2, 1280, requires_grad=True)}
    host_vec = text.host_vec(vec)
    for embedder, key in zip(model.conditioner.embedders[:2], ("clip_l", "clip_g"), strict=True):
        embedder.vec = host_vec[key]
    geometry = [SampleGeometry((300, 200), (10, 0), (256, 192)), SampleGeometry.uncropped(128, 128)]
    cond = text.encode(["a toy", "a toy"], geometry)
    seen = model.conditioner.seen
    assert seen["batch"]["original_size_as_tuple"].tolist() == [[300, 200], [128, 128]]
    assert seen["batch"]["crop_coords_top_left"].tolist() == [[10, 0], [0, 0]]
    assert seen["batch"]["target_size_as_tuple"].tolist() == [[256, 192], [128, 128]]
    assert seen["trainable"] == [True, True, False] and seen["ucg"][:2] == [0.0, 0.0]
    cond["crossattn"].sum().backward()
    assert vec["clip_l"].grad is not None and vec["clip_g"].grad is not None
    # afterwards the conditioner is as the host left it
    assert [e.is_trainable for e in model.conditioner.embedders] == [False, False, False]
    assert model.conditioner.embedders[0].ucg_rate == 0.1
    default = text.encode(["x"], None)  # previews: whole images at the native size
    assert seen is not model.conditioner.seen and default["vector"].tolist() == [[1024, 1024, 0, 0, 1024, 1024]]


def test_sgm_checkpointing_uses_torch_checkpoint_on_frozen_blocks_and_restores(monkeypatch):
    """sgm's own CheckpointFunction asks for the gradient of every block weight (frozen while training an
    embedding); ours routes its `checkpoint(func, inputs, params, flag)` calls to torch's non-reentrant one."""
    from textual_inversion_ext.backends.a1111.backend import SGM_BLOCK_MODULES
    from textual_inversion_ext.backends.checkpointing import block_checkpointing

    calls = []

    def sgm_checkpoint(func, inputs, params, flag):  # stands in for sgm's (it would fail on frozen params)
        calls.append(flag)
        return func(*inputs)

    fakes = {}
    for name in SGM_BLOCK_MODULES:
        fakes[name] = types.ModuleType(name)
        fakes[name].checkpoint = sgm_checkpoint
        monkeypatch.setitem(sys.modules, name, fakes[name])
    block_module = fakes[SGM_BLOCK_MODULES[1]]

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4).requires_grad_(False)
            self.use_checkpoint = False

        def forward(self, x):
            return block_module.checkpoint(self.lin, (x,), self.parameters(), self.use_checkpoint)

    unet = torch.nn.Sequential(Block(), Block())
    x = torch.randn(2, 4, requires_grad=True)
    plain = torch.autograd.grad(unet(x).sum(), x)[0]
    with block_checkpointing(unet, SGM_BLOCK_MODULES):
        assert all(b.use_checkpoint for b in unet)
        assert block_module.checkpoint is not sgm_checkpoint
        out = unet(x)
        assert out.grad_fn is not None and calls == [False, False]  # sgm's own not called inside
        torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], plain)
    assert block_module.checkpoint is sgm_checkpoint and not any(b.use_checkpoint for b in unet)
