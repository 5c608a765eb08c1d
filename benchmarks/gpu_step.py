"""One GPU meta-step of ``jobs/configs/gpu.yaml``'s choices: step time, peak memory, TFLOP/s.

Ready to run on a GPU when one is lent::

    python benchmarks/gpu_step.py                          # every variant, support 16 32 64
    python benchmarks/gpu_step.py --supports 64 80 --variants gpu.yaml
    python benchmarks/gpu_step.py --smoke                  # a seconds-long CPU run (tests use it;
                                                           # also what a bare run does without CUDA)

For each variant and support size it builds the config's model (ResNet-18, the paper's head;
random weights unless ``--pretrained``: weights change neither time nor memory), makes random
user tasks of the config's shape (224 px, ``data.query_size`` query images), and runs the
trainer's own path (:meth:`piaa_dist.train.MetaTrainer.local_flat`: per-task meta-gradients of
one rank's share of the meta-batch, ``--tasks`` tasks, under the config's precision) and reports

* **step s**: median wall time of ``--steps`` timed meta-steps after ``--warmup``, the device
  synchronized around each;
* **peak GB**: ``torch.cuda.max_memory_allocated`` over the timed steps (on CPU: the rise of
  the process's peak resident memory, a looser figure);
* **TFLOP/s**: the step's FLOPs, counted once with ``torch.utils.flop_counter.FlopCounterMode``
  (matrix multiplications and convolutions, forward, backward and double backward), divided
  by the step time, and its share of the device's peak: the datasheet's dense figure for the
  precision in use when the device is known (:data:`PEAK_TFLOPS`), and always the measured
  peak of a large matrix multiplication in that precision on this device (the practical ceiling).

Variants (``--variants``; each is gpu.yaml with a few keys changed):

* ``gpu.yaml``: as configured (float32 without TF32, second order, every parameter adapts);
* ``tf32``: the same with ``run.tf32=true`` (TF32 tensor cores for float32 convolutions and
  matrix multiplications);
* ``bf16``: ``run.amp=true``: bf16 autocast of the backbone;
* ``bf16-cl``: the same with channels-last images through the second-order inner loop
  (``meta.Speedups.channels_last_twice``; tensor cores want channels-last, on CPU it is slower);
* ``head``: ``meta.inner_params=head``: second order through the head, the backbone run once
  per set (``meta.Speedups.head_features``), still trained by the outer gradient;
* ``first_order``: ``meta.flavour=first_order``: one forward/backward held at a time.

A least-squares line through the support sizes of each variant gives GB per support image and
the largest support that fits ``--gpu-gb`` (24: an A10G or an L4) after ``--reserve-gb``.
Writes ``benchmarks/results/gpu_step.json`` (``gpu_step_smoke.json`` in smoke mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import linear_fit  # noqa: E402

#: Dense peak TFLOP/s from the vendors' datasheets, by a substring of the device name, per
#: precision: "fp32" (CUDA cores), "tf32" and "bf16" (tensor cores, without sparsity).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},  # SXM
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "A10G": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0},  # AWS g5 (A10 figures)
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 366.0},
    "T4": {"fp32": 8.1, "tf32": 8.1, "bf16": 65.0},  # no bf16 tensor cores: fp16's figure
}

VARIANTS: dict[str, dict[str, object]] = {
    "gpu.yaml": {},
    "tf32": {"run.tf32": True},
    "bf16": {"run.amp": True},
    "bf16-cl": {"run.amp": True},
    "head": {"meta.inner_params": "head"},
    "first_order": {"meta.flavour": "first_order"},
}


def _precision(cfg, device) -> str:
    if cfg.run.amp and device.type == "cuda":
        return "bf16"
    return "tf32" if cfg.run.tf32 and device.type == "cuda" else "fp32"


def _datasheet_peak(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "L40S" before "L4"
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def _measured_peak(device, precision: str, n: int) -> float:
    """TFLOP/s of an n x n matrix multiplication in the precision the step uses."""
    import torch

    from piaa_dist.model import set_float32_precision

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        set_float32_precision(tf32=precision == "tf32")
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < 0.5:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); a no-op where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _tasks(n: int, support: int, query: int, size: int, device):
    import torch

    gen = torch.Generator().manual_seed(1)

    def batch(k: int):
        return (torch.randn(k, 3, size, size, generator=gen).to(device),
                (torch.randint(1, 6, (k,), generator=gen).float() / 5).to(device))

    return [SimpleNamespace(user=f"user{i}", support=batch(support), query=batch(query)) for i in range(n)]


def measure(cfg, device, support: int, args, *, channels_last_twice: bool = False) -> dict:
    """One (variant, support) cell: time, peak memory and FLOPs of the trainer's meta-step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from piaa_dist.model import build_model
    from piaa_dist.train import MetaTrainer

    torch.manual_seed(0)
    trainer = MetaTrainer(cfg, build_model(cfg.model), device)
    if channels_last_twice:
        trainer.speedups = dataclasses.replace(trainer.speedups, channels_last_twice=True)
    tasks = _tasks(args.tasks, support, cfg.data.query_size, cfg.data.image_size, device)

    def step():
        flat = trainer.local_flat(tasks)  # meta-gradients only: the weights do not move
        _sync(device)
        return flat

    try:
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _reset_peak_rss()
        rss0 = _rss_bytes()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else max(0, _peak_rss_bytes() - rss0))
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    except torch.OutOfMemoryError as err:
        return {"support": support, "oom": str(err).splitlines()[0]}
    step_s = statistics.median(times)
    return {"support": support, "step_s": step_s, "step_s_range": [min(times), max(times)],
            "peak_gb": peak / 1e9, "flops": flops, "tflops": flops / step_s / 1e12}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "gpu.yaml"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--supports", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--tasks", type=int, default=1,
                   help="tasks per rank per step (gpu.yaml: meta_batch 4 over 4 workers = 1)")
    p.add_argument("--steps", type=int, default=3, help="timed meta-steps per cell")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--pretrained", default="none", help="model.pretrained (weights do not change time or memory)")
    p.add_argument("--gpu-gb", type=float, default=24.0, help="the GPU size to fit (A10G, L4: 24)")
    p.add_argument("--reserve-gb", type=float, default=1.5,
                   help="memory outside the step's peak: CUDA context, cuDNN workspace, fragmentation")
    p.add_argument("--matmul", type=int, default=8192, help="side of the peak-measuring matmul")
    p.add_argument("--threads", type=int, default=0, help="CPU only: torch threads (0: all cores)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, 1 thread, 32 px, supports 4 and 8, 2 query images, 1 inner step: seconds")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    import torch

    from piaa_dist.config import load_config, with_overrides
    from piaa_dist.model import select_device

    base = {"model.pretrained": args.pretrained}
    if args.device == "auto" and not torch.cuda.is_available() and not args.smoke:
        # (`make benchmarks` runs every script bare: 224 px second order on CPU takes hours)
        print("no usable CUDA device: running the smoke mode (--device cpu to time the full "
              "sizes on CPU anyway)")
        args.smoke = True
    if args.smoke:
        args.device, args.supports, args.steps, args.warmup, args.matmul = "cpu", [4, 8], 1, 1, 512
        args.threads = 1  # more OpenMP threads than free cores is pathological on a busy machine
        base.update({"data.image_size": 32, "data.query_size": 2, "meta.inner_steps": 1,
                     "run.use_gpu": "no"})
    device = select_device(args.device, "benchmarks/gpu_step.py")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    rows, fits = [], {}
    for variant in args.variants:
        cfg = with_overrides(load_config(args.config), {**base, **VARIANTS[variant]})
        precision = _precision(cfg, device)
        datasheet = _datasheet_peak(device)
        peak_sheet = datasheet.get(precision) if datasheet else None
        peak_measured = _measured_peak(device, precision, args.matmul)
        cells = []
        for support in args.supports:
            cell = {"variant": variant, "precision": precision,
                    **measure(cfg, device, support, args, channels_last_twice=variant.endswith("-cl"))}
            gc.collect()  # the cell's trainer and graphs, before the next cell's peak is taken
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if "oom" not in cell:
                cell["share_of_measured_peak"] = cell["tflops"] / peak_measured
                cell["share_of_datasheet_peak"] = cell["tflops"] / peak_sheet if peak_sheet else None
            cell["peak_tflops_measured"], cell["peak_tflops_datasheet"] = peak_measured, peak_sheet
            cells.append(cell)
            rows.append(cell)
            if "oom" in cell:
                print(f"{variant:<12} support {support:>3}: out of memory", flush=True)
            else:
                print(f"{variant:<12} support {support:>3}: {cell['step_s']:.3f} s, {cell['peak_gb']:.2f} GB, "
                      f"{cell['tflops']:.3g} TFLOP/s ({100 * cell['share_of_measured_peak']:.0f}% of the "
                      f"measured {precision} matmul peak, {peak_measured:.3g})", flush=True)
        ok = [c for c in cells if "oom" not in c]
        if len(ok) >= 2:
            slope, icpt = linear_fit([c["support"] for c in ok], [c["peak_gb"] for c in ok])
            budget = args.gpu_gb - args.reserve_gb
            fits[variant] = {"gb_per_support_image": slope, "intercept_gb": icpt,
                             "at_80_gb": slope * 80 + icpt,
                             "largest_support_that_fits": int((budget - icpt) / slope) if slope > 0 else None}

    header = (f"{'variant':<12} {'precision':>9} {'support':>7} {'step s':>8} {'peak GB':>8} "
              f"{'GFLOP':>9} {'TFLOP/s':>8} {'% meas.':>7} {'% sheet':>7}")
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        if "oom" in r:
            print(f"{r['variant']:<12} {r['precision']:>9} {r['support']:>7}   out of memory")
            continue
        sheet = "-" if r["share_of_datasheet_peak"] is None else f"{100 * r['share_of_datasheet_peak']:.1f}"
        print(f"{r['variant']:<12} {r['precision']:>9} {r['support']:>7} {r['step_s']:>8.3f} "
              f"{r['peak_gb']:>8.2f} {r['flops'] / 1e9:>9.1f} {r['tflops']:>8.3g} "
              f"{100 * r['share_of_measured_peak']:>7.1f} {sheet:>7}")
    if fits:
        print(f"\nmemory per support image (least squares) and the largest support that fits "
              f"{args.gpu_gb:g} GB - {args.reserve_gb:g} GB reserve:")
        for variant, f in fits.items():
            print(f"{variant:<12} {f['gb_per_support_image']:.3f} GB/image + {f['intercept_gb']:.2f} GB; "
                  f"80 images: {f['at_80_gb']:.1f} GB; fits up to {f['largest_support_that_fits']}")
    name = "gpu_step_smoke" if args.smoke else "gpu_step"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    out.write_text(json.dumps({
        "setup": {"config": os.path.relpath(args.config, ROOT), "device": str(device),
                  "device_name": device_name, "torch": torch.__version__, "smoke": args.smoke,
                  "tasks_per_rank": args.tasks, "steps": args.steps, "gpu_gb": args.gpu_gb,
                  "reserve_gb": args.reserve_gb, "loadavg": os.getloadavg()},
        "rows": rows, "fits": fits,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
