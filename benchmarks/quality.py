"""Does a trained embedding bring the subject back? A reproducible TI quality benchmark (issue 6).

A synthetic world (shape × colour × texture × background, rendered at 64×64), a classifier that
reads the attributes back, and a tiny SD1-shaped text-to-image model pretrained on the world with
one (colour, shape) pair held out. Our trainer, at its default settings, learns an embedding for the
held-out concept from 5 renders; every snapshot is scored by what the model then generates:

  fidelity     share of "a photo of <name>" images the classifier reads as the concept
  editability  share of "<name> on a red background" images with a red background and the concept

next to the init-text baseline (step 0) and the concept named in words (a reference). Writes the
table as quality.json, a plot (quality.png) and generated samples (quality-samples.png) to --out. The model
and classifier are cached under ~/.cache/textual_inversion_ext/quality/<hash>/ and rebuilt when the
world, model, pretraining config or CODE_VERSION change.

  python benchmarks/quality.py                      # full run (cold cache: builds the model first)
  python benchmarks/quality.py --quick              # fewer steps and images
  python benchmarks/quality.py --learn-rate 0.02    # judge a trainer setting by its quality
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_world import classifier as clf
from quality_world import pretrain, report, sampling, task, world

logger = logging.getLogger("quality")


def pretrained_accuracy(wm: pretrain.WorldModel, world_config: world.WorldConfig, *, per_spec: int, steps: int,
                        cfg_scale: float, seed: int) -> dict[str, float]:
    """Share of generations from full prompts of seen combinations that the classifier reads right."""
    specs = world.seen_specs(world_config) * per_spec
    prompts = [f"a photo of a {world.subject_words(s)}, {world.background_words(s.background)}" for s in specs]
    images = sampling.generate(wm.backend, prompts, seed=seed + 7, steps=steps, cfg_scale=cfg_scale)
    return clf.accuracy(wm.classifier, images, world.labels(specs))


def classifier_accuracy(wm: pretrain.WorldModel, seed: int, count: int = 1000) -> dict[str, float]:
    x, y = clf.batch_of(world.all_specs(), count, random.Random(seed + 12345))
    return clf.accuracy(wm.classifier, x, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="TI max steps (default 600; --quick 300)")
    parser.add_argument("--save-every", type=int, default=None, help="snapshot interval (default 50; --quick 100)")
    parser.add_argument("--images", type=int, default=None, help="images per prompt and snapshot (default 48)")
    parser.add_argument("--quick", action="store_true", help="fewer TI steps and images (same cached model)")
    parser.add_argument("--learn-rate", default=None, help="override the trainer's default learning rate")
    parser.add_argument("--template", default=None, help="override the trainer's default template")
    parser.add_argument("--init-text", default="shape")
    parser.add_argument("--vectors", type=int, default=0, help="vectors per token (0: the default)")
    parser.add_argument("--floor", type=float, default=0.8, help="editability floor for choosing a step")
    parser.add_argument("--out", type=Path, default=Path("quality-output"))
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default ~/.cache/...)")
    parser.add_argument("--no-cache", action="store_true", help="rebuild the model and do not store it")
    # One thread by default: the numbers depend on the thread count (reduction order), and on a busy
    # 2-core machine two threads ran 4-7x slower than one.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("textual_inversion_ext", "quality_world.task"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()

    world_config = world.WorldConfig()
    wm = pretrain.world_model(world_config, seed=args.seed, cache_root=args.cache, use_cache=not args.no_cache)
    timings = {"model_" + k: v for k, v in wm.timings.items()} if wm.built else {}
    timings["load_or_build_s"] = time.perf_counter() - started

    config = task.TaskConfig(
        init_text=args.init_text,
        max_steps=args.steps or (300 if args.quick else 600),
        save_every=args.save_every or (100 if args.quick else 50),
        learn_rate=args.learn_rate,
        template=args.template,
        num_vectors=args.vectors,
        images_per_prompt=args.images or (24 if args.quick else 48),
        floor=args.floor,
    )
    t0 = time.perf_counter()
    reader_acc = classifier_accuracy(wm, args.seed)
    seen_acc = pretrained_accuracy(wm, world_config, per_spec=1 if args.quick else 2, steps=config.sample_steps,
                                   cfg_scale=config.cfg_scale, seed=args.seed)
    timings["pretrained_check_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="ti-quality-") as work:
        result = task.run_task(wm.backend, wm.classifier, world_config, config, Path(work), seed=args.seed)
    timings.update(result.seconds)
    timings["total_s"] = time.perf_counter() - started

    texture, colour, shape = world_config.concept
    print(f"\nModel cache: {wm.cache_dir} ({'built now' if wm.built else 'loaded'})")
    print(f"Classifier on fresh renders: {reader_acc['all']:.3f} all attributes right "
          f"({', '.join(f'{k} {v:.3f}' for k, v in reader_acc.items() if k != 'all')})")
    print(f"Pretrained model on seen combinations: {seen_acc['all']:.3f} of generations read right "
          f"({', '.join(f'{k} {v:.3f}' for k, v in seen_acc.items() if k != 'all')})")
    print(f"\nConcept: '{texture} {colour} {shape}' (held out of pretraining), init text {config.init_text!r}, "
          f"learn rate {config.learn_rate or 'default'}, template {config.template or 'default'}, "
          f"{config.images_per_prompt} images per prompt\n")
    print(report.table(result.rows))
    print(f"\nBest step (max fidelity at editability >= {config.floor:g}): {result.best_step}")
    print(f"Step with the lowest validation loss: {result.val_step}"
          + (f" (trainer's best_step: {result.trainer_best_step})" if result.trainer_best_step is not None else ""))
    print("Timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))

    args.out.mkdir(parents=True, exist_ok=True)
    record = {"seed": args.seed, "config": asdict(config), "threads": args.threads,
              "classifier_accuracy": reader_acc, "pretrained_accuracy_seen": seen_acc, "timings": timings,
              "cache": str(wm.cache_dir)}
    report.write_json(args.out / "quality.json", json.loads(json.dumps(record, default=str)), result)
    png = report.plot(args.out / "quality.png", result, config.floor,
                      f"TI on held-out '{texture} {colour} {shape}' (seed {args.seed})")
    picked = ["init", *(str(s) for s in (result.best_step, result.val_step) if s is not None), "text"]
    sheet = report.sample_sheet(args.out / "quality-samples.png", result, list(dict.fromkeys(picked)))
    print(f"Wrote {args.out / 'quality.json'}, {png} and {sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
