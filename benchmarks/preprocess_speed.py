"""Preprocessing speed and memory: generated 1024×768 photos → 512×512 crops + flipped copies.

Runs the same preprocess on the first N_small images and on all N images, each in its own process
so peak RSS (ru_maxrss) is that run's own; memory must not grow with the folder size.

    .venv/bin/python benchmarks/preprocess_speed.py                  # 250 vs 1 000 images
    .venv/bin/python benchmarks/preprocess_speed.py --images 200 --small 50 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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


def generate(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """Photo-like JPEGs: smooth colour fields plus grain, a fraction with .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB")
        base = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, (h, w, 1), dtype=np.int16)
        Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8), "RGB").save(
            folder / f"photo {i:05d}.jpg", quality=90)
        if i % 2 == 0:
            (folder / f"photo {i:05d}.txt").write_text(f"a photo, sample {i}", encoding="utf-8")


def _subset(src: Path, dst: Path, count: int) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):  # the first `count` images and their captions
        if int(path.stem.split()[-1]) >= count:
            continue
        try:
            os.link(path, dst / path.name)
        except OSError:
            shutil.copy2(path, dst / path.name)


def child(source: str, destination: str, size: int, workers: int) -> None:
    """One measured run (in its own process); prints a JSON line."""
    sys.path.insert(0, str(REPO))
    from textual_inversion_ext.core.data.preprocess import PreprocessParams, preprocess

    baseline = _peak_rss_mb()
    params = PreprocessParams(source=source, destination=destination, width=size, height=size, flip=True,
                              workers=workers)
    start = time.perf_counter()
    result = preprocess(params)
    seconds = time.perf_counter() - start
    print(json.dumps({"images": result.processed, "outputs": result.outputs, "seconds": seconds,
                      "images_per_s": result.processed / seconds, "baseline_rss_mb": baseline,
                      "peak_rss_mb": _peak_rss_mb(), "problems": len(result.problems)}))


def measure(source: Path, destination: Path, size: int, workers: int) -> dict:
    shutil.rmtree(destination, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", str(source), str(destination), str(size), str(workers)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="Images in the large folder.")
    parser.add_argument("--small", type=int, default=250, help="Images in the small folder.")
    parser.add_argument("--source-size", type=int, nargs=2, default=(1024, 768), metavar=("W", "H"))
    parser.add_argument("--size", type=int, default=512, help="Output side.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 0],
                        help="Worker settings to measure (0 = automatic). Default: 1 0.")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
        return 0
    with tempfile.TemporaryDirectory(prefix="preprocess-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        generate(root / "large", args.images, tuple(args.source_size))
        _subset(root / "large", root / "small", args.small)
        print(f"generated {args.images} {args.source_size[0]}×{args.source_size[1]} JPEGs in "
              f"{time.perf_counter() - t:.1f} s; CPUs: {os.cpu_count()}")
        print(f"{'workers':>8} {'images':>7} {'outputs':>8} {'seconds':>8} {'img/s':>7} "
              f"{'base RSS':>9} {'peak RSS':>9}")
        rows = []
        for workers in args.workers:
            for name in ("small", "large"):
                r = measure(root / name, root / f"{name}-out", args.size, workers)
                rows.append((workers, r))
                print(f"{workers or 'auto':>8} {r['images']:>7} {r['outputs']:>8} {r['seconds']:>8.1f} "
                      f"{r['images_per_s']:>7.1f} {r['baseline_rss_mb']:>7.0f}MB {r['peak_rss_mb']:>7.0f}MB")
        for workers in args.workers:
            small, large = [r for w, r in rows if w == workers]
            growth = large["peak_rss_mb"] - small["peak_rss_mb"]
            print(f"workers={workers or 'auto'}: peak RSS {small['images']} → {large['images']} images: "
                  f"{small['peak_rss_mb']:.0f} → {large['peak_rss_mb']:.0f} MB ({growth:+.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
