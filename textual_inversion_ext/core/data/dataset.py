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

from ..backend import Backend, SampleGeometry
from ..errors import DatasetError
from . import alpha, images

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
    weight: torch.Tensor | None = None  # (1, h, w) loss weight from the alpha; None = 1 everywhere


@dataclass
class TrainingSet:
    captions: list[str]
    buckets: list[tuple[int, int]]  # per image, pixel size
    latents: list[dict[bool, CachedLatent]]  # per image: {flipped: latent}
    skipped: list[images.SkippedFile] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)  # per image, where it came from
    geometry: list[SampleGeometry] = field(default_factory=list)  # per image, how it was cut (size conditioning)

    def subset(self, indices: Sequence[int]) -> TrainingSet:
        """The images at `indices` (e.g. the training or the held-out part of a validation split)."""
        return TrainingSet([self.captions[i] for i in indices], [self.buckets[i] for i in indices],
                           [self.latents[i] for i in indices], self.skipped,
                           [self.paths[i] for i in indices] if self.paths else [],
                           [self.geometry[i] for i in indices] if self.geometry else [])

    def geometries(self, indices: Sequence[int]) -> list[SampleGeometry] | None:
        """The geometry of the images at `indices` (a flipped copy has its original's); None when not recorded."""
        return [self.geometry[i] for i in indices] if self.geometry else None

    def __len__(self) -> int:
        return len(self.captions)

    def pin(self) -> None:
        """Page-lock every cached latent so host→GPU copies can run asynchronously (CUDA only)."""
        for variants in self.latents:
            for cached in variants.values():
                cached.mean, cached.std = cached.mean.pin_memory(), cached.std.pin_memory()
                cached.sample = cached.sample.pin_memory()
                if cached.weight is not None:
                    cached.weight = cached.weight.pin_memory()

    def latent(self, index: int, flipped: bool, mode: str, gen: torch.Generator) -> torch.Tensor:
        cached = self.latents[index][flipped]
        if mode == "random":
            return cached.mean + cached.std * torch.randn(cached.mean.shape, generator=gen)
        return cached.sample

    def weights(self, indices: Sequence[int], flips: Sequence[bool]) -> torch.Tensor | None:
        """Loss weights `(B, 1, h, w)` of a (same-size) batch; None when no image in it has any, so the loss
        stays the plain mean. An image without transparency weighs 1 everywhere."""
        return stack_weights([self.latents[i][f].weight for i, f in zip(indices, flips)])


def stack_weights(maps: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Per-image weight maps `(1, h, w)` as a batch `(B, 1, h, w)`, 1 for an image without one; None if none has."""
    shape = next((m.shape for m in maps if m is not None), None)
    if shape is None:
        return None
    return torch.stack([torch.ones(shape) if m is None else m for m in maps])


def prepare(
    backend: Backend,
    scan: images.DatasetScan,
    *,
    resolution: int,
    use_buckets: bool,
    with_flips: bool,
    latent_sampling: str,
    seed: int,
    alpha_weight: bool = False,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainingSet:
    """Load, crop and encode every usable image once (and its mirror image when flips are on).

    Streamed per bucket chunk: ENCODE_BATCH images are decoded, encoded and their pixels dropped before the
    next chunk is decoded, so peak RAM does not grow with the dataset (only the small latents stay).
    `alpha_weight`: cache a loss-weight map from each image's alpha beside its latent (see `alpha`)."""
    if not scan.items:
        raise DatasetError("The dataset has no usable images.")
    skipped = list(scan.report)
    variants = (False, True) if with_flips else (False,)
    buckets = [images.choose_bucket(item.width, item.height, resolution) if use_buckets else (resolution, resolution)
               for item in scan.items]
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)  # bucket -> indices into scan.items
    for k, size in enumerate(buckets):
        by_size[size].append(k)
    encoded: dict[int, dict[bool, CachedLatent]] = {}  # 'sample' filled in below, once the order is known
    geometry: dict[int, SampleGeometry] = {}
    total, done = len(scan.items) * len(variants), 0
    for size, members in by_size.items():
        for start in range(0, len(members), ENCODE_BATCH):
            if should_stop():
                raise DatasetError("Interrupted while encoding the dataset.")
            chunk = members[start : start + ENCODE_BATCH]
            loaded = [(k, _load(scan.items[k], size, alpha_weight, skipped)) for k in chunk]
            kept = [(k, *x) for k, x in loaded if x is not None]
            geometry.update((k, cut) for k, _, _, cut in kept)
            batch = torch.stack([pixels for _, pixels, _, _ in kept]) if kept else None
            for flipped in variants:
                if should_stop():
                    raise DatasetError("Interrupted while encoding the dataset.")
                if batch is not None:
                    dist = backend.encode_images((torch.flip(batch, dims=[3]) if flipped else batch).to(backend.device))
                    for row, (k, _, pixel_weight, _) in enumerate(kept):
                        mean, std = dist.mean[row].detach().float().cpu(), dist.std[row].detach().float().cpu()
                        if pixel_weight is not None and flipped:
                            pixel_weight = torch.flip(pixel_weight, dims=[2])
                        weight = alpha.latent_weight(pixel_weight, tuple(mean.shape[-2:]))
                        encoded.setdefault(k, {})[flipped] = CachedLatent(mean, std, mean, weight)
                done += len(loaded)
                if progress:
                    progress(done, total)
            del loaded, kept, batch  # the chunk's pixels go before the next chunk is decoded
    if not encoded:
        raise DatasetError("None of the dataset images could be used; see the skipped-file report.")
    if len(by_size) > 1:
        logger.info("Aspect buckets: %s", ", ".join(f"{w}x{h}: {len(v)}" for (w, h), v in by_size.items()))
    # Scan order, and 'once' samples seeded by the place in it: the same set as when all was decoded first.
    order = sorted(encoded)
    for i, k in enumerate(order):
        for flipped, cached in encoded[k].items():
            cached.sample = _fixed_sample(cached.mean, cached.std, latent_sampling, derive_seed(seed, i, int(flipped)))
    return TrainingSet([scan.items[k].caption for k in order], [buckets[k] for k in order],
                       [encoded[k] for k in order], skipped, [scan.items[k].path for k in order],
                       [geometry[k] for k in order])


def _load(item: images.ImageItem, size: tuple[int, int], alpha_weight: bool, skipped: list[images.SkippedFile]
          ) -> tuple[torch.Tensor, torch.Tensor | None, SampleGeometry] | None:
    """Pixels `(3, H, W)` at `size`, with `alpha_weight` the pixel weight `(1, H, W)` (None = opaque), and how
    the image was cut; None (and a report line) for an image that broke since the scan or has nothing visible."""
    try:
        source = images.load_rgb(item.path)
        _, crop = images.cover_box(*source.size, size)
        cut = SampleGeometry((source.height, source.width), crop, (size[1], size[0]))
        pixels = images.to_tensor(images.resize_and_crop(source, size))
        weight = alpha.pixel_weight(alpha.load_alpha(item.path), size) if alpha_weight else None
    except Exception as exc:  # a file that changed or broke since the scan: report it, keep going
        skipped.append(images.SkippedFile(item.path, f"could not be read: {exc}"))
        return None
    if alpha.too_transparent(weight):
        skipped.append(images.SkippedFile(item.path, alpha.TRANSPARENT_REASON))
        return None
    return pixels, weight, cut


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
