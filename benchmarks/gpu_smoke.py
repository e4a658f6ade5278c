"""One-command GPU smoke test of the precision paths (issue 12 point 4), on the embedded tiny SD1 model.

On CUDA (each run `--steps` steps, 20 by default, on the six demo images at 128 px):

  refusal     fp16 weights with precision fp32 is refused before any work (also on CPU)
  fp16        fp16 weights, precision auto -> fp16 autocast + GradScaler, pinned latents
  fp16-nopin  the same without pin_memory: must equal `fp16` bit for bit (the asynchronous copies are safe)
  bf16        bf16 weights, precision auto -> bf16 autocast, no scaler, pinned latents, SDPA attention
  resume      fp16: half the steps, then resumed from the saved .optim (optimizer + GradScaler state) to the
              end: must equal `fp16` bit for bit, with the same final GradScaler state

The fp16 runs use plain attention and deterministic kernels, so "bit for bit" is a fair test. Every run checks
that the loss stayed finite and the saved vectors are fp32 and moved. Without CUDA the half-precision runs are
reported as skipped and an fp32 run and its resume run instead (a few steps), so the script itself is tested;
`--half-on-cpu` runs the half-precision list on the CPU (slow).

  python benchmarks/gpu_smoke.py                       # prints one line per check, exit 1 when one failed
  python benchmarks/gpu_smoke.py --json out.json --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from textual_inversion_ext.backends.standalone import embedded_default  # noqa: E402
from textual_inversion_ext.core import formats  # noqa: E402
from textual_inversion_ext.core.create import CreateParams, create_embedding  # noqa: E402
from textual_inversion_ext.core.params import ParameterError  # noqa: E402
from textual_inversion_ext.core.training.run import RunRequest, run_training  # noqa: E402
from textual_inversion_ext.core.training.train_params import TrainParams  # noqa: E402
from textual_inversion_ext.demo import make_sample_dataset  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Smoke:
    def __init__(self, device: str, steps: int, work: Path) -> None:
        self.device, self.steps, self.work = device, steps, work
        self.data = work / "data"
        make_sample_dataset(self.data, size=128, seed=0)
        self.backends: dict[str, object] = {}
        self.rows: list[dict] = []
        self.starts: dict[str, torch.Tensor] = {}  # each run's vectors before training

    def backend(self, dtype: str):
        if dtype not in self.backends:
            self.backends[dtype] = embedded_default("tiny", device=self.device, dtype=DTYPES[dtype])
        return self.backends[dtype]

    def train(self, name: str, dtype: str, steps: int, emb: Path | None = None, **kw) -> tuple[Path, dict]:
        """One run to `steps` (continuing `emb` when given); returns the embedding file and its facts."""
        backend = self.backend(dtype)
        if emb is None:
            emb = create_embedding(backend, CreateParams(name="smoke", init_text="red robot", num_vectors=2),
                                   self.work / name).path
            self.starts[name] = _vectors(emb)
        params = TrainParams(**{**dict(max_steps=steps, learn_rate="0.005", seed=3, save_every=0, preview_every=0,
                                       csv_every=0, val_every=0, comparison_grid=False), **kw})
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        out = run_training(backend, RunRequest(emb, self.data, self.work / name / "logs", params))
        if self.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        record = json.loads(out.record_path.read_text("utf-8"))
        losses = [loss for _, loss in out.result.losses]
        facts = {"status": out.result.status, "step": out.result.step, "precision": record["precision"],
                 "seconds": round(seconds, 2), "s_per_step": record.get("s_per_step"),
                 "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                 "finite": all(torch.isfinite(torch.tensor(losses)).tolist()) if losses else False,
                 "pinned": bool(params.pin_memory and self.device == "cuda" and out.data.latents
                                and next(iter(out.data.latents[0].values())).sample.is_pinned()),
                 "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if self.device == "cuda" else None}
        return emb, facts

    def check(self, name: str, ok: bool, facts: dict, note: str = "") -> None:
        self.rows.append({"run": name, "ok": bool(ok), "note": note, **facts})
        print(f"{'PASS' if ok else 'FAIL'}  {name:<11} {note}  {json.dumps(facts)}", flush=True)

    def skip(self, name: str, why: str) -> None:
        self.rows.append({"run": name, "ok": None, "note": f"skipped: {why}"})
        print(f"SKIP  {name:<11} {why}", flush=True)


def _vectors(path: Path) -> torch.Tensor:
    return formats.load_embedding(path).embedding.single()


def _scaler(path: Path) -> dict | None:
    return torch.load(formats.optim_path(path), weights_only=True).get("scaler_state_dict")


def _trained(s: Smoke, name: str, emb: Path, facts: dict, expect: dict, pinned: bool = False) -> None:
    vec = _vectors(emb)
    precision = {k: facts["precision"][k] for k in expect}
    ok = (facts["status"] == "finished" and facts["finite"] and precision == expect and vec.dtype == torch.float32
          and not torch.equal(vec, s.starts[name]) and facts["pinned"] == pinned)
    s.check(name, ok, facts, f"precision {precision}, vectors fp32 and moved" + (", latents pinned" if pinned else ""))


def _same(s: Smoke, name: str, a: Path, b: Path, facts: dict, what: str) -> None:
    diff = (_vectors(a) - _vectors(b)).abs().max().item()
    scalers = _scaler(a), _scaler(b)
    ok = diff == 0 and scalers[0] == scalers[1] and facts["finite"]
    s.check(name, ok, {**facts, "max_abs_diff": diff, "scaler": scalers[1]}, what)


def _refusal(s: Smoke) -> None:
    try:
        s.train("refusal", "fp16", s.steps, precision="fp32")
        s.check("refusal", False, {}, "fp32 on fp16 weights was not refused")
    except ParameterError as exc:
        s.check("refusal", "--dtype fp32" in str(exc), {"message": str(exc)}, "refused before any work")


def run(device: str, steps: int, work: Path, half_on_cpu: bool = False) -> list[dict]:
    s = Smoke(device, steps, work)
    _refusal(s)
    if device != "cuda" and not half_on_cpu:
        for name in ("fp16", "fp16-nopin", "bf16"):
            s.skip(name, "no CUDA device")
        emb, facts = s.train("fp32", "fp32", steps)
        _trained(s, "fp32", emb, facts, {"weights": "fp32", "autocast": None, "grad_scaler": False})
        half, _ = s.train("resume", "fp32", steps // 2)
        half, facts = s.train("resume", "fp32", steps, emb=half)
        _same(s, "resume", emb, half, facts, f"{steps // 2}+{steps - steps // 2} steps == {steps} straight (fp32)")
        return s.rows
    # Deterministic kernels (the splice's index backward accumulates with atomics otherwise), so that equal
    # computations give equal bits and any difference is ours.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    cuda = device == "cuda"
    exact = dict(attention_optimizations=False)  # plain attention: a deterministic backward
    fp16, facts = s.train("fp16", "fp16", steps, pin_memory=True, **exact)
    _trained(s, "fp16", fp16, facts, {"weights": "fp16", "autocast": "fp16", "grad_scaler": True}, pinned=cuda)
    nopin, facts = s.train("fp16-nopin", "fp16", steps, pin_memory=False, **exact)
    _same(s, "fp16-nopin", fp16, nopin, facts, "pin_memory off == on")
    if not cuda or torch.cuda.is_bf16_supported():
        emb, facts = s.train("bf16", "bf16", steps, pin_memory=True)
        _trained(s, "bf16", emb, facts, {"weights": "bf16", "autocast": "bf16", "grad_scaler": False}, pinned=cuda)
    else:
        s.skip("bf16", "this GPU has no bf16")
    half, facts = s.train("resume", "fp16", steps // 2, pin_memory=True, **exact)
    mid = _scaler(half)
    half, facts = s.train("resume", "fp16", steps, emb=half, pin_memory=True, **exact)
    _same(s, "resume", fp16, half, {**facts, "scaler_at_half": mid},
          f"{steps // 2}+{steps - steps // 2} steps == {steps} straight (fp16 + GradScaler)")
    return s.rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cuda' or 'cpu'")
    parser.add_argument("--steps", type=int, default=0, help="steps per run; 0 = 20 on CUDA, 4 on CPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--half-on-cpu", action="store_true",
                        help="without CUDA, run the fp16/bf16 runs on the CPU anyway (slow; checks this script)")
    args = parser.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read when CUDA starts)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    steps = args.steps or (20 if device == "cuda" else 4)
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "steps": steps}
    print(json.dumps(env), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(device, steps, Path(tmp), args.half_on_cpu)
    failed = [r["run"] for r in rows if r["ok"] is False]
    summary = {**env, "seconds": round(time.perf_counter() - started, 1), "failed": failed, "runs": rows}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2), "utf-8")
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'} in {summary['seconds']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
