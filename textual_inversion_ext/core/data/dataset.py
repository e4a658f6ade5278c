"""The training set: images encoded to latents once, and a seeded, resumable batch order.

Every random choice is a pure function of (seed, step) or (seed, epoch): resuming at step N
replays exactly what an uninterrupted run would have done from N on.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backend import Backend
from ..errors import DatasetError
from . import images

logger = logging.getLogger(__name__)

ENCODE_BATCH = 4


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across Python runs (unlike hash())."""
    return random.Random(",".join(map(str, parts))).getrandbits(63)


@dataclass
class CachedLatent:
    mean: torch.Tensor  # (C, h, w) float32, CPU
    std: torch.Tensor
    sample: torch.Tensor  # the 'once' sample (or the mean for 'deterministic')


@dataclass
class TrainingSet:
    captions: list[str]
    buckets: list[tuple[int, int]]  # per image, pixel size
    latents: list[dict[bool, CachedLatent]]  # per image: {flipped: latent}
    skipped: list[images.SkippedFile] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)  # per image, where it came from

    def subset(self, indices: Sequence[int]) -> TrainingSet:
        """The images at `indices` (e.g. the training or the held-out part of a validation split)."""
        return TrainingSet([self.captions[i] for i in indices], [self.buckets[i] for i in indices],
                           [self.latents[i] for i in indices], self.skipped,
                           [self.paths[i] for i in indices] if self.paths else [])

    def __len__(self) -> int:
        return len(self.captions)

    def pin(self) -> None:
        """Page-lock every cached latent so host→GPU copies can run asynchronously (CUDA only)."""
        for variants in self.latents:
            for cached in variants.values():
                cached.mean, cached.std = cached.mean.pin_memory(), cached.std.pin_memory()
                cached.sample = cached.sample.pin_memory()

    def latent(self, index: int, flipped: bool, mode: str, gen: torch.Generator) -> torch.Tensor:
        cached = self.latents[index][flipped]
        if mode == "random":
            return cached.mean + cached.std * torch.randn(cached.mean.shape, generator=gen)
        return cached.sample


def prepare(
    backend: Backend,
    scan: images.DatasetScan,
    *,
    resolution: int,
    use_buckets: bool,
    with_flips: bool,
    latent_sampling: str,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainingSet:
    """Load, crop and encode every usable image once (and its mirror image when flips are on)."""
    if not scan.items:
        raise DatasetError("The dataset has no usable images.")
    skipped = list(scan.report)
    captions: list[str] = []
    sizes: list[tuple[int, int]] = []
    pixels: list[torch.Tensor] = []
    paths: list[Path] = []
    for item in scan.items:
        try:
            img = images.load_rgb(item.path)
        except Exception as exc:  # a file that changed or broke since the scan: report it, keep going
            skipped.append(images.SkippedFile(item.path, f"could not be read: {exc}"))
            continue
        size = (
            images.choose_bucket(img.width, img.height, resolution)
            if use_buckets
            else (resolution, resolution)
        )
        pixels.append(images.to_tensor(images.resize_and_crop(img, size)))
        captions.append(item.caption)
        sizes.append(size)
        paths.append(item.path)
    if not captions:
        raise DatasetError("None of the dataset images could be read; see the skipped-file report.")

    variants = (False, True) if with_flips else (False,)
    latents: list[dict[bool, CachedLatent]] = [{} for _ in captions]
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, size in enumerate(sizes):
        by_size[size].append(i)
    total, done = len(captions) * len(variants), 0
    for indices in by_size.values():
        for start in range(0, len(indices), ENCODE_BATCH):
            chunk = indices[start : start + ENCODE_BATCH]
            batch = torch.stack([pixels[i] for i in chunk])
            for flipped in variants:
                if should_stop():
                    raise DatasetError("Interrupted while encoding the dataset.")
                x = torch.flip(batch, dims=[3]) if flipped else batch
                dist = backend.encode_images(x.to(backend.device))
                for row, i in enumerate(chunk):
                    mean = dist.mean[row].detach().float().cpu()
                    std = dist.std[row].detach().float().cpu()
                    latents[i][flipped] = CachedLatent(
                        mean, std, _fixed_sample(mean, std, latent_sampling, derive_seed(seed, i, int(flipped)))
                    )
                done += len(chunk)
                if progress:
                    progress(done, total)
    if len(by_size) > 1:
        logger.info("Aspect buckets: %s", ", ".join(f"{w}x{h}: {len(v)}" for (w, h), v in by_size.items()))
    return TrainingSet(captions, sizes, latents, skipped, paths)


def _fixed_sample(mean: torch.Tensor, std: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    if mode == "deterministic":
        return mean
    gen = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(mean.shape, generator=gen)


class BatchOrder:
    """Same-size batches; every image once per epoch (partial batches filled from the same size)."""

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, seed: int) -> None:
        self.seed = seed
        self.batch_size = batch_size
        self.groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, size in enumerate(sizes):
            self.groups[size].append(i)
        self.batches_per_epoch = sum(-(-len(g) // batch_size) for g in self.groups.values())
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(derive_seed(self.seed, epoch, 0xBA7C))
        batches: list[list[int]] = []
        for size in sorted(self.groups):
            members = list(self.groups[size])
            rng.shuffle(members)
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                while len(batch) < self.batch_size:  # fill so every batch has one shape and full size
                    batch.append(rng.choice(members))
                batches.append(batch)
        rng.shuffle(batches)
        self._cache = (epoch, batches)
        return batches

    def batch(self, global_index: int) -> tuple[int, list[int]]:
        """(epoch, image indices) of the n-th micro-batch of the whole run."""
        epoch, offset = divmod(global_index, self.batches_per_epoch)
        return epoch, self.epoch_batches(epoch)[offset]
