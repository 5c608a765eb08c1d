"""Meta-step throughput and peak memory of each meta-gradient flavour, side by side.

Each flavour runs in its own subprocess (so peak memory is that flavour's alone): it builds the
model, makes random user tasks of the configured shape, runs warm-up meta-steps, then times
``--steps`` meta-steps of ``meta_gradient`` over a meta-batch of tasks and reports user tasks
per second (wall clock, and per second of the process's CPU time, which a busy machine
distorts less). Peak memory is the child's peak resident set size (``ru_maxrss``, which includes
the Python interpreter and torch itself); "step RSS" is that peak minus the RSS after imports
and model build, i.e. what the meta-steps added. On CUDA the peak allocated device memory is
reported as well.

Usage::

    python benchmarks/meta_step.py                    # CPU config, all flavours
    python benchmarks/meta_step.py --threads 2 --steps 5
    python benchmarks/meta_step.py --paper --device cuda   # resnet18 / 224 px

Writes ``benchmarks/results/meta_step.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

FLAVOURS = ("second_order", "first_order", "reptile")
ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    """Current resident set size of this process (Linux /proc), MiB."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from types import SimpleNamespace

    from piaa_dist.config import MetaConfig, ModelConfig
    from piaa_dist.meta import meta_gradient, meta_kwargs
    from piaa_dist.model import PAPER_MODEL, autocast, build_model, select_device

    device = select_device(args.device)
    model_cfg = PAPER_MODEL if args.paper else ModelConfig()
    if args.pretrained:
        model_cfg = dataclasses.replace(model_cfg, pretrained=args.pretrained)
    meta_cfg = MetaConfig(inner_steps=args.inner_steps, inner_optimizer=args.optimizer,
                          inner_params=args.inner_params, inner_lr=0.01)
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    gen = torch.Generator().manual_seed(1)
    size = args.image_size

    def batch(n: int):
        return (torch.randn(n, 3, size, size, generator=gen),
                torch.randint(1, 6, (n,), generator=gen).float() / 5)

    tasks = [SimpleNamespace(support=batch(args.shots), query=batch(args.query))
             for _ in range(args.meta_batch)]
    kw = meta_kwargs(model, meta_cfg)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    amp = device.type == "cuda" and not args.no_amp

    def step() -> None:
        with autocast(device, enabled=amp):
            mg = meta_gradient(model, params, buffers, tasks, flavour=args.flavour,
                               seeds=list(range(len(tasks))), **kw)
        for g in mg.grads.values():  # materialise (CUDA is asynchronous)
            g.sum().item()
            break

    rss_before = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0  # this process's CPU time: robust to a busy machine
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {
        "flavour": args.flavour,
        "device": str(device),
        "tasks_per_s": args.steps * args.meta_batch / elapsed,
        "s_per_meta_step": elapsed / args.steps,
        "tasks_per_cpu_s": args.steps * args.meta_batch / cpu,
        "peak_rss_mib": peak_rss,
        "rss_before_mib": rss_before,
        "meta_step_rss_mib": peak_rss - rss_before,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        out["peak_cuda_alloc_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _parser() -> argparse.ArgumentParser:
    from piaa_dist.config import DataConfig, MetaConfig

    data, meta = DataConfig(), MetaConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavours", nargs="+", default=list(FLAVOURS), choices=FLAVOURS)
    p.add_argument("--image-size", type=int, default=data.image_size)
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--query", type=int, default=20)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--optimizer", default=meta.inner_optimizer, choices=("sgd", "adam"))
    p.add_argument("--inner-params", default=meta.inner_params, choices=("all", "head"))
    p.add_argument("--meta-batch", type=int, default=meta.meta_batch)
    p.add_argument("--steps", type=int, default=3, help="timed meta-steps per flavour")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (run.threads_per_worker's default is 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--paper", action="store_true", help="resnet18 / paper head (use --image-size 224)")
    p.add_argument("--pretrained", default="", help="override model.pretrained (e.g. none)")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "meta_step.json"))
    p.add_argument("--flavour", help=argparse.SUPPRESS)  # child mode
    return p


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    args = _parser().parse_args(argv)
    if args.flavour:  # child: one flavour, JSON on stdout's last line
        print(json.dumps(_child(args)))
        return 0
    opts = {"--image-size": args.image_size, "--shots": args.shots, "--query": args.query,
            "--inner-steps": args.inner_steps, "--optimizer": args.optimizer,
            "--inner-params": args.inner_params, "--meta-batch": args.meta_batch,
            "--steps": args.steps, "--warmup": args.warmup, "--threads": args.threads,
            "--device": args.device}
    if args.pretrained:
        opts["--pretrained"] = args.pretrained
    child_args = [str(x) for kv in opts.items() for x in kv]
    child_args += ["--paper"] if args.paper else []
    child_args += ["--no-amp"] if args.no_amp else []
    rows = []
    for flavour in args.flavours:
        cmd = [sys.executable, str(Path(__file__).resolve()), *child_args, "--flavour", flavour]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            raise SystemExit(f"benchmark child for {flavour} failed (exit {res.returncode})")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    setup = {k: getattr(args, k) for k in ("image_size", "shots", "query", "inner_steps",
                                           "optimizer", "inner_params", "meta_batch", "steps",
                                           "warmup", "threads", "device", "paper")}
    setup.update(python=platform.python_version(), cpu_count=os.cpu_count(),
                 machine=platform.machine())
    try:
        import torch

        setup["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    header = (f"{'flavour':<13} {'tasks/s':>8} {'tasks/cpu-s':>12} {'s/meta-step':>12} "
              f"{'peak RSS MiB':>13} "
              f"{'step RSS MiB':>13}" + (f" {'peak CUDA MiB':>14}" if rows and
                                          "peak_cuda_alloc_mib" in rows[0] else ""))
    print(f"meta_step: {setup}")
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (f"{r['flavour']:<13} {r['tasks_per_s']:>8.2f} {r['tasks_per_cpu_s']:>12.2f} "
                f"{r['s_per_meta_step']:>12.3f} "
                f"{r['peak_rss_mib']:>13.0f} {r['meta_step_rss_mib']:>13.0f}")
        if "peak_cuda_alloc_mib" in r:
            line += f" {r['peak_cuda_alloc_mib']:>14.0f}"
        print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": setup, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
