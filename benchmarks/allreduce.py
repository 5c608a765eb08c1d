"""The per-step all-reduce in float64 (default) against float32 (``run.allreduce_dtype``).

Three questions, one table each:

* **bytes**: the flat tensor a rank sends per meta-step for the GPU config's model (ResNet-18,
  paper head: gradients, BatchNorm statistics, 3 counters), and what a ring all-reduce moves
  per rank (``2 (W-1)/W`` times that), with the time that takes at 10 and 25 Gbit/s;
* **time**: a real gloo all-reduce of that tensor between ``--world`` local processes over TCP
  (localhost: memory-bound, so a floor for the network case), median of ``--reps``;
* **exactness**: real meta-gradients (the tiny synthetic world, CPU config, ``--world`` ranks),
  summed in float32 as the option does, against the float64 sum: relative error of the averaged
  gradient and of the parameters after the meta-update.

Usage::

    python benchmarks/allreduce.py                 # 2 ranks
    python benchmarks/allreduce.py --world 4 --reps 10

Writes ``benchmarks/results/allreduce.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import machine, save, table  # noqa: E402


def _paper_flat_size() -> int:
    from piaa_dist.config import load_config, with_overrides
    from piaa_dist.model import build_model
    from piaa_dist.train import MetaTrainer

    cfg = with_overrides(load_config(ROOT / "jobs/configs/gpu.yaml"),
                         {"model.pretrained": "none", "run.use_gpu": "no"})
    return MetaTrainer(cfg, build_model(cfg.model), device="cpu").flat_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, numel: int, reps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    times = {}
    for dtype in (torch.float64, torch.float32):
        t = torch.randn(numel, dtype=torch.float64).to(dtype)
        dist.all_reduce(t)  # warm-up
        samples = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            samples.append(time.perf_counter() - t0)
        times[str(dtype).removeprefix("torch.")] = statistics.median(samples)
    if rank == 0:
        Path(out).write_text(repr(times))
    dist.destroy_process_group()


def _gloo_times(world: int, numel: int, reps: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times")
        mp.spawn(_rank, args=(world, _free_port(), numel, reps, out), nprocs=world, join=True)
        return eval(Path(out).read_text())  # noqa: S307 - our own repr of a dict of floats


def _exactness(world: int) -> dict:
    import torch

    from piaa_dist.config import load_config
    from piaa_dist.data.ingest import ingest
    from piaa_dist.data.stream import Dataset, TaskStream
    from piaa_dist.data.synth import WorldSpec, make_world
    from piaa_dist.model import build_model
    from piaa_dist.train import MetaTrainer, meta_training_users

    torch.set_num_threads(2)
    cfg = load_config(ROOT / "jobs/configs/cpu.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        make_world(Path(tmp) / "world", WorldSpec(users=24, images=300, seed=0, image_size=40))
        ingest("flickr-aes", Path(tmp) / "world", str(Path(tmp) / "data"), workers=1)
        dataset = Dataset.open(str(Path(tmp) / "data"))
        users = meta_training_users(cfg, dataset)
        torch.manual_seed(0)
        trainer = MetaTrainer(cfg, build_model(cfg.model), device="cpu")
        flats = []
        for rank in range(world):
            stream = TaskStream(dataset, users, rank=rank, world_size=world, meta_batch=max(world, cfg.meta.meta_batch),
                                shots=cfg.data.shots, query_size=cfg.data.query_size,
                                image_size=cfg.data.image_size, augment=cfg.data.augment, seed=0)
            flats.append(trainer.local_flat(stream.tasks(0)))
    exact = sum(flats[1:], flats[0])
    rounded = sum((f.float() for f in flats[1:]), flats[0].float()).double()
    n_grad = sum(p.numel() for p in trainer.model.parameters())
    g64, g32 = exact[:n_grad], rounded[:n_grad]
    a, b = copy.deepcopy(trainer), copy.deepcopy(trainer)
    a.apply_flat(exact)
    b.apply_flat(rounded)
    pa = torch.cat([p.detach().reshape(-1).double() for p in a.model.parameters()])
    pb = torch.cat([p.detach().reshape(-1).double() for p in b.model.parameters()])
    p0 = torch.cat([p.detach().reshape(-1).double() for p in trainer.model.parameters()])
    return {
        "grad_rel_error": float((g32 - g64).norm() / g64.norm()),
        "grad_max_abs_error": float((g32 - g64).abs().max()),
        "update_rel_error": float((pb - pa).norm() / (pa - p0).norm()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()

    numel = _paper_flat_size()
    ring = 2 * (args.world - 1) / args.world
    times = _gloo_times(args.world, numel, args.reps)
    rows = []
    for dtype, size in (("float64", 8), ("float32", 4)):
        mib = numel * size / 2**20
        rows.append({
            "dtype": dtype, "MiB": mib, "ring_MiB": mib * ring,
            "s_10G": numel * size * ring * 8 / 10e9, "s_25G": numel * size * ring * 8 / 25e9,
            "gloo_local_s": times[dtype],
        })
    print(f"paper model: {numel:,} values per step, {args.world} ranks")
    print(table(rows, [("dtype", "dtype", "s"), ("MiB", "MiB/rank", ".1f"), ("ring_MiB", "ring MiB", ".1f"),
                       ("s_10G", "s @10Gb/s", ".3f"), ("s_25G", "s @25Gb/s", ".3f"),
                       ("gloo_local_s", "gloo localhost s", ".3f")]))
    exact = _exactness(args.world)
    print(f"float32 vs float64 sum of {args.world} ranks' real meta-gradients (CPU config): "
          f"gradient rel. error {exact['grad_rel_error']:.2e} (max abs {exact['grad_max_abs_error']:.2e}), "
          f"meta-update rel. error {exact['update_rel_error']:.2e}")
    path = save("allreduce", {"machine": machine(), "world": args.world, "values": numel,
                              "rows": rows, "exactness": exact})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
