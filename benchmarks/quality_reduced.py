"""Build the reduced quality world that tests/test_quality.py loads (quality_world/reduced.py).

  python benchmarks/quality_reduced.py           # pretrain (about 8 CPU-minutes, one thread), write the file
  python benchmarks/quality_reduced.py --check   # pretrain again, compare with the shipped file, write nothing

Deterministic: the same code, configs and torch version give the same bytes (`--check` says so)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_world import reduced

logger = logging.getLogger("quality_reduced")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=reduced.SHIPPED)
    parser.add_argument("--check", action="store_true", help="compare a fresh build with --out; write nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    wm = reduced.build()
    tensors, meta = reduced.pack(wm, model=reduced.model_dict(), seed=reduced.SEED,
                                 classifier_width=reduced.CLASSIFIER.width, cache_key=reduced.key())
    logger.info("Built in %.0f s (%s)", time.perf_counter() - started,
                ", ".join(f"{k} {v:.0f}" for k, v in wm.timings.items()))
    if args.check:
        shipped, shipped_meta = reduced.read(args.out)
        differ = sorted(k for k in tensors.keys() | shipped.keys()
                        if k not in tensors or k not in shipped or not torch.equal(tensors[k], shipped[k]))
        differ += sorted(k for k in meta if meta[k] != shipped_meta.get(k))
        if differ:
            print(f"{args.out} differs from a fresh build in {len(differ)} entries: {', '.join(differ[:8])}")
            return 1
        print(f"{args.out} matches a fresh build ({len(tensors)} tensors, key {meta['key']}).")
        return 0
    reduced.write(args.out, tensors, meta)
    print(f"Wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, key {meta['key']}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
