"""Our training vs the host's built-in Textual Inversion, both inside the same running A1111 webui.

Same embedding spec (1 vector, init "*"), same images (8 synthetic, captioned), steps, batch 1,
lr 0.005, latent sampling "once", square SIZE px, template subject_filewords. The host trains through
/sdapi/v1/train/embedding, ours through /textual-inversion-ext/v1/train. Each step is timed from the
moment its row lands in the run's loss CSV (CSV every step), so neither side is instrumented; peak
RSS of the webui process is sampled from /proc during each run.

    WEBUI_DIR=$LAB/webui .venv/bin/python benchmarks/host_vs_builtin.py [--size 64] [--steps 30]
Needs WEBUI_DIR (the webui folder) and the webui's API (WEBUI_URL, default http://127.0.0.1:7860);
the webui's pid is read from --pid or <WEBUI_DIR>/../run/webui.pid (host-lab layout).

For comparable peak memory each side should start in a fresh webui process (the host's trainer leaves
UNet gradients allocated): pass --restart with a command that restarts the webui and returns when its
API answers, e.g. with the host-lab scripts:

    --restart "cd ../shared/host-lab && ./stop.sh && CKPT=full-sd15-random.safetensors ./start.sh"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw


def api(base: str, path: str, body: object | None = None, timeout: float = 7200) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def make_dataset(root: Path, size: int, n: int = 8, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    for i in range(n):
        fg, bg = rnd.sample(colours, 2)
        img = Image.new("RGB", (size, size), bg)
        m = size // 5
        ImageDraw.Draw(img).ellipse((m, m, size - m, size - m), fill=fg)
        img.save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {fg} circle on {bg}")
    return root


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Watcher(threading.Thread):
    """Polls for the newest loss CSV under `root` and records (time, rows) at every change; samples RSS."""

    def __init__(self, root: Path, pid: int) -> None:
        super().__init__(daemon=True)
        self.root, self.pid = root, pid
        self.stop = threading.Event()
        self.arrivals: list[tuple[float, int]] = []
        self.peak_rss = 0.0

    def run(self) -> None:
        path, size, last_rss = None, -1, 0.0
        while not self.stop.is_set():
            now = time.perf_counter()
            if now - last_rss > 0.1:
                self.peak_rss, last_rss = max(self.peak_rss, rss_mb(self.pid)), now
            if path is None:
                found = sorted(self.root.rglob("textual_inversion_loss.csv"), key=lambda p: p.stat().st_mtime)
                path = found[-1] if found else None
            if path is not None:
                st = path.stat().st_size
                if st != size:
                    size = st
                    rows = max(0, len(path.read_text().splitlines()) - 1)
                    if not self.arrivals or rows != self.arrivals[-1][1]:
                        self.arrivals.append((now, rows))
            time.sleep(0.005)

    def s_per_step(self) -> float | None:
        deltas = [(tb - ta) / (rb - ra) for (ta, ra), (tb, rb) in zip(self.arrivals, self.arrivals[1:]) if rb > ra]
        return statistics.median(deltas) if deltas else None


def run_host(base: str, webui: Path, pid: int, data: Path, size: int, steps: int, tmp: Path) -> dict:
    name = f"tiext-bench-host-{size}-{int(time.time())}"
    api(base, "/sdapi/v1/create/embedding", {"name": name, "num_vectors_per_token": 1, "overwrite_old": True,
                                              "init_text": "*"})
    log_root = tmp / "host-logs"
    body = {
        "id_task": "tiext-bench", "embedding_name": name, "learn_rate": "0.005", "batch_size": 1,
        "gradient_step": 1, "data_root": str(data), "log_directory": str(log_root), "training_width": size,
        "training_height": size, "varsize": False, "steps": steps, "clip_grad_mode": "disabled",
        "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0, "latent_sampling_method": "once",
        "use_weight": False, "create_image_every": 100000, "save_embedding_every": 100000,  # > steps, not 0
        "template_filename": "subject_filewords.txt", "save_image_with_stored_embedding": False,
        "preview_from_txt2img": False, "preview_prompt": "", "preview_negative_prompt": "", "preview_steps": 20,
        "preview_sampler_name": "Euler a", "preview_cfg_scale": 7.0, "preview_seed": -1.0, "preview_width": 512,
        "preview_height": 512,
    }
    watcher = Watcher(log_root, pid)
    rss0 = rss_mb(pid)
    watcher.start()
    t0 = time.perf_counter()
    info = api(base, "/sdapi/v1/train/embedding", body).get("info", "")
    wall = time.perf_counter() - t0
    watcher.stop.set()
    watcher.join()
    (webui / "embeddings" / f"{name}.pt").unlink(missing_ok=True)
    return {"ok": "error: None" in info, "info": info[-200:], "s_per_step": watcher.s_per_step(), "wall_s": wall,
            "rss_before_mb": rss0, "peak_rss_mb": watcher.peak_rss}


def run_ours(base: str, webui: Path, pid: int, data: Path, size: int, steps: int, extra: dict) -> dict:
    name = f"tiext-bench-ours-{size}-{int(time.time())}"
    v1 = "/textual-inversion-ext/v1"
    api(base, f"{v1}/create", {"name": name, "init_text": "*", "num_vectors": 1, "overwrite": True})
    log_root = webui / "textual_inversion_ext" / name  # the default log folder (tiext_log_dir empty)
    watcher = Watcher(log_root, pid)
    rss0 = rss_mb(pid)
    watcher.start()
    t0 = time.perf_counter()
    job = api(base, f"{v1}/train", {
        "name": name, "data_dir": str(data), "max_steps": steps, "batch_size": 1, "learn_rate": "0.005",
        "latent_sampling": "once", "resolution": size, "buckets": False, "template": "subject_filewords",
        "save_every": 0, "preview_every": 0, "csv_every": 1, **extra})["job_id"]
    while True:
        status = api(base, f"{v1}/jobs/{job}?since_step=1000000000")
        if not status["active"]:
            break
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    watcher.stop.set()
    watcher.join()
    for path in (webui / "embeddings").glob(f"{name}.pt*"):
        path.unlink()
    return {"ok": status["status"] == "finished", "info": status["message"][-200:],
            "s_per_step": watcher.s_per_step(), "wall_s": wall, "rss_before_mb": rss0,
            "peak_rss_mb": watcher.peak_rss, "extra": extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pid", type=int, default=None)
    parser.add_argument("--attention", choices=["host", "on", "off"], default="host",
                        help="ours: attention optimizations as the host setting says (default), or forced")
    parser.add_argument("--restart", default=None,
                        help="shell command that restarts the webui (run before each side: fresh process)")
    args = parser.parse_args()
    webui = os.environ.get("WEBUI_DIR")
    if not webui:
        print("set WEBUI_DIR to the webui folder (and start it with --api)", file=sys.stderr)
        return 2
    webui_dir = Path(webui)
    base = os.environ.get("WEBUI_URL", "http://127.0.0.1:7860").rstrip("/")

    def fresh_pid() -> int:
        if args.restart:
            subprocess.run(args.restart, shell=True, check=True)
        return args.pid or int((webui_dir.parent / "run" / "webui.pid").read_text())

    pid = fresh_pid()
    model = api(base, "/sdapi/v1/options").get("sd_model_checkpoint")
    old_csv = api(base, "/sdapi/v1/options").get("training_write_csv_every", 500)
    api(base, "/sdapi/v1/options", {"training_write_csv_every": 1})
    extra = {} if args.attention == "host" else {"attention_optimizations": args.attention == "on"}
    try:
        # Under the web UI's data folder: our API only reads datasets from its allowed folders.
        with tempfile.TemporaryDirectory(prefix="tiext-bench-", dir=webui_dir) as tmp:
            data = make_dataset(Path(tmp) / "data", args.size)
            host = run_host(base, webui_dir, pid, data, args.size, args.steps, Path(tmp))
            if args.restart:  # options set through the API persist in config.json across the restart
                pid = fresh_pid()
            ours = run_ours(base, webui_dir, pid, data, args.size, args.steps, extra)
    finally:
        api(base, "/sdapi/v1/options", {"training_write_csv_every": old_csv})
    ratio = (host["s_per_step"] / ours["s_per_step"]) if host["s_per_step"] and ours["s_per_step"] else None
    result = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "model": model, "size": args.size,
              "steps": args.steps, "host": host, "ours": ours,
              "host_steps_per_s": 1 / host["s_per_step"] if host["s_per_step"] else None,
              "ours_steps_per_s": 1 / ours["s_per_step"] if ours["s_per_step"] else None,
              "speedup_ours_vs_host": ratio,
              "peak_rss_ratio_ours_vs_host": ours["peak_rss_mb"] / host["peak_rss_mb"] if host["peak_rss_mb"] else None,
              "fresh_process_per_side": bool(args.restart)}
    print(json.dumps(result, indent=2))
    return 0 if host["ok"] and ours["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
