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

SDXL mode (`--sdxl`, or `--checkpoint FILE` of an SDXL file): the built-in cannot train SDXL, so the script
records what it answers (its create route on the SDXL model, and its trainer asked to train an SDXL embedding
made by our create route) and compares ours inside the host with the standalone backend
(`python -m textual_inversion_ext train --model <the same checkpoint file>`, its own process) on the same
images, size, steps, batch, seed and settings (validation, previews, snapshots and the comparison grid off).
The host is switched to the checkpoint through its API for the run and back afterwards (before the standalone
run, so the two do not hold the model at once). Peak RSS is compared while the steps run (sampled from the
first CSV row on); the standalone's lifetime peak (model loading included) is reported too.

    WEBUI_DIR=$LAB/webui .venv/bin/python benchmarks/host_vs_builtin.py --sdxl --size 64 --steps 12
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

import safetensors
from PIL import Image, ImageDraw


def api(base: str, path: str, body: object | None = None, timeout: float = 7200) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def api_attempt(base: str, path: str, body: object) -> dict:
    """One call that may fail: its HTTP status and answer (the error text for a failure)."""
    try:
        return {"http": 200, "answer": api(base, path, body)}
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        try:
            answer: object = json.loads(text)
        except ValueError:
            answer = text
        return {"http": exc.code, "answer": answer}


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


def cpu_s(pid: int) -> float:
    """CPU time (user + system) the process has used so far: on a busy machine the steadier measure."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def omp_threads(pid: int) -> str | None:
    """OMP_NUM_THREADS in the process's environment (torch's thread count when set), None when unset."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"OMP_NUM_THREADS="):
            return item.split(b"=", 1)[1].decode()
    return None


class Watcher(threading.Thread):
    """Polls for the newest loss CSV under `root` and records (time, rows) at every change; samples RSS."""

    def __init__(self, root: Path, pid: int) -> None:
        super().__init__(daemon=True)
        self.root, self.pid = root, pid
        self.stop = threading.Event()
        self.arrivals: list[tuple[float, int]] = []
        self.cpu: list[float] = []  # the process's CPU time at each arrival
        self.peak_rss = 0.0
        self.train_peak_rss = 0.0  # from the first CSV row on: the steps, not the model loading

    def run(self) -> None:
        path, size, last_rss = None, -1, 0.0
        while not self.stop.is_set():
            now = time.perf_counter()
            if now - last_rss > 0.1:
                try:
                    rss = rss_mb(self.pid)
                except OSError:  # a child process that has just exited
                    rss = 0.0
                self.peak_rss, last_rss = max(self.peak_rss, rss), now
                if self.arrivals:
                    self.train_peak_rss = max(self.train_peak_rss, rss)
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
                        try:
                            self.cpu.append(cpu_s(self.pid))
                        except OSError:
                            self.cpu.append(float("nan"))
            time.sleep(0.005)

    def deltas(self, warmup: int = 0) -> list[float]:
        """Seconds per step between CSV rows, leaving out the steps up to `warmup`."""
        return [(tb - ta) / (rb - ra) for (ta, ra), (tb, rb) in zip(self.arrivals, self.arrivals[1:])
                if rb > ra and ra >= warmup]

    def s_per_step(self, warmup: int = 0) -> float | None:
        deltas = self.deltas(warmup)
        return statistics.median(deltas) if deltas else None

    def cpu_s_per_step(self, warmup: int = 0) -> float | None:
        """The process's CPU seconds per step over the steps after `warmup` (all its threads)."""
        rows = [(c, r) for c, (_, r) in zip(self.cpu, self.arrivals) if r >= warmup]
        if len(rows) < 2 or rows[-1][1] == rows[0][1]:
            return None
        return (rows[-1][0] - rows[0][0]) / (rows[-1][1] - rows[0][1])


def builtin_train_body(name: str, data: Path, log_root: Path, size: int, steps: int) -> dict:
    """/sdapi/v1/train/embedding's fields for our settings (batch 1, lr 0.005, latents "once", no previews)."""
    return {
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


def run_host(base: str, webui: Path, pid: int, data: Path, size: int, steps: int, tmp: Path) -> dict:
    name = f"tiext-bench-host-{size}-{int(time.time())}"
    api(base, "/sdapi/v1/create/embedding", {"name": name, "num_vectors_per_token": 1, "overwrite_old": True,
                                              "init_text": "*"})
    log_root = tmp / "host-logs"
    body = builtin_train_body(name, data, log_root, size, steps)
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


def run_ours(base: str, webui: Path, pid: int, data: Path, size: int, steps: int, extra: dict,
             warmup: int = 0) -> dict:
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
    for path in (webui / "embeddings").glob(f"{name}.*"):  # .pt (SD1/SD2) or .safetensors (SDXL), + .optim
        path.unlink()
    return {"ok": status["status"] == "finished", "info": status["message"][-200:],
            "s_per_step": watcher.s_per_step(warmup), "wall_s": wall, "rss_before_mb": rss0,
            "peak_rss_mb": watcher.peak_rss, "train_peak_rss_mb": watcher.train_peak_rss,
            "cpu_s_per_step": watcher.cpu_s_per_step(warmup), "omp_num_threads": omp_threads(pid),
            "step_deltas_s": [round(d, 4) for d in watcher.deltas(warmup)], "extra": extra}


SD_MODELS = "/sdapi/v1/sd-models"
V1 = "/textual-inversion-ext/v1"


def host_checkpoints(base: str) -> dict[str, dict]:
    """The host's checkpoints by file name: {"title", "filename" (the full path)}."""
    return {m["filename"].replace("\\", "/").rsplit("/", 1)[-1]: m for m in api(base, SD_MODELS)}


def is_sdxl_file(path: Path) -> bool:
    """SDXL's sgm layout: the conditioner's embedders (a .ckpt is not opened: pickles run code)."""
    if path.suffix.lower() != ".safetensors":
        return False
    with safetensors.safe_open(str(path), "pt") as f:
        return any(k.startswith("conditioner.embedders.") for k in f.keys())  # noqa: SIM118 (not iterable)


def run_builtin_sdxl(base: str, webui: Path, data: Path, size: int, steps: int, tmp: Path) -> dict:
    """What the built-in does on the loaded SDXL model: its create route, then its trainer asked to train an
    SDXL embedding (clip_l + clip_g) made by our create route. Both are expected to fail; their errors are kept."""
    stamp = int(time.time())
    own, ours = f"tiext-bench-builtin-xl-{stamp}", f"tiext-bench-builtin-xl-ours-{stamp}"
    result: dict = {"create": api_attempt(base, "/sdapi/v1/create/embedding", {
        "name": own, "num_vectors_per_token": 1, "overwrite_old": True, "init_text": "*"})}
    created = api(base, f"{V1}/create", {"name": ours, "init_text": "*", "num_vectors": 1, "overwrite": True})
    result["our_embedding_dims"] = created.get("dims")
    api(base, "/sdapi/v1/refresh-embeddings", {})
    result["train"] = api_attempt(base, "/sdapi/v1/train/embedding",
                                  builtin_train_body(ours, data, tmp / "builtin-xl-logs", size, steps))
    for name in (own, ours):
        for path in (webui / "embeddings").glob(f"{name}.*"):
            path.unlink()
    api(base, "/sdapi/v1/refresh-embeddings", {})
    info = result["train"]["answer"].get("info", "") if isinstance(result["train"]["answer"], dict) else ""
    result["train_trained"] = "error: None" in info
    return result


def cli_flags(params: dict) -> list[str]:
    """Train fields as the CLI's flags (booleans as --x / --no-x)."""
    flags = []
    for key, value in params.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return flags


def run_standalone(checkpoint: Path, data: Path, params: dict, tmp: Path, device: str, warmup: int) -> dict:
    """The standalone backend on the same checkpoint file, in its own process (CLI create, then train)."""
    name = f"tiext-bench-standalone-{int(time.time())}"
    out, log_root = tmp / "standalone-embeddings", tmp / "standalone-logs"
    cli = [sys.executable, "-m", "textual_inversion_ext"]
    model = ["--model", str(checkpoint), "--device", device]
    subprocess.run([*cli, "create", name, "--init-text", "*", "--num-vectors", "1", "--out", str(out), *model],
                   check=True, capture_output=True, text=True)
    embedding = next(out.glob(f"{name}.*"))
    log = tmp / "standalone.log"
    with log.open("w") as sink:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cli, "train", str(embedding), str(data), "--log-dir", str(log_root), *model,
                                 *cli_flags(params)], stdout=sink, stderr=subprocess.STDOUT)
        watcher = Watcher(log_root, proc.pid)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)  # its own rusage: the lifetime peak RSS of that process
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
    watcher.stop.set()
    watcher.join()
    return {"ok": proc.returncode == 0, "info": log.read_text()[-300:], "s_per_step": watcher.s_per_step(warmup),
            "wall_s": wall, "peak_rss_mb": watcher.peak_rss, "train_peak_rss_mb": watcher.train_peak_rss,
            "lifetime_peak_rss_mb": usage.ru_maxrss / 1024, "device": device,
            "cpu_s_per_step": watcher.cpu_s_per_step(warmup), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "step_deltas_s": [round(d, 4) for d in watcher.deltas(warmup)]}


def main_sdxl(args: argparse.Namespace, base: str, webui_dir: Path, checkpoint: dict, fresh_pid) -> int:
    """Ours inside the host vs the standalone backend on one SDXL checkpoint; the built-in's answers."""
    params = {"max_steps": args.steps, "batch_size": 1, "learn_rate": "0.005", "latent_sampling": "once",
              "resolution": args.size, "buckets": False, "template": "subject_filewords", "save_every": 0,
              "preview_every": 0, "csv_every": 1, "val_every": 0, "comparison_grid": False, "seed": 0,
              "attention_optimizations": args.attention != "off"}
    before = api(base, "/sdapi/v1/options")["sd_model_checkpoint"]
    with tempfile.TemporaryDirectory(prefix="tiext-bench-", dir=webui_dir) as tmp:
        data = make_dataset(Path(tmp) / "data", args.size)
        pid = fresh_pid()
        api(base, "/sdapi/v1/options", {"sd_model_checkpoint": checkpoint["title"]})
        try:
            ours = run_ours(base, webui_dir, pid, data, args.size, args.steps, params, warmup=args.warmup)
            builtin = run_builtin_sdxl(base, webui_dir, data, args.size, args.steps, Path(tmp))
        finally:  # the host's model is freed before the standalone process loads its own
            api(base, "/sdapi/v1/options", {"sd_model_checkpoint": before})
        standalone = run_standalone(Path(checkpoint["filename"]), data, params, Path(tmp), args.standalone_device,
                                    args.warmup)
    def ratio(key: str) -> float | None:
        return standalone[key] / ours[key] if ours[key] and standalone[key] else None

    result = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "mode": "sdxl",
              "model": checkpoint["title"], "size": args.size, "steps": args.steps, "warmup_steps": args.warmup,
              "params": params, "load_average": os.getloadavg(), "cpus": os.cpu_count(),
              "builtin": builtin, "ours_in_host": ours, "standalone": standalone,
              "speed_in_host_vs_standalone": ratio("s_per_step"),
              "cpu_speed_in_host_vs_standalone": ratio("cpu_s_per_step"),
              "train_peak_rss_ratio_in_host_vs_standalone": (ours["train_peak_rss_mb"] / standalone["train_peak_rss_mb"]
                                                             if standalone["train_peak_rss_mb"] else None)}
    print(json.dumps(result, indent=2))
    return 0 if ours["ok"] and standalone["ok"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pid", type=int, default=None)
    parser.add_argument("--attention", choices=["host", "on", "off"], default="host",
                        help="ours: attention optimizations as the host setting says (default), or forced")
    parser.add_argument("--restart", default=None,
                        help="shell command that restarts the webui (run before each side: fresh process)")
    parser.add_argument("--checkpoint", default=None,
                        help="SDXL mode on this SDXL checkpoint file of the host's (switched to through the API, "
                             "then back)")
    parser.add_argument("--sdxl", action="store_true", help="SDXL mode on --checkpoint (default tiny-sdxl.safetensors)")
    parser.add_argument("--warmup", type=int, default=1, help="SDXL mode: steps left out of the timing")
    parser.add_argument("--standalone-device", default="cpu", help="SDXL mode: the standalone run's --device")
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

    if args.sdxl or args.checkpoint:
        name = args.checkpoint or "tiny-sdxl.safetensors"
        checkpoint = host_checkpoints(base).get(name)
        if checkpoint is None:
            print(f"the host has no checkpoint {name} (host-lab: SDXL=1 ./build.sh)", file=sys.stderr)
            return 2
        if not is_sdxl_file(Path(checkpoint["filename"])):
            print(f"{name} is not an SDXL checkpoint: for SD1/SD2 load it in the host (or --restart with "
                  "CKPT=...) and leave --checkpoint out", file=sys.stderr)
            return 2
        return main_sdxl(args, base, webui_dir, checkpoint, fresh_pid)

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
