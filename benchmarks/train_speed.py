"""Training speed and peak memory: our trainer vs two loops that reproduce the peers' choices.

Same model, same images, same seed, same steps. Each (config, loop) runs in its own process so
peak memory is measured cleanly; the parent prints steps/s, peak memory and ratios against ours.

  ours                    core.training.trainer.train: frozen model, SDPA attention, no checkpointing,
                          latents cached once, no per-step host sync; steps only (validation off)
  ours-defaults           the same with the default validation (its budget, every N, set size): the
                          timed window also holds every validation pass of the run (step 0 and the end
                          included); it also projects the default validation's share over a run of the
                          default length (with and without the budget) from the measured cost of a
                          validation sample
  a1111-style             UNet weights require grad (the host never freezes them), gradient
                          checkpointing on, plain attention, `.item()` after every micro-batch
  diffusers-example-style the whole token-embedding matrix trainable with the other rows restored
                          after every step, the VAE encoding every step (diffusers' example script)

SDXL configs (sdxl = full-size SDXL-shaped with random weights, tiny-sdxl, tiny-sdxl-real) run `ours` and the
SDXL peers' loops of sdxl_loops.py instead of the SD1 ones:
  diffusers-sdxl-style    diffusers' textual_inversion_sdxl.py: both encoders' whole token tables trainable,
                          the other rows restored every step, the VAE encoding every step
  kohya-style             kohya-ss/sd-scripts sdxl_train_textual_inversion.py with its defaults: latents not
                          cached, plain attention, both whole tables trainable, grad-norm clipping
`--flops` prints the FLOPs of one step of each SDXL loop at the given sizes (counted on the meta device,
nothing allocated) and a 1024 px time estimate from them.

Wall time: other processes on the machine slow every loop (each line shows the load average), so
compare the ratios of one run, not numbers across runs.

  python benchmarks/train_speed.py --config tiny
  python benchmarks/train_speed.py --config tiny --loops ours,ours-defaults
  python benchmarks/train_speed.py --config sd15 --size 256 --steps 4 --warmup 1
  python benchmarks/train_speed.py --config sd15 --size 512 --device cuda
  python benchmarks/train_speed.py --config tiny-sdxl --steps 10
  python benchmarks/train_speed.py --config sdxl --size 256 --steps 3 --warmup 1
  python benchmarks/train_speed.py --config sdxl --flops 256,1024
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # sdxl_loops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

LOOPS = ("ours", "ours-defaults", "a1111-style", "diffusers-example-style")
SDXL_LOOPS = ("ours", "diffusers-sdxl-style", "kohya-style")
SDXL_CONFIGS = ("sdxl", "tiny-sdxl", "tiny-sdxl-real")
CONFIGS = ("tiny", "tiny-real-clip", "sd15", *SDXL_CONFIGS)
NAME = "bench-token"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark (VmHWM), so `hwm_mb` is the peak from here on (Linux); False if not
    (the memory of the process is untouched: mode 5 resets only the mark)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def build_backend(config: str, device: str, dtype: torch.dtype = torch.float32):
    from textual_inversion_ext.backends.standalone import embedded_default, random_model

    if config in ("sd15", "sdxl"):
        return random_model("sd1" if config == "sd15" else "sdxl", device=device, dtype=dtype, seed=0)
    return embedded_default(config, device=device, dtype=dtype, seed=0)


def default_loops(config: str) -> tuple[str, ...]:
    return SDXL_LOOPS if config in SDXL_CONFIGS else LOOPS


def make_images(folder: Path, size: int, count: int = 8) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for i in range(count):
        img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.randrange(size), rng.randrange(size)
            draw.ellipse([x, y, x + size // 4, y + size // 4], fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(folder / f"img-{i}.png")
        (folder / f"img-{i}.txt").write_text(f"shapes, picture {i}")


class Timer:
    """Wall time of the steps after warm-up, synchronising the device at both ends; also the process's CPU time
    over the same window (on a CPU run with one thread: the compute, whatever else the machine runs)."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup, self.start, self.end = device, warmup, None, None
        self.cpu_start, self.cpu_end = None, None
        self.extra = 0.0  # seconds outside the window that belong to it (validation before the first step)

    def step_done(self, step: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if step == self.warmup:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        self.end, self.cpu_end = time.perf_counter(), time.process_time()


LINES = ["a photo of [name], [filewords]"]


def run_ours(backend, data, emb, args, timer: Timer, tmp: Path, defaults: bool) -> dict:
    """Steps only (validation off), or with the default validation: then every validation pass counts,
    the ones before the timed window (step 0) added to it."""
    from textual_inversion_ext.core.training import validation
    from textual_inversion_ext.core.training.train_params import TrainParams
    from textual_inversion_ext.core.training.trainer import RunPaths, train

    params = TrainParams(max_steps=args.warmup + args.steps, save_every=0, preview_every=0, csv_every=0,
                         save_optimizer_state=False, seed=0, template="subject_filewords", comparison_grid=False,
                         **({} if defaults else {"val_every": 0}))
    spent = {"passes": 0, "samples": 0, "seconds": 0.0, "before_window": 0.0}
    original = validation.ValidationSet.loss

    def timed_loss(self, *a, **kw):  # the benchmark's own probe, not the trainer's
        start = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            if timer.device.type == "cuda":
                torch.cuda.synchronize()
            took = time.perf_counter() - start
            spent["passes"] += 1
            spent["samples"] += len(self)
            spent["seconds"] += took
            if timer.start is None:
                spent["before_window"] += took

    if defaults:  # the model's first forward pays one-time costs, in every other loop inside the warm-up steps
        warm = validation.ValidationSet(backend, data, NAME, LINES, timesteps_per_image=1, samples=1)
        warm.loss({k: v.to(backend.device) for k, v in emb.vectors.items()})
    validation.ValidationSet.loss = timed_loss
    try:
        result = train(backend, emb, data, params, RunPaths(tmp / "final.pt", tmp / "log"), template_lines=LINES,
                       progress=lambda p: timer.step_done(p.step))
    finally:
        validation.ValidationSet.loss = original
    if not defaults:
        return {}
    timer.end, timer.cpu_end = time.perf_counter(), time.process_time()  # the end-of-run validation counts too
    timer.extra = spent["before_window"]
    return {"validation_passes": spent["passes"], "validation_samples": spent["samples"],
            "validation_s": round(spent["seconds"], 3),
            "validation_plan": result.validation_plan.note if result.validation_plan else None}


def project_default_validation(backend, data, emb, s_per_step: float, run: dict) -> dict:
    """The default validation's share of a default-length run: with the budget (the plan the trainer makes)
    and without it (every image × timestep at every N steps). The cost of a validation sample comes from the
    run's own passes, or, when the run was too short to validate, from the median of 3 passes after it."""
    from textual_inversion_ext.core.training.train_params import TrainParams
    from textual_inversion_ext.core.training.validation import ValidationSet, count_passes, plan_for

    p = TrainParams()
    plan = plan_for(p, 0, p.max_steps, len(data))
    sample_set = ValidationSet(backend, data, NAME, LINES, timesteps_per_image=p.val_timesteps,
                               samples=plan.samples, batch_size=max(4, 2 * p.batch_size))
    if run["validation_samples"]:
        per_sample, source = run["validation_s"] / run["validation_samples"], "this run's passes"
    else:
        vectors = {k: v.to(backend.device) for k, v in emb.vectors.items()}
        sample_set.loss(vectors)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            sample_set.loss(vectors)
            if backend.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / len(sample_set))
        per_sample, source = sorted(times)[1], "3 passes after the run"
    train_s = p.max_steps * s_per_step
    unbudgeted = count_passes(0, p.max_steps, p.val_every) * len(data) * p.val_timesteps * per_sample
    return {"projected_steps": p.max_steps, "projected_plan": plan.note,
            "validation_s_per_sample": round(per_sample, 4), "validation_cost_from": source,
            "projected_share": round(plan.passes * plan.samples * per_sample / train_s, 4),
            "projected_share_without_budget": round(unbudgeted / train_s, 4)}


def run_a1111_style(backend, data, emb, args, timer: Timer) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    device = backend.device
    backend.unet.requires_grad_(True)  # the host leaves UNet weights trainable
    backend.unet.enable_gradient_checkpointing()  # always on in the host's TI loop
    backend.unet.set_attn_processor(AttnProcessor())  # host default: optimizations off while training
    vec = emb.vectors["default"].to(device).clone().requires_grad_(True)
    opt = torch.optim.AdamW([vec], lr=0.005, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    backend.unet.train()
    for step in range(args.warmup + args.steps):
        i = step % len(data)
        latents = data.latents[i][False].sample.unsqueeze(0).to(device)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, backend.num_train_timesteps, (1,), generator=gen).to(device)
        cond = backend.encode_text([f"a photo of {NAME}, {data.captions[i]}"], NAME, {"default": vec})
        loss = backend.training_loss(latents, cond, noise, t).mean()
        loss.backward()
        _ = loss.item()  # per-micro-batch sync, as the host does
        opt.step()
        opt.zero_grad(set_to_none=True)  # only the embedding: UNet .grad stays allocated
        timer.step_done(step + 1)


def run_diffusers_style(backend, data, emb, args, timer: Timer, pixels: list[torch.Tensor]) -> None:
    from textual_inversion_ext.backends.standalone import splice

    device = backend.device
    table = next(iter(backend.encoders.values())).table  # the text encoder's token-embedding module
    vocab = table.weight.shape[0]
    init = emb.vectors["default"].to(device, table.weight.dtype)
    n = init.shape[0]
    # resize_token_embeddings + train the whole matrix, as diffusers' example does
    table.weight = torch.nn.Parameter(torch.cat([table.weight.detach(), init]), requires_grad=True)
    orig = table.weight.detach().clone()
    keep = torch.ones(vocab + n, dtype=torch.bool, device=device)
    keep[vocab:] = False
    opt = torch.optim.AdamW([table.weight], lr=0.005)  # diffusers' default weight decay 1e-2
    for module in (backend.unet, backend.vae):
        module.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    scale = float(backend.vae.config.scaling_factor)
    for step in range(args.warmup + args.steps):
        i = step % len(data)
        with torch.no_grad():  # the VAE encodes every step
            x = pixels[i].unsqueeze(0).to(device, backend.vae.dtype)
            latents = backend.vae.encode(x).latent_dist.sample(generator=None) * scale
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, backend.num_train_timesteps, (1,), generator=gen).to(device)
        row = splice.prompt_ids(f"a photo of {NAME}, {data.captions[i]}", NAME, n, backend.pad_id)
        ids = [vocab + s if s >= 0 else tok for tok, s in zip(row.ids, row.slots)]
        cond = backend.text_encoder(torch.tensor([ids], device=device)).last_hidden_state
        loss = backend.training_loss(latents, cond, noise, t).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():  # undo the update everywhere but the new token rows
            table.weight[keep] = orig[keep]
        timer.step_done(step + 1)


def run_sdxl_peer(backend, data, emb, args, timer: Timer, pixels: list[torch.Tensor]) -> None:
    """One of sdxl_loops.py's peer loops on the backend's modules."""
    import sdxl_loops

    step = sdxl_loops.Step(backend.unet, backend.vae, backend.text_encoder, backend.text_encoder_2,
                           backend.noise_scheduler, {k: v.to(backend.device) for k, v in emb.vectors.items()})
    # The scripts hold no splicing tables: once resize_token_embeddings has replaced them, the backend's references
    # would keep the old tables alive (memory the peers never use).
    backend.encoders.clear()
    sdxl_loops.RUNNERS[args.loop](step, lambda i: f"a photo of {NAME}, {data.captions[i % len(data)]}",
                                  lambda i: pixels[i % len(pixels)], args.warmup + args.steps, NAME, 0.005,
                                  torch.Generator().manual_seed(0), step_done=timer.step_done)


def worker(args: argparse.Namespace) -> dict:
    from textual_inversion_ext.core.data import images
    from textual_inversion_ext.core.data.dataset import prepare
    from textual_inversion_ext.core.embedding import Embedding

    torch.manual_seed(0)
    device = torch.device(args.device)
    backend = build_backend(args.config, args.device, DTYPES[args.dtype])
    size = args.size or backend.info.resolution
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "data").mkdir()
        make_images(tmp / "data", size)
        scan = images.scan_dataset(tmp / "data")
        data = prepare(backend, scan, resolution=size, use_buckets=False, with_flips=False,
                       latent_sampling="once", seed=0)
        pixels = [images.to_tensor(images.resize_and_crop(images.load_rgb(it.path), (size, size)))
                  for it in scan.items]
        # Two vectors per encoder, each the mean of two tokens' rows (SD1: the one encoder, SINGLE)
        rows = backend.token_rows([1746, 7869])
        emb = Embedding(NAME, {k: v.mean(0, keepdim=True).repeat(2, 1).cpu() for k, v in rows.items()})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base_rss = rss_mb()
        # Peak from here on: building the model (in float32 whatever --dtype) must not count, nor
        # preparing the data (Linux; elsewhere the process's lifetime peak).
        peak_from = "training" if reset_peak_rss() else "process start"
        timer = Timer(device, args.warmup)
        extra = {}
        if args.loop in ("ours", "ours-defaults"):
            extra = run_ours(backend, data, emb, args, timer, tmp, defaults=args.loop == "ours-defaults")
        elif args.loop == "a1111-style":
            run_a1111_style(backend, data, emb, args, timer)
        elif args.loop == "diffusers-example-style":
            run_diffusers_style(backend, data, emb, args, timer, pixels)
        else:
            run_sdxl_peer(backend, data, emb, args, timer, pixels)
        elapsed = timer.end - timer.start + timer.extra
        if args.loop == "ours-defaults":
            steps_only = (elapsed - extra["validation_s"]) / args.steps
            extra.update(project_default_validation(backend, data, emb, steps_only, extra))
    result = {
        "config": args.config, "loop": args.loop, "size": size, "device": args.device, "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "steps": args.steps, "steps_per_s": args.steps / elapsed, "s_per_step": elapsed / args.steps,
        "cpu_s_per_step": (timer.cpu_end - timer.cpu_start) / args.steps,
        "peak_rss_mb": round(hwm_mb() if peak_from == "training" else peak_rss_mb(), 1), "peak_rss_from": peak_from,
        "rss_before_training_mb": round(base_rss, 1),
        # Wall time: other processes on the machine slow every loop; the load shows how busy it was.
        "load_avg_1min": round(os.getloadavg()[0], 2), **extra,
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def print_flops(args: argparse.Namespace) -> int:
    """FLOPs of one training step of every SDXL loop (meta device) and what they mean in time at `--tflops`."""
    import sdxl_loops

    if args.config not in SDXL_CONFIGS:
        print("--flops counts the SDXL loops; use an SDXL config", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.flops.split(",")]
    counts = sdxl_loops.count_flops(args.config, sizes, f"a photo of {NAME}, shapes, picture 0", NAME,
                                    checkpointed=True)
    print(f"config {args.config}: TFLOPs of one training step (batch 1), counted on the meta device; time at an "
          f"assumed sustained {args.tflops:g} TFLOP/s (an estimate, not a measurement)")
    for size, per_loop in counts.items():
        ours = per_loop["ours"]
        for loop, flops in per_loop.items():
            ratio = "" if loop.startswith("ours") else f"   ours / it: {ours / flops:.3f}"
            print(f"  {size:>5} px  {loop:<26} {flops / 1e12:8.3f} TFLOPs  ~{flops / (args.tflops * 1e12):6.3f} s/step"
                  + ratio)
    print("Our step's memory (meta device): weights + tensors saved for the backward pass at the end of the forward "
          "(the backward's transients come on top); fp32 as on this CPU, bf16/fp16 weights (2 bytes) as on a GPU")
    memory = {}
    for size in sizes:
        for dtype, ckpt in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
            parts = sdxl_loops.saved_activation_bytes(args.config, size, dtype, ckpt)
            weights = sum(v for k, v in parts.items() if k != "saved")
            label = f"{size} px {'fp32' if dtype == torch.float32 else 'bf16'}{' + UNet checkpointing' if ckpt else ''}"
            memory[label] = {k: round(v / 2**30, 3) for k, v in parts.items()}
            total = (weights + parts["saved"]) / 2**30
            print(f"  {label:<36} weights {weights / 2**30:6.2f} GiB (VAE {parts['AutoencoderKL'] / 2**30:.2f}) + "
                  f"saved activations {parts['saved'] / 2**30:6.2f} GiB = {total:6.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps({"flops": {str(k): v for k, v in counts.items()}, "memory_gib": memory,
                                         "assumed_tflops": args.tflops}, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=CONFIGS)
    parser.add_argument("--size", type=int, default=0, help="image size; 0 = the model's native size")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                        help="the frozen model's dtype (fp32 as the SD1 rows; bf16/fp16 = the peers' mixed "
                             "precision choice, ours with the weights loaded so)")
    parser.add_argument("--loops", default=None, help="comma-separated; default: the config family's loops "
                        f"(SD1: {','.join(LOOPS)}; SDXL: {','.join(SDXL_LOOPS)})")
    parser.add_argument("--flops", default=None, help="SDXL configs: count the FLOPs of one step of every loop at "
                        "these comma-separated sizes (meta device) and exit")
    parser.add_argument("--tflops", type=float, default=40.0,
                        help="sustained TFLOP/s assumed for the --flops time estimate (default: ~50%% of an RTX "
                             "4090's 82.6 dense bf16 TFLOP/s with fp32 accumulation, ~36%% of an RTX A5000's 111)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--loop", help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.flops:
        return print_flops(args)
    if args.loop:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    results = []
    for loop in (args.loops.split(",") if args.loops else default_loops(args.config)):
        cmd = [sys.executable, __file__, "--config", args.config, "--size", str(args.size), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--loop", loop]
        if args.dtype != "fp32":  # the SD1 command lines stay as they were
            cmd += ["--dtype", args.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            return 1
        results.append(json.loads(line[len("RESULT "):]))
        r = results[-1]
        print(f"{loop:>24}: {r['steps_per_s']:.3f} steps/s ({r['s_per_step']:.3f} s/step), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB" + (f", peak CUDA {r['peak_cuda_mb']:.0f} MB"
                                                      if "peak_cuda_mb" in r else "")
              + f", load {r['load_avg_1min']:.1f}, CPU time {r['cpu_s_per_step']:.3f} s/step", flush=True)
        if "validation_passes" in r:
            print(f"{'':>26}this run: {r['validation_passes']} validation pass(es), {r['validation_s']:.2f} s; "
                  f"{r['validation_plan']}\n{'':>26}default validation over {r['projected_steps']} steps: "
                  f"{r['projected_share']:.1%} of the training time ({r['projected_share_without_budget']:.0%} "
                  f"without the budget); {r['validation_s_per_sample']:.3f} s per validation sample "
                  f"({r['validation_cost_from']})", flush=True)
    for ours in (r for r in results if r["loop"].startswith("ours")):
        mem_key = "peak_cuda_mb" if "peak_cuda_mb" in ours else "peak_rss_mb"
        print(f"\nconfig {args.config}, {ours['size']} px, {args.device}, {args.dtype}, {ours['threads']} thread(s); "
              f"ratios = {ours['loop']} / peer")
        for r in results:
            if r["loop"].startswith("ours"):
                continue
            print(f"  vs {r['loop']:<24} speed {ours['steps_per_s'] / r['steps_per_s']:.2f}x   "
                  f"peak memory {ours[mem_key] / r[mem_key]:.2f}x   "
                  f"(by CPU time: {r['cpu_s_per_step'] / ours['cpu_s_per_step']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
