"""The TI task: learn an embedding for the held-out concept from 5 renders with the project's own
trainer (public interfaces only), then score every snapshot and the init-text baseline."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from textual_inversion_ext.backends.standalone import StandaloneBackend
from textual_inversion_ext.core import formats
from textual_inversion_ext.core.create import CreateParams, create_embedding
from textual_inversion_ext.core.data.templates import load_template
from textual_inversion_ext.core.training.run import RunRequest, run_training
from textual_inversion_ext.core.training.train_params import TrainParams
from textual_inversion_ext.core.training.validation import ValidationSet

from . import classifier as clf
from . import sampling, world

logger = logging.getLogger(__name__)

NAME = "zorbix"  # the trigger word: a made-up word the pretrained model never saw


@dataclass(frozen=True)
class TaskConfig:
    init_text: str = "shape"
    max_steps: int = 600
    save_every: int = 50
    learn_rate: str | None = None  # None: the trainer's default
    template: str | None = None  # None: the trainer's default
    num_vectors: int = 0  # 0: one per init-text token (the default)
    images_per_prompt: int = 48
    sample_steps: int = 20
    cfg_scale: float = 3.0
    floor: float = 0.8  # editability floor for choosing a step


@dataclass
class Row:
    label: str  # "init", a step number, or "text" (the concept named in words, for reference)
    step: int | None
    val_loss: float | None
    fidelity: float
    editability: float
    # Share of the fidelity images with each concept attribute right on its own (what is missing).
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskResult:
    rows: list[Row]
    best_step: int | None  # max fidelity with editability >= floor
    val_step: int | None  # lowest validation loss
    trainer_best_step: int | None  # what the trainer itself reports, when it does
    seconds: dict[str, float] = field(default_factory=dict)
    # Row label -> the first SAMPLES images of each prompt (fidelity, then editability), for a look.
    samples: dict[str, torch.Tensor] = field(default_factory=dict)


SAMPLES = 6


def write_dataset(folder: Path, world_config: world.WorldConfig, seed: int) -> list[Path]:
    """Five renders of the concept on non-red backgrounds; captions name everything but the subject."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 100)
    paths = []
    for i, background in enumerate(world_config.concept_backgrounds):
        spec = world_config.concept_spec(background)
        path = folder / f"concept-{i:02d}.png"
        Image.fromarray(world.render(spec, rng)).save(path)
        path.with_suffix(".txt").write_text(world.background_words(background) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def score(backend: StandaloneBackend, reader: clf.AttributeClassifier, world_config: world.WorldConfig,
          config: TaskConfig, trigger: str, vectors: dict[str, torch.Tensor], subject: str | None = None,
          seed: int = 0) -> tuple[float, float, dict[str, float], torch.Tensor]:
    """(fidelity, editability, parts, samples). Fidelity: share of 'a photo of <name>' images read as the concept
    (texture, colour and shape); editability: share of '<name> on a red background' images with a red
    background and the concept intact; parts: per concept attribute, the share of fidelity images that
    have it right; samples: the first SAMPLES images of each prompt. `subject` replaces the trigger by
    words (the reference row)."""
    name = subject or trigger
    n = config.images_per_prompt
    prompts = [f"a photo of {name}"] * n + [f"{name} {world.background_words(world_config.edit_background)}"] * n
    images = sampling.generate(backend, prompts, trigger=trigger, vectors=vectors, seed=seed,
                               steps=config.sample_steps, cfg_scale=config.cfg_scale)
    pred = reader.predict(images)
    want = world_config.concept_spec(world_config.edit_background).index()
    concept_ok = (pred[:, 0] == want[0]) & (pred[:, 1] == want[1]) & (pred[:, 2] == want[2])
    red_ok = pred[:, 3] == want[3]
    fidelity = float(concept_ok[:n].float().mean())
    editability = float((concept_ok[n:] & red_ok[n:]).float().mean())
    parts = {attribute: float((pred[:n, i] == want[i]).float().mean())
             for i, attribute in enumerate(world.ATTRIBUTES[:3])}
    samples = torch.cat([images[:SAMPLES], images[n : n + SAMPLES]])
    return fidelity, editability, parts, samples


def choose(rows: list[Row], floor: float) -> tuple[int | None, int | None]:
    """(step with the highest fidelity at editability >= floor, step with the lowest validation loss);
    ties go to the earlier step."""
    trained = [r for r in rows if r.step is not None and r.step > 0]
    ok = [r for r in trained if r.editability >= floor]
    best = max(ok, key=lambda r: (r.fidelity, r.editability, -r.step)).step if ok else None
    with_loss = [r for r in trained if r.val_loss is not None]
    val = min(with_loss, key=lambda r: (r.val_loss, r.step)).step if with_loss else None
    return best, val


def run_task(backend: StandaloneBackend, reader: clf.AttributeClassifier, world_config: world.WorldConfig,
             config: TaskConfig, work: Path, *, seed: int = 0, with_text_bound: bool = True) -> TaskResult:
    seconds: dict[str, float] = {}
    data_dir = work / "data"
    write_dataset(data_dir, world_config, seed)
    created = create_embedding(backend, CreateParams(name=NAME, init_text=config.init_text,
                                                     num_vectors=config.num_vectors, overwrite=True),
                               work / "embeddings")
    # Output-only settings: validate where we snapshot (every snapshot, whatever the budget), no previews, no grid.
    params = TrainParams(max_steps=config.max_steps, save_every=config.save_every, val_every=config.save_every,
                         val_budget=0.0, preview_every=0, comparison_grid=False, seed=seed)
    if config.learn_rate is not None:
        params.learn_rate = config.learn_rate
    if config.template is not None:
        params.template = config.template
    started = time.perf_counter()
    outcome = run_training(backend, RunRequest(created.path, data_dir, work / "logs", params), status=logger.info)
    seconds["ti_train_s"] = time.perf_counter() - started
    if outcome.result.status != "finished":
        raise RuntimeError(f"TI training did not finish: {outcome.result.message}")
    lines = load_template(params.template)
    # The trainer's own validation curve; the same fixed-noise loss here for a step it did not cover.
    trainer_val = dict(outcome.result.validation)
    snapshots = {formats.load_embedding(p).embedding.step: p for p in outcome.result.snapshots}
    snapshots.pop(0, None)  # the start vectors: scored as the init row
    started = time.perf_counter()
    rows, samples = [], {}
    scored = [("init", 0, created.embedding.vectors)] + [
        (str(s), s, formats.load_embedding(p).embedding.vectors) for s, p in sorted(snapshots.items())
    ]
    # Losses from one definition only: the trainer's when it covers every scored step, else our own.
    if not all(step in trainer_val for _, step, _ in scored):
        trainer_val = {}
    for label, step, vectors in scored:
        loss = trainer_val.get(step)
        if loss is None:
            loss = ValidationSet(backend, outcome.data, NAME, lines, timesteps_per_image=4, seed=seed).loss(vectors)
        fid, edit, parts, samples[label] = score(backend, reader, world_config, config, NAME, vectors, seed=seed)
        rows.append(Row(label, step, float(loss), fid, edit, parts))
        logger.info("step %s: val loss %.5f fidelity %.3f editability %.3f", label, loss, fid, edit)
    if with_text_bound:
        texture, colour, shape = world_config.concept
        fid, edit, parts, samples["text"] = score(backend, reader, world_config, config, NAME, {},
                                                  subject=f"a {texture} {colour} {shape}", seed=seed)
        rows.append(Row("text", None, None, fid, edit, parts))
    seconds["scoring_s"] = time.perf_counter() - started
    best, val = choose(rows, config.floor)
    return TaskResult(rows, best, val, outcome.result.best_step, seconds, samples)
