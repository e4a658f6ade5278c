"""The tiny pretrained text-to-image model: a VAE, a CLIP-shaped text encoder (pretrained on reading
captions' attributes, then frozen) and the UNet, trained on the world with the held-out combinations
left out. Seeded, and cached on disk under a hash of everything
that determines the weights, so a config or code change rebuilds it."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from textual_inversion_ext.backends.standalone import StandaloneBackend
from textual_inversion_ext.backends.standalone.models import build_random, model_config
from textual_inversion_ext.core.backend import ModelInfo
from textual_inversion_ext.core.data.templates import load_template

from . import classifier as clf
from . import world

logger = logging.getLogger(__name__)

CODE_VERSION = 4  # bump when a change here alters the weights a config produces

# The tiny config's SD1 noise schedule with v-prediction (SD2-v's objective, same architecture): with
# epsilon prediction a few CPU-minutes of training left the background, decided at the noisiest
# steps, at chance (31 % on seen combinations); v-prediction learns the noisy end directly.
_SCHEDULER = {**model_config("tiny").scheduler, "prediction_type": "v_prediction"}


def default_model_dict() -> dict:
    """SD1-shaped: 4x VAE (64 px -> 16x16x4 latents), a 3-level UNet with cross-attention at 8x8 and
    in the middle (attention at 16x16 doubled the step time for nothing: attributes are global), and
    a 2-layer, 64-wide CLIP text encoder with the real vocabulary and 77 positions."""
    return {
        "family": "sd1",
        "resolution": world.SIZE,
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [32, 64, 64],
            "cross_attention_dim": 64,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 16,
            "sample_size": world.SIZE // 4,
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": [16, 32, 32],
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": world.SIZE,
            "mid_block_add_attention": False,  # flat shapes need no global attention; saves a third
            "scaling_factor": 1.0,  # replaced by 1/std of the trained latents
        },
        "text_encoder": {
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "hidden_act": "quick_gelu",
            "hidden_size": 64,
            "initializer_range": 0.02,
            "intermediate_size": 128,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "projection_dim": 64,
            "vocab_size": 49408,
        },
        "scheduler": _SCHEDULER,
    }


@dataclass(frozen=True)
class PretrainConfig:
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_crop: int = 32  # convolutions do not care about size: crops give 4x the samples per second
    vae_lr: float = 1e-3
    pool: int = 3000  # renders of seen combinations, encoded to latents once
    unet_steps: int = 2000
    unet_batch: int = 32  # more, smaller updates in the same CPU time as 900 x 64
    unet_lr: float = 2e-3
    warmup: int = 50
    high_noise_from: float = 0.4
    # The text encoder is pretrained on its own (reading captions' attributes back) and then frozen,
    # as SD's CLIP is: trained jointly from scratch with the UNet, the object words never became
    # distinct (benchmarks/README.md).
    text_steps: int = 600
    text_batch: int = 64
    text_lr: float = 3e-3

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WorldModel:
    backend: StandaloneBackend
    classifier: clf.AttributeClassifier
    cache_dir: Path
    built: bool  # False: loaded from the cache
    timings: dict[str, float] = field(default_factory=dict)


def cache_key(world_config: world.WorldConfig, model: dict, pretrain: PretrainConfig,
              classifier: clf.ClassifierConfig, seed: int) -> str:
    blob = json.dumps({"code": CODE_VERSION, "world": world_config.to_dict(), "model": model,
                       "pretrain": pretrain.to_dict(), "classifier": classifier.to_dict(), "seed": seed,
                       "world_code": [world.SHAPES, world.COLOURS, world.TEXTURES, world.BACKGROUNDS,
                                      world.RADIUS, world.POSITION_JITTER]},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "textual_inversion_ext" / "quality"


def make_backend(model: dict, seed: int) -> StandaloneBackend:
    config = model_config(copy.deepcopy(model))
    unet, vae, text_encoder = build_random(config, seed)
    info = ModelInfo(family="sd1", encoders={"default": int(config.text_encoder["hidden_size"])},
                     resolution=int(config.resolution), name=f"quality-world-seed{seed}",
                     short_hash=hashlib.sha256(config.digest().encode()).hexdigest()[:10],
                     prediction=str(config.scheduler["prediction_type"]),
                     vae_scale=2 ** (len(config.vae["block_out_channels"]) - 1))
    return StandaloneBackend(unet, vae, text_encoder, config.scheduler, info)


def _cosine(opt: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _update(opt: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    schedule.step()


def train_vae(backend: StandaloneBackend, config: PretrainConfig, seed: int) -> float:
    """Deterministic autoencoder on every valid combination (a VAE knows no words); returns the final
    reconstruction MSE. The posterior log-variance stays at build_random's low constant."""
    vae = backend.vae
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    pool_x, _ = clf.batch_of(world.all_specs(), 2000, rng)
    opt = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    schedule = _cosine(opt, config.vae_steps, 20)
    vae.train()
    loss = torch.tensor(0.0)
    for step in range(config.vae_steps):
        x = pool_x[torch.randint(0, len(pool_x), (config.vae_batch,), generator=gen)]
        if config.vae_crop < world.SIZE:
            i, j = torch.randint(0, world.SIZE - config.vae_crop + 1, (2,), generator=gen).tolist()
            x = x[:, :, i : i + config.vae_crop, j : j + config.vae_crop]
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        # A small pull on the latents keeps them near the unit scale the UNet's noise assumes.
        loss = (rec - x).pow(2).mean() + 1e-4 * z.pow(2).mean()
        _update(opt, schedule, loss)
        if step % 100 == 0:
            logger.info("VAE step %d loss %.4f", step, float(loss.detach()))
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(pool_x[i : i + 100]).latent_dist.mean for i in range(0, 500, 100)])
        rec = torch.cat([vae.decode(z[i : i + 100]).sample for i in range(0, 500, 100)])
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        return float((rec - pool_x[:500]).pow(2).mean())


def train_denoiser(backend: StandaloneBackend, world_config: world.WorldConfig, config: PretrainConfig,
                   seed: int) -> float:
    """The UNet on seen combinations, conditioned by the frozen text encoder; returns the last loss."""
    rng, gen = random.Random(seed + 1), torch.Generator().manual_seed(seed + 1)
    specs = world.sample_specs(world.seen_specs(world_config), config.pool, rng)
    images = world.to_tensor([world.render(s, rng) for s in specs])
    with torch.no_grad():
        latents = torch.cat([backend.encode_images(images[i : i + 200]).mean for i in range(0, len(images), 200)])
    template_lines = load_template("subject_filewords")
    unet = backend.unet
    for p in unet.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.0)
    schedule = _cosine(opt, config.unet_steps, config.warmup)
    unet.train()
    avg = None
    n_t = backend.num_train_timesteps
    for step in range(config.unet_steps):
        pick = torch.randint(0, len(specs), (config.unet_batch,), generator=gen)
        prompts = [world.training_caption(specs[i], rng, template_lines).text for i in pick.tolist()]
        with torch.no_grad():
            cond = backend.encode_text(prompts, "", {})
        noise = torch.randn(latents[pick].shape, generator=gen)
        # Half the batch at high noise: that is where the prompt decides shape, colour and background,
        # and where a uniform draw gives the conditioning too little gradient to learn in minutes.
        t = torch.randint(0, n_t, (config.unet_batch,), generator=gen)
        high = torch.randint(int(n_t * config.high_noise_from), n_t, (config.unet_batch,), generator=gen)
        t = torch.where(torch.arange(config.unet_batch) % 2 == 0, t, high)
        loss = backend.training_loss(latents[pick], cond, noise, t).mean()
        _update(opt, schedule, loss)
        avg = float(loss.detach()) if avg is None else 0.98 * avg + 0.02 * float(loss.detach())
        if step % 100 == 0:
            logger.info("UNet step %d loss %.4f (avg %.4f)", step, float(loss.detach()), avg)
    unet.eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    return float(avg or 0.0)


def train_text_encoder(backend: StandaloneBackend, world_config: world.WorldConfig, config: PretrainConfig,
                       seed: int) -> float:
    """The text encoder learns to name what a caption names: one linear head per attribute (its
    values plus 'not named') on the mean of the last hidden states, the states the UNet's
    cross-attention reads. Captions of the seen combinations only; returns the last loss."""
    rng = random.Random(seed + 2)
    specs = world.seen_specs(world_config)
    template_lines = load_template("subject_filewords")
    encoder = backend.text_encoder
    width = backend.embedding_dim
    heads = torch.nn.ModuleList(torch.nn.Linear(width, len(world.choices(a)) + 1) for a in world.ATTRIBUTES)
    heads_init = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for head in heads:
            head.weight.copy_(torch.randn(head.weight.shape, generator=heads_init) / width**0.5)
            head.bias.zero_()
    params = [*encoder.parameters(), *heads.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.text_lr, weight_decay=0.0)
    schedule = _cosine(opt, config.text_steps, 20)
    encoder.train()
    loss = torch.tensor(0.0)
    for step in range(config.text_steps):
        captions = [world.training_caption(rng.choice(specs), rng, template_lines) for _ in range(config.text_batch)]
        targets = world.caption_targets(captions)
        pooled = backend.encode_text([c.text for c in captions], "", {}).mean(dim=1)
        loss = sum(F.cross_entropy(head(pooled), targets[:, i]) for i, head in enumerate(heads))
        _update(opt, schedule, loss)
        if step % 100 == 0:
            logger.info("text encoder step %d loss %.4f", step, float(loss.detach()))
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return float(loss.detach())


def _save(folder: Path, backend: StandaloneBackend, classifier: clf.AttributeClassifier, meta: dict) -> None:
    for name, module in (("unet", backend.unet), ("vae", backend.vae), ("text_encoder", backend.text_encoder),
                         ("classifier", classifier)):
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(folder / f"{name}.safetensors"))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")


def _load(folder: Path, model: dict, seed: int, classifier_config: clf.ClassifierConfig
          ) -> tuple[StandaloneBackend, clf.AttributeClassifier, dict]:
    meta = json.loads((folder / "meta.json").read_text("utf-8"))
    model = copy.deepcopy(model)
    model["vae"]["scaling_factor"] = meta["scaling_factor"]
    backend = make_backend(model, seed)
    for name, module in (("unet", backend.unet), ("vae", backend.vae), ("text_encoder", backend.text_encoder)):
        module.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
        module.eval()
    reader = clf.AttributeClassifier(classifier_config.width)
    reader.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    reader.eval()
    return backend, reader, meta


def world_model(world_config: world.WorldConfig, *, seed: int = 0, cache_root: Path | None = None,
                model: dict | None = None, pretrain: PretrainConfig | None = None,
                classifier_config: clf.ClassifierConfig | None = None, use_cache: bool = True) -> WorldModel:
    """The classifier and the pretrained model for this config: from the cache, or built and cached."""
    model = model or default_model_dict()
    pretrain = pretrain or PretrainConfig()
    classifier_config = classifier_config or clf.ClassifierConfig()
    key = cache_key(world_config, model, pretrain, classifier_config, seed)
    root = cache_root or default_cache_root()
    folder = root / key
    if use_cache and (folder / "meta.json").is_file():
        logger.info("Loading the pretrained world model from %s", folder)
        backend, reader, meta = _load(folder, model, seed, classifier_config)
        return WorldModel(backend, reader, folder, built=False, timings=dict(meta.get("timings", {})))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    reader = clf.train_classifier(classifier_config, seed)
    timings["classifier_s"] = time.perf_counter() - started
    started = time.perf_counter()
    backend = make_backend(model, seed)
    vae_mse = train_vae(backend, pretrain, seed)
    timings["vae_s"] = time.perf_counter() - started
    started = time.perf_counter()
    text_loss = train_text_encoder(backend, world_config, pretrain, seed)
    timings["text_encoder_s"] = time.perf_counter() - started
    started = time.perf_counter()
    unet_loss = train_denoiser(backend, world_config, pretrain, seed)
    timings["unet_s"] = time.perf_counter() - started
    meta = {"key": key, "scaling_factor": float(backend.vae.config.scaling_factor), "vae_mse": vae_mse,
            "text_loss": text_loss, "unet_loss": unet_loss, "timings": timings, "seed": seed}
    if use_cache:
        # Atomic: build in a temp folder beside the target, then rename; a concurrent builder's copy wins.
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            _save(tmp, backend, reader, meta)
            os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("Cached the pretrained world model in %s", folder)
    return WorldModel(backend, reader, folder, built=True, timings=timings)
