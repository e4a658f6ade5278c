"""Dataset preparation memory (issue 12.10): peak RSS of encoding N_small vs N synthetic images on the
embedded tiny model.

Each run is its own process, so peak RSS (`ru_maxrss`) is that run's own. Preparation is streamed per bucket
chunk (decode ENCODE_BATCH images, encode, drop the pixels), so the peak must not grow with the number of
images beyond the latent cache itself (mean, std and 'once' sample per image and flip), which is reported
beside it. Before streaming, every decoded image stayed in RAM until all were decoded (3 × H × W float32
each: ~7 MB at 768 px, ~3.5 GB for 500 images).

    .venv/bin/python benchmarks/dataset_memory.py                          # 50 vs 500 images at 512 px
    .venv/bin/python benchmarks/dataset_memory.py --size 256 --flips       # quicker; flipped copies too
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def generate(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """Photo-like JPEGs at the training size (decoding stays cheap; the pixels are what we measure)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
        base = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, (size, size, 1), dtype=np.int16)
        Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8), "RGB").save(
            folder / f"photo {i:05d}.jpg", quality=90)


def child(folder: str, count: int, size: int, flips: bool) -> None:
    """One measured run (in its own process) on the first `count` images; prints a JSON line."""
    sys.path.insert(0, str(REPO))
    import torch

    from textual_inversion_ext.backends.standalone import embedded_default
    from textual_inversion_ext.core.data import images
    from textual_inversion_ext.core.data.dataset import prepare

    torch.set_num_threads(1)
    backend = embedded_default("tiny", device="cpu")
    with torch.no_grad():  # the encoder's own working memory at this size, so it is in the baseline
        backend.encode_images(torch.zeros(4, 3, size, size))
    baseline = _peak_rss_mb()
    scan = images.scan_dataset(folder)
    scan.items = scan.items[:count]
    start = time.perf_counter()
    data = prepare(backend, scan, resolution=size, use_buckets=False, with_flips=flips, latent_sampling="once",
                   seed=0)
    seconds = time.perf_counter() - start
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for variants in data.latents for c in variants.values() for t in (c.mean, c.std, c.sample)}
    print(json.dumps({"images": len(data), "seconds": seconds, "baseline_rss_mb": baseline,
                      "peak_rss_mb": _peak_rss_mb(), "cache_mb": sum(storages.values()) / 2**20}))


def measure(folder: Path, count: int, size: int, flips: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), str(count), str(size), str(int(flips))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500, help="Images in the large run.")
    parser.add_argument("--small", type=int, default=50, help="Images in the small run.")
    parser.add_argument("--size", type=int, default=512, help="Image and training side in pixels.")
    parser.add_argument("--flips", action="store_true", help="Also encode the flipped copies.")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), bool(int(args.child[3])))
        return 0
    with tempfile.TemporaryDirectory(prefix="dataset-memory-bench-") as tmp:
        folder = Path(tmp) / "images"
        t = time.perf_counter()
        generate(folder, args.images, args.size)
        print(f"generated {args.images} {args.size}×{args.size} JPEGs in {time.perf_counter() - t:.1f} s; "
              f"pixels per decoded image {3 * 4 * args.size**2 / 2**20:.2f} MB")
        print(f"{'images':>7} {'seconds':>8} {'base RSS':>9} {'peak RSS':>9} {'growth':>8} {'latent cache':>13}")
        rows = []
        for count in (args.small, args.images):
            r = measure(folder, count, args.size, args.flips)
            rows.append(r)
            print(f"{r['images']:>7} {r['seconds']:>8.1f} {r['baseline_rss_mb']:>7.0f}MB {r['peak_rss_mb']:>7.0f}MB "
                  f"{r['peak_rss_mb'] - r['baseline_rss_mb']:>+6.0f}MB {r['cache_mb']:>11.1f}MB")
        small, large = rows
        growth = large["peak_rss_mb"] - small["peak_rss_mb"]
        cache = large["cache_mb"] - small["cache_mb"]
        print(f"peak RSS {small['images']} → {large['images']} images: {small['peak_rss_mb']:.0f} → "
              f"{large['peak_rss_mb']:.0f} MB ({growth:+.0f} MB, of which the latent cache {cache:+.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
