"""The meta-step against its peers, and every speed-up measured against the step before it.

**Versus** (the default): one meta-batch's second-order meta-gradient on ``jobs/configs/cpu.yaml``'s
model and inner loop (4 user tasks of 10 support and 30 query images at 32 px, 3 SGD inner
steps at the config's rate, 1 torch thread), computed by

* piaa-dist as it was (``meta.PLAIN``), then with each exact shortcut of ``meta.Speedups``
  added one at a time (the last row is what the trainer runs, ``meta.FAST``);
* tasks batched through the model with ``torch.func.vmap`` (per-task gradients, as the
  trainer's exact float64 per-task sums need): measured, not adopted;
* `higher` (``innerloop_ctx``) and TorchOpt (``MetaSGD``), written as a researcher would: the
  whole model forward at every inner step. They compute the same meta-gradient: the "err vs
  f64" column is each row's largest difference to the plain path run in float64, relative to
  its largest entry (float32 itself is only good to ~1e-2 when all parameters adapt at the
  config's inner rate of 0.8, and to ~1e-5 for the head).

for the inner loop adapting all parameters and the head only. Every row runs in the same
process, interleaved round by round (rotating the order), so machine load hits every row
alike; the table gives medians over the rounds of wall time and of this thread's CPU time
(``time.thread_time``, which other processes on a busy machine distort less), and ratios on
CPU time. The load average before and after is printed.

**Data**: a meta-batch's task preparation (cut, decode, normalize) on a synthetic world at the
same sizes, decoding every image at every visit versus the task stream's decoded-pixel cache
(warm), interleaved the same way.

**By flavour** (``--by-flavour``): each meta-gradient flavour in its own subprocess, user tasks
per second and peak resident memory (``ru_maxrss``; "step RSS" is what the meta-steps added
after imports and model build), as this benchmark measured before.

Usage::

    python benchmarks/meta_step.py                      # versus + data, cpu.yaml sizes
    python benchmarks/meta_step.py --rounds 25          # steadier medians
    python benchmarks/meta_step.py --by-flavour --paper --device cuda   # resnet18 / 224 px

TorchOpt is an optional benchmark dependency (``pip install -e .[bench]``); without it (or
without `higher`) its rows are skipped with a note. Writes ``benchmarks/results/meta_step.json``
(``meta_step_flavours.json`` for ``--by-flavour``) and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

FLAVOURS = ("second_order", "first_order", "reptile")
ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "jobs" / "configs" / "cpu.yaml"


def _rss_mib() -> float:
    """Current resident set size of this process (Linux /proc), MiB."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------------------------
# Versus: piaa-dist's shortcuts, one by one, against higher and TorchOpt


def _random_tasks(n: int, shots: int, query: int, size: int, seed: int = 1) -> list:
    import torch

    gen = torch.Generator().manual_seed(seed)

    def batch(k: int):
        return (torch.randn(k, 3, size, size, generator=gen),
                torch.randint(1, 6, (k,), generator=gen).float() / 5)

    return [SimpleNamespace(user=f"u{i}", support=batch(shots), query=batch(query)) for i in range(n)]


def _peer_higher(model, tasks, *, steps: int, lr: float, head_only: bool):
    """`higher`'s unrolled MAML: a functional copy of the whole model, one differentiable SGD
    step on the support loss per inner step, the query loss's gradient w.r.t. the meta weights."""
    import higher
    import torch
    import torch.nn.functional as F

    net = copy.deepcopy(model).train()
    leaves = list(net.parameters())
    opt = torch.optim.SGD(net.head.parameters() if head_only else net.parameters(), lr=lr)

    def run():
        total = [torch.zeros_like(p) for p in leaves]
        for t in tasks:
            with higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(steps):
                    diffopt.step(F.mse_loss(fnet(t.support[0]), t.support[1]))
                q = F.mse_loss(fnet(t.query[0]), t.query[1])
                grads = torch.autograd.grad(q, leaves, allow_unused=True, materialize_grads=True)
            total = [a + g for a, g in zip(total, grads)]
        return total

    return run


def _peer_torchopt(model, tasks, *, steps: int, lr: float, head_only: bool):
    """TorchOpt's MetaSGD (its MAML example's pattern): differentiable in-place steps of the
    module, the query loss's gradient w.r.t. the saved meta weights, the module restored."""
    import torch
    import torch.nn.functional as F
    import torchopt

    net = copy.deepcopy(model).train()
    leaves = list(net.parameters())
    inner = torchopt.MetaSGD(net.head if head_only else net, lr=lr)

    def run():
        total = [torch.zeros_like(p) for p in leaves]
        for t in tasks:
            net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
            opt_state = torchopt.extract_state_dict(inner, by="reference")
            for _ in range(steps):
                inner.step(F.mse_loss(net(t.support[0]), t.support[1]))
            q = F.mse_loss(net(t.query[0]), t.query[1])
            grads = torch.autograd.grad(q, leaves, allow_unused=True, materialize_grads=True)
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner, opt_state)
            total = [a + g for a, g in zip(total, grads)]
        return total

    return run


def _vmap_tasks(model, tasks, *, steps: int, lr: float, head_only: bool):
    """The meta-batch's tasks batched through the model with ``torch.func.vmap``: per-task
    gradients (``vmap(grad(task_loss))``, since the trainer sums tasks exactly in float64), each
    task's BatchNorm on its own batch (buffers batched per task). Head-only: the backbone once
    per set, as piaa-dist's head_features shortcut. Channels-last is not available under vmap."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    net = copy.deepcopy(model).train()
    xs = torch.stack([t.support[0] for t in tasks])
    ys = torch.stack([t.support[1] for t in tasks])
    xq = torch.stack([t.query[0] for t in tasks])
    yq = torch.stack([t.query[1] for t in tasks])
    n = len(tasks)

    def part(d, prefix):
        return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}

    params = {k: v.detach() for k, v in net.named_parameters()}
    batched = {k: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in net.named_buffers()}

    def fresh(b):
        return {k: v.clone() for k, v in b.items()}

    if head_only:
        def task_loss(bb, hd, bbuf, hbuf, xs_, ys_, xq_, yq_):
            fs = functional_call(net.backbone, (bb, fresh(bbuf)), (xs_,))
            cur = hd
            for _ in range(steps):
                g = grad(lambda c: F.mse_loss(functional_call(net.head, (c, fresh(hbuf)), (fs,)), ys_))(cur)
                cur = {k: cur[k] - lr * g[k] for k in cur}
            fq = functional_call(net.backbone, (bb, bbuf), (xq_,))
            return F.mse_loss(functional_call(net.head, (cur, hbuf), (fq,)), yq_)

        fn = vmap(grad(task_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0, 0, 0, 0))
        args = (part(params, "backbone."), part(params, "head."), part(batched, "backbone."),
                part(batched, "head."), xs, ys, xq, yq)

        def run():
            gb, gh = fn(*args)
            out = {**{"backbone." + k: v.sum(0) for k, v in gb.items()},
                   **{"head." + k: v.sum(0) for k, v in gh.items()}}
            return [out[k] for k in params]
    else:
        def task_loss(p, buf, xs_, ys_, xq_, yq_):
            cur = p
            for _ in range(steps):
                g = grad(lambda c: F.mse_loss(functional_call(net, (c, fresh(buf)), (xs_,)), ys_))(cur)
                cur = {k: cur[k] - lr * g[k] for k in cur}
            return F.mse_loss(functional_call(net, (cur, buf), (xq_,)), yq_)

        fn = vmap(grad(task_loss), in_dims=(None, 0, 0, 0, 0, 0))

        def run():
            g = fn(params, batched, xs, ys, xq, yq)
            return [g[k].sum(0) for k in params]

    return run


def _versus(args: argparse.Namespace) -> dict:
    import torch

    from piaa_dist.config import load_config, with_overrides
    from piaa_dist.meta import FAST, PLAIN, Speedups, meta_gradient, meta_kwargs
    from piaa_dist.model import build_model

    torch.set_num_threads(args.threads)
    cfg = with_overrides(load_config(args.config), {"model.pretrained": "none"})
    size = args.image_size or cfg.data.image_size
    lr, steps = cfg.meta.inner_lr, args.inner_steps or cfg.meta.inner_steps
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    tasks = _random_tasks(args.meta_batch, args.shots, args.query, size)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    chain = [  # (row, speedups): each adds one shortcut to the row above
        ("piaa-dist before (PLAIN)", PLAIN),
        ("+ lean inner steps", Speedups(head_features=False, channels_last=False, lean_steps=True)),
        ("+ channels-last images", Speedups(head_features=False, channels_last=True, lean_steps=True)),
        ("+ head features once (FAST)", FAST),
    ]
    peers = []
    for name, make in (("higher", _peer_higher), ("TorchOpt 0.7.3", _peer_torchopt)):
        module = "higher" if name == "higher" else "torchopt"
        try:
            __import__(module)
        except ImportError:
            print(f"note: {module} is not installed; its rows are skipped (pip install -e .[bench])")
            continue
        peers.append((name, make))
    tables = {}
    for inner in args.inner_params:
        kw = meta_kwargs(model, with_overrides(cfg, {"meta.inner_params": inner,
                                                     "meta.inner_steps": steps}).meta)
        rows: dict[str, dict] = {}
        for name, sp in chain:
            if inner == "all" and sp.head_features and not chain[-2][1].head_features:
                name = "+ head features (n/a: all adapt)"

            def ours(sp=sp, kw=kw):
                mg = meta_gradient(model, params, buffers, tasks, flavour="second_order",
                                   speedups=sp, **kw)
                return [mg.grads[n] for n in params]

            rows[name] = {"fn": ours, "kind": "piaa-dist"}
        rows["tasks batched (vmap), not adopted"] = {
            "fn": _vmap_tasks(model, tasks, steps=steps, lr=lr, head_only=inner == "head"),
            "kind": "experiment"}
        for name, make in peers:
            rows[name] = {"fn": make(model, tasks, steps=steps, lr=lr, head_only=inner == "head"),
                          "kind": "peer"}
        # The exact meta-gradient, as near as float64 gets: the plain path on float64 copies.
        m64 = copy.deepcopy(model).double()
        t64 = [SimpleNamespace(user=t.user, support=tuple(x.double() for x in t.support),
                               query=tuple(x.double() for x in t.query)) for t in tasks]
        g64 = meta_gradient(m64, dict(m64.named_parameters()), dict(m64.named_buffers()), t64,
                            flavour="second_order", speedups=PLAIN, **kw).grads
        ref = [g64[n] for n in params]
        scale = max(float(g.abs().max()) for g in ref)
        for r in rows.values():
            got = r["fn"]()
            r["rel_err"] = max(float((a.detach().double() - b).abs().max())
                               for a, b in zip(got, ref)) / scale
            r["wall"], r["cpu"] = [], []
        names = list(rows)
        for rnd in range(args.warmup + args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                w0, c0 = time.perf_counter(), time.thread_time()
                rows[name]["fn"]()
                if rnd >= args.warmup:
                    rows[name]["cpu"].append(time.thread_time() - c0)
                    rows[name]["wall"].append(time.perf_counter() - w0)
        out = []
        base = statistics.median(rows[chain[0][0]]["cpu"])
        peer_cpu = [statistics.median(r["cpu"]) for r in rows.values() if r["kind"] == "peer"]
        best_peer = min(peer_cpu) if peer_cpu else float("nan")
        for name, r in rows.items():
            cpu, wall = statistics.median(r["cpu"]), statistics.median(r["wall"])
            out.append({"row": name, "kind": r["kind"], "ms_wall": 1e3 * wall, "ms_cpu": 1e3 * cpu,
                        "tasks_per_cpu_s": args.meta_batch / cpu, "vs_before": base / cpu,
                        "vs_best_peer": best_peer / cpu, "rel_err_vs_float64": r["rel_err"],
                        "cpu_quartiles_ms": [1e3 * q for q in statistics.quantiles(r["cpu"], n=4)]
                        if len(r["cpu"]) > 1 else None})
        tables[inner] = out
    return {"tables": tables, "image_size": size, "inner_steps": steps, "inner_lr": lr}


def _data(args: argparse.Namespace) -> dict:
    """Task preparation per meta-batch: decode every visit vs the decoded-pixel cache (warm)."""
    import torch

    from piaa_dist.config import load_config
    from piaa_dist.data.ingest import ingest
    from piaa_dist.data.stream import Dataset, TaskStream
    from piaa_dist.data.synth import WorldSpec, make_world

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    size = args.image_size or cfg.data.image_size
    with tempfile.TemporaryDirectory() as tmp:
        make_world(Path(tmp) / "world", WorldSpec(users=24, images=600, ratings_per_user=(60, 100), seed=0))
        url = str(Path(tmp) / "data")
        ingest("flickr-aes", Path(tmp) / "world", url, workers=1)
        dataset = Dataset.open(url)
        users = dataset.users("train")
        streams = {}
        for cached in (False, True):
            streams["pixel cache (warm)" if cached else "decode every visit"] = TaskStream(
                dataset, users, rank=0, world_size=1, meta_batch=args.meta_batch, shots=args.shots,
                query_size=args.query, image_size=size, augment=False, seed=0, prefetch=0,
                cache_pixels=cached)
        steps = range(len(users) // args.meta_batch)  # one epoch: every user once
        for s in streams.values():  # warm both (encoded users; the pixel cache)
            for step in steps:
                s.tasks(step)
        times: dict[str, list[float]] = {k: [] for k in streams}
        for rnd in range(args.rounds):
            for name in (list(streams) if rnd % 2 == 0 else list(streams)[::-1]):
                c0 = time.thread_time()
                for step in steps:
                    streams[name].tasks(step)
                times[name].append((time.thread_time() - c0) / len(steps))
    base = statistics.median(times["decode every visit"])
    return {"rows": [{"row": k, "ms_cpu_per_meta_batch": 1e3 * statistics.median(v),
                      "vs_decode": base / statistics.median(v)} for k, v in times.items()],
            "augment": False, "image_size": size}


# ---------------------------------------------------------------------------------------------
# By flavour (subprocess per flavour, as before)


def _flavour_child(args: argparse.Namespace) -> dict:
    import dataclasses

    import torch

    torch.set_num_threads(args.threads)
    from piaa_dist.config import MetaConfig, ModelConfig, load_config
    from piaa_dist.meta import meta_gradient, meta_kwargs
    from piaa_dist.model import PAPER_MODEL, autocast, build_model, select_device

    device = select_device(args.device)
    model_cfg = PAPER_MODEL if args.paper else load_config(args.config).model
    if args.pretrained:
        model_cfg = dataclasses.replace(model_cfg, pretrained=args.pretrained)
    meta_cfg = MetaConfig(inner_steps=args.inner_steps or 3, inner_optimizer=args.optimizer,
                          inner_params=args.flavour_inner_params, inner_lr=0.01)
    torch.manual_seed(0)
    model = build_model(model_cfg if isinstance(model_cfg, ModelConfig) else model_cfg).to(device)
    size = args.image_size or (224 if args.paper else load_config(args.config).data.image_size)
    tasks = _random_tasks(args.meta_batch, args.shots, args.query, size)
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
    for _ in range(args.rounds):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {
        "flavour": args.flavour, "device": str(device),
        "tasks_per_s": args.rounds * args.meta_batch / elapsed,
        "s_per_meta_step": elapsed / args.rounds,
        "tasks_per_cpu_s": args.rounds * args.meta_batch / cpu,
        "peak_rss_mib": peak_rss, "rss_before_mib": rss_before,
        "meta_step_rss_mib": peak_rss - rss_before,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        out["peak_cuda_alloc_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _by_flavour(args: argparse.Namespace, argv: list[str]) -> int:
    rows = []
    for flavour in args.flavours:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--flavour", flavour]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            raise SystemExit(f"benchmark child for {flavour} failed (exit {res.returncode})")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    header = (f"{'flavour':<13} {'tasks/s':>8} {'tasks/cpu-s':>12} {'s/meta-step':>12} "
              f"{'peak RSS MiB':>13} {'step RSS MiB':>13}"
              + (f" {'peak CUDA MiB':>14}" if rows and "peak_cuda_alloc_mib" in rows[0] else ""))
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (f"{r['flavour']:<13} {r['tasks_per_s']:>8.2f} {r['tasks_per_cpu_s']:>12.2f} "
                f"{r['s_per_meta_step']:>12.3f} {r['peak_rss_mib']:>13.0f} {r['meta_step_rss_mib']:>13.0f}")
        if "peak_cuda_alloc_mib" in r:
            line += f" {r['peak_cuda_alloc_mib']:>14.0f}"
        print(line)
    out = Path(args.out or ROOT / "benchmarks" / "results" / "meta_step_flavours.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": _setup(args), "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------


def _setup(args: argparse.Namespace) -> dict:
    setup = {k: getattr(args, k) for k in ("config", "image_size", "shots", "query", "inner_steps",
                                           "meta_batch", "rounds", "warmup", "threads", "device")}
    setup["config"] = os.path.relpath(args.config, ROOT)
    setup.update(python=platform.python_version(), cpu_count=os.cpu_count(),
                 machine=platform.machine(), processor=platform.processor())
    try:
        import torch

        setup["torch"] = torch.__version__
        for mod in ("higher", "torchopt"):
            try:
                setup[mod] = getattr(__import__(mod), "__version__", "installed")
            except ImportError:
                setup[mod] = None
    except ImportError:  # pragma: no cover
        pass
    return setup


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CPU_CONFIG), help="model and inner loop (default cpu.yaml)")
    p.add_argument("--image-size", type=int, default=0, help="default: the config's data.image_size")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--query", type=int, default=30)
    p.add_argument("--inner-steps", type=int, default=0, help="default: the config's (3)")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--inner-params", nargs="+", default=["all", "head"], choices=("all", "head"))
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (every row once per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-data", action="store_true", help="skip the task-preparation table")
    p.add_argument("--out", default="")
    # --by-flavour mode
    p.add_argument("--by-flavour", action="store_true", help="the per-flavour subprocess table")
    p.add_argument("--flavours", nargs="+", default=list(FLAVOURS), choices=FLAVOURS)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--flavour-inner-params", default="all", choices=("all", "head"))
    p.add_argument("--device", default="cpu", help="--by-flavour: cpu, cuda or auto")
    p.add_argument("--paper", action="store_true", help="--by-flavour: resnet18 / 224 px")
    p.add_argument("--pretrained", default="", help="--by-flavour: override model.pretrained")
    p.add_argument("--no-amp", action="store_true", help="--by-flavour: no bf16 autocast on CUDA")
    p.add_argument("--flavour", help=argparse.SUPPRESS)  # child mode
    return p


def _print_versus(res: dict) -> None:
    for inner, rows in res["tables"].items():
        print(f"\ninner loop adapts: {'all parameters' if inner == 'all' else 'the head'}")
        header = (f"{'row':<36} {'ms wall':>8} {'ms CPU':>8} {'tasks/CPU-s':>11} {'x before':>8} "
                  f"{'x best peer':>11} {'err vs f64':>10}")
        print(header)
        print("-" * len(header))
        for r in rows:
            print(f"{r['row']:<36} {r['ms_wall']:>8.1f} {r['ms_cpu']:>8.1f} {r['tasks_per_cpu_s']:>11.1f} "
                  f"{r['vs_before']:>7.2f}x {r['vs_best_peer']:>10.2f}x {r['rel_err_vs_float64']:>10.1e}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    sys.path.insert(0, str(ROOT))
    if args.flavour:  # child: one flavour, JSON on stdout's last line
        print(json.dumps(_flavour_child(args)))
        return 0
    if args.by_flavour:
        return _by_flavour(args, argv)
    load_before = os.getloadavg()
    res = {"setup": _setup(args), "versus": _versus(args)}
    if not args.no_data:
        res["data"] = _data(args)
    res["setup"]["loadavg_before"], res["setup"]["loadavg_after"] = load_before, os.getloadavg()
    v = res["versus"]
    print(f"meta_step: {args.meta_batch} tasks x ({args.shots} support, {args.query} query) at "
          f"{v['image_size']} px, {v['inner_steps']} second-order SGD inner steps (lr {v['inner_lr']}), "
          f"{os.path.relpath(args.config, ROOT)}'s model, {args.threads} thread(s); medians of "
          f"{args.rounds} interleaved rounds; ratios on CPU time")
    _print_versus(v)
    if "data" in res:
        print(f"\ntask preparation per meta-batch (augment off, {res['data']['image_size']} px)")
        for r in res["data"]["rows"]:
            print(f"{r['row']:<22} {r['ms_cpu_per_meta_batch']:>8.2f} ms CPU  {r['vs_decode']:>6.2f}x")
    lb, la = res["setup"]["loadavg_before"], res["setup"]["loadavg_after"]
    print(f"\nload average before {lb[0]:.1f}, after {la[0]:.1f} on {os.cpu_count()} CPUs"
          + (" (a busy machine: read the CPU-time columns)" if max(lb[0], la[0]) > (os.cpu_count() or 1) else ""))
    out = Path(args.out or ROOT / "benchmarks" / "results" / "meta_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
