"""The reduced quality world of `tests/test_quality.py`, shipped as one small file.

The benchmark's model at smaller widths with about a quarter of its pretraining (benchmarks/README.md):
building it takes about 8 CPU-minutes, so the test loads `reduced-world.safetensors` instead. Rebuild
it after a change that alters the weights (bump `pretrain.CODE_VERSION`, or change a config below):

  .venv/bin/python benchmarks/quality_reduced.py           # rebuild and write the file (one thread)
  .venv/bin/python benchmarks/quality_reduced.py --check   # rebuild in memory, compare, write nothing

The file holds the weights in float16 (half the size; the test scores the model the file holds) and,
of the text encoder's 49 408-row token table, only the rows pretraining changed: the rest are the
seeded initial rows, rebuilt on load and checked against a hash. Its metadata holds the cache key
(world, model, pretraining and classifier configs, seed, `CODE_VERSION`): a file that does not match
the code is refused with the command that rebuilds it, never used silently."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from textual_inversion_ext.backends.standalone import StandaloneBackend
from textual_inversion_ext.core.fileio import atomic_write_bytes

from . import classifier as clf
from . import pretrain, world

SEED = 0
SHIPPED = Path(__file__).with_name("reduced-world.safetensors")
REBUILD = "python benchmarks/quality_reduced.py"
STORE_DTYPE = torch.float16
_TOKENS = "embeddings.token_embedding.weight"
_MODULES = ("unet", "vae", "text_encoder", "classifier")

# About a quarter of the benchmark's pretraining compute. Half of this (VAE 600, text 150, UNet 1000 steps) gave
# a model whose embedding brought the star back under torch 2.11 but not under 2.14: too close to the edge for a
# file rebuilt on other versions (benchmarks/README.md, "The reduced version").
PRETRAIN = pretrain.PretrainConfig(vae_steps=1200, vae_batch=16, vae_lr=5e-3, pool=1000, text_steps=300,
                                   text_batch=32, unet_steps=2500, unet_batch=16, unet_lr=5e-3)
CLASSIFIER = clf.ClassifierConfig(pool=1000, steps=120)


class StaleWorldFile(RuntimeError):
    """The file was built by other code or configs than the ones here, or is not a world file."""


def model_dict() -> dict:
    """The benchmark's architecture at smaller widths (still a 4x VAE and cross-attention)."""
    model = pretrain.default_model_dict()
    model["vae"]["block_out_channels"] = [16, 16, 16]
    model["unet"]["block_out_channels"] = [16, 32, 32]
    return model


def key() -> str:
    return pretrain.cache_key(world.WorldConfig(), model_dict(), PRETRAIN, CLASSIFIER, SEED)


def build() -> pretrain.WorldModel:
    """Pretrain from scratch on one thread (the weights depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain.world_model(world.WorldConfig(), seed=SEED, model=model_dict(), pretrain=PRETRAIN,
                                    classifier_config=CLASSIFIER, use_cache=False)
    finally:
        torch.set_num_threads(threads)


def _initial_tokens(model: dict, seed: int) -> torch.Tensor:
    return pretrain.make_backend(model, seed).text_encoder.state_dict()[_TOKENS]


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def pack(wm: pretrain.WorldModel, *, model: dict, seed: int, classifier_width: int,
         cache_key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a world file for `wm`, built from `model` and `seed`."""
    modules = {"unet": wm.backend.unet, "vae": wm.backend.vae, "text_encoder": wm.backend.text_encoder,
               "classifier": wm.classifier}
    tensors: dict[str, torch.Tensor] = {}
    for name in _MODULES:
        for k, v in modules[name].state_dict().items():
            if name == "text_encoder" and k == _TOKENS:
                continue
            v = v.detach().cpu()
            tensors[f"{name}.{k}"] = (v.to(STORE_DTYPE) if v.is_floating_point() else v).contiguous()
    initial = _initial_tokens(model, seed)
    trained = modules["text_encoder"].state_dict()[_TOKENS].detach().cpu()
    changed = (trained != initial).any(dim=1).nonzero().flatten()
    tensors["token_rows.index"] = changed.to(torch.int32).contiguous()
    tensors["token_rows.values"] = trained[changed].to(STORE_DTYPE).contiguous()
    meta = {"key": cache_key, "model": json.dumps(model, sort_keys=True), "seed": str(seed),
            "classifier_width": str(classifier_width),
            "scaling_factor": repr(float(wm.backend.vae.config.scaling_factor)),
            "initial_tokens_sha256": _digest(initial), "rebuild": REBUILD}
    return tensors, meta


def write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Atomically, so an interrupted rebuild never leaves a half-written file for the test to read."""
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
    except FileNotFoundError as exc:
        raise StaleWorldFile(f"{path} is missing: rebuild it with `{REBUILD}`.") from exc


def load(path: Path = SHIPPED, *, expect_key: str | None = None) -> tuple[StandaloneBackend, clf.AttributeClassifier]:
    """The backend (float32) and classifier a world file holds. `expect_key`: refuse a file built for another
    key (StaleWorldFile, naming the command that rebuilds it)."""
    tensors, meta = read(path)
    if expect_key is not None and meta.get("key") != expect_key:
        raise StaleWorldFile(
            f"{path} was built for key {meta.get('key')!r}; the code and configs now give {expect_key!r} "
            f"(pretrain.CODE_VERSION or a config in {Path(__file__).name} changed). Rebuild it with `{REBUILD}` "
            "(about 8 CPU-minutes) and commit the new file.")
    model, seed = json.loads(meta["model"]), int(meta["seed"])
    model["vae"]["scaling_factor"] = float(meta["scaling_factor"])
    backend = pretrain.make_backend(model, seed)
    reader = clf.AttributeClassifier(int(meta["classifier_width"]))
    modules = {"unet": backend.unet, "vae": backend.vae, "text_encoder": backend.text_encoder, "classifier": reader}
    for name in _MODULES:
        prefix = name + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if name == "text_encoder":
            tokens = modules[name].state_dict()[_TOKENS].clone()
            if _digest(tokens) != meta["initial_tokens_sha256"]:
                raise StaleWorldFile(
                    f"The seeded initial token table differs from the one {path} was built on (another torch "
                    f"or transformers version initialises it differently). Rebuild the file with `{REBUILD}`.")
            tokens[tensors["token_rows.index"].long()] = tensors["token_rows.values"].to(tokens.dtype)
            state[_TOKENS] = tokens
        modules[name].load_state_dict(state)  # strict: a file for another architecture fails here
        modules[name].eval()
    return backend, reader
