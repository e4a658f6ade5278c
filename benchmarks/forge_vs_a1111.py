"""Our training inside Forge vs inside A1111, on the same checkpoint, images and settings.

Each host is started fresh (one at a time: the two would not fit beside each other with a full-size model), our
extension creates a 1-vector embedding and trains it through its API; seconds per step come from the loss CSV
rows as they land and peak RSS is sampled from /proc (host_vs_builtin.py's `run_ours`). Defaults: the labs'
scripts and `full-sd15-random` (SD1.5-shaped, random weights) at 256 px.

    .venv/bin/python benchmarks/forge_vs_a1111.py [--size 256] [--steps 12] [--warmup 2]
Environment: A1111_WEBUI / FORGE_WEBUI (webui folders; default $HOME/a1111-lab/webui, $HOME/forge-lab/webui),
A1111_START / FORGE_START (shell commands that restart each host with the checkpoint and return when its API
answers), A1111_STOP / FORGE_STOP.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_vs_builtin import api, make_dataset, run_ours  # a sibling script (benchmarks/ is not a package)

REPO = Path(__file__).resolve().parents[1]
HOME = Path.home()


def host_config(kind: str, checkpoint: str) -> dict:
    if kind == "a1111":
        lab = f"cd {REPO.parent / 'shared' / 'host-lab'}"
        defaults = {"webui": HOME / "a1111-lab" / "webui", "url": "http://127.0.0.1:7860",
                    "start": f"{lab} && ./stop.sh && CKPT={checkpoint} ./start.sh", "stop": f"{lab} && ./stop.sh"}
    else:
        lab = f"cd {REPO / 'tests' / 'host' / 'forge'}"
        defaults = {"webui": HOME / "forge-lab" / "webui", "url": "http://127.0.0.1:7870",
                    "start": f"{lab} && ./stop.sh && CKPT={checkpoint} ./start.sh", "stop": f"{lab} && ./stop.sh"}
    prefix = kind.upper()
    return {"webui": Path(os.environ.get(f"{prefix}_WEBUI", defaults["webui"])),
            "url": os.environ.get(f"{prefix}_URL", defaults["url"]),
            "start": os.environ.get(f"{prefix}_START", defaults["start"]),
            "stop": os.environ.get(f"{prefix}_STOP", defaults["stop"])}


def measure(kind: str, checkpoint: str, size: int, steps: int, warmup: int) -> dict:
    host = host_config(kind, checkpoint)
    subprocess.run(host["start"], shell=True, check=True)
    try:
        pid = int((host["webui"].parent / "run" / "webui.pid").read_text())
        with tempfile.TemporaryDirectory(prefix="tiext-bench-", dir=host["webui"]) as tmp:  # an allowed folder
            data = make_dataset(Path(tmp) / "data", size)
            result = run_ours(host["url"], host["webui"], pid, data, size, steps, {}, warmup=warmup)
        result["model"] = api(host["url"], "/sdapi/v1/options").get("sd_model_checkpoint")
        return result
    finally:
        subprocess.run(host["stop"], shell=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="full-sd15-random.safetensors")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--hosts", default="a1111,forge")
    args = parser.parse_args()
    runs = {kind: measure(kind, args.checkpoint, args.size, args.steps, args.warmup)
            for kind in args.hosts.split(",")}
    result = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "checkpoint": args.checkpoint,
              "size": args.size, "steps": args.steps, "warmup": args.warmup, **runs}
    if {"a1111", "forge"} <= runs.keys():
        a, f = runs["a1111"], runs["forge"]
        if a["s_per_step"] and f["s_per_step"]:
            result["s_per_step_forge_over_a1111"] = f["s_per_step"] / a["s_per_step"]
        if a["train_peak_rss_mb"]:
            result["train_peak_rss_forge_over_a1111"] = f["train_peak_rss_mb"] / a["train_peak_rss_mb"]
    print(json.dumps(result, indent=2))
    return 0 if all(r["ok"] for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
