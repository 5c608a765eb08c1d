"""Meta-training throughput with 1 and 2 Ray Train workers on this machine.

Each row meta-trains the CPU configuration (``jobs/configs/cpu.yaml``: convnet, 64 px,
10 shots / 20 query, 3 second-order inner steps, 4 user tasks per meta-step) for ``--steps``
meta-steps on a synthetic world served by a local S3 endpoint (moto over real HTTP), and
reads rank 0's per-step metrics from the run's ``metrics.jsonl``:

* **user tasks/s**: tasks of the global meta-batch / wall time of the step, over the steps
  after ``--warmup`` (Ray start-up, worker spawn and the first steps' caches excluded);
* **data wait**: share of the step's wall time rank 0 spent waiting for its tasks
  (``TaskStream`` fetches and decodes ahead in background threads; this is what is left);
* **tasks / CPU-s**: the rank's tasks per second of its own process CPU time (all threads),
  which a busy machine distorts less than wall time;
* **start-up**: wall time of the whole run minus its measured steps (Ray and workers).

Rows (threads fixed per worker so the comparison is fair on 2 cores):

==============  =======  ================  =========================================
row             workers  threads / worker  what it shows
==============  =======  ================  =========================================
in-process      0        1                 the same loop without Ray (baseline)
ray 1x1         1        1                 Ray Train overhead on one core
ray 1x2         1        2                 intra-op threads on both cores
ray 2x1         2        1                 data parallelism on both cores (all-reduce)
==============  =======  ================  =========================================

Usage::

    python benchmarks/scaling.py [--steps 10] [--warmup 2] [--users 24]

Writes ``benchmarks/results/scaling.json`` and prints a table. The load average before and
after is recorded: other processes on the machine slow every row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

ROWS = (
    ("in-process", 0, 1),
    ("ray 1x1", 1, 1),
    ("ray 1x2", 1, 2),
    ("ray 2x1", 2, 1),
)


def _make_data(tmp: Path, users: int, endpoint: str) -> str:
    from piaa_dist.data.ingest import ingest
    from piaa_dist.data.synth import WorldSpec, make_world
    from piaa_dist.s3local import create_bucket

    make_world(tmp / "world", WorldSpec(users=users, images=600, ratings_per_user=(60, 100), seed=0))
    create_bucket(endpoint, "piaa-bench")
    url = "s3://piaa-bench/world"
    ingest("flickr-aes", tmp / "world", url, endpoint_url=endpoint, workers=2)
    return url


def _summarise(rows: list[dict], warmup: int, meta_batch: int, workers: int) -> dict:
    last = {r["step"]: r for r in rows}
    steady = [last[s] for s in sorted(last) if s > warmup]
    if not steady:
        raise RuntimeError("no steps after the warm-up: raise --steps")
    wall = sum(r["step_s"] for r in steady)
    data = sum(r["data_s"] for r in steady)
    cpu = sum(r["cpu_s"] for r in steady)
    per_rank = meta_batch / max(1, workers)
    return {
        "steps_measured": len(steady),
        "tasks_per_s": meta_batch * len(steady) / wall,
        "s_per_step": wall / len(steady),
        "s_per_step_median": statistics.median(r["step_s"] for r in steady),
        "data_wait_share": data / wall,
        "rank0_tasks_per_cpu_s": per_rank * len(steady) / cpu if cpu > 0 else float("nan"),
        "measured_wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="meta-steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="first steps not measured")
    parser.add_argument("--users", type=int, default=24, help="users in the synthetic world")
    parser.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "cpu.yaml"))
    parser.add_argument("--rows", default=",".join(r[0] for r in ROWS),
                        help="comma-separated subset of: " + ", ".join(r[0] for r in ROWS))
    parser.add_argument("--out", default=str(RESULTS / "scaling.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

    import ray
    import torch

    from piaa_dist.config import load_config, with_overrides
    from piaa_dist.orchestration.ray_train import run_distributed
    from piaa_dist.s3local import ensure_fake_credentials, start_local_s3

    ensure_fake_credentials()
    wanted = set(args.rows.split(","))
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        server = start_local_s3(bucket=None, port=0)
        try:
            url = _make_data(tmp, args.users, server.endpoint_url)
            ray.init(
                num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
                log_to_driver=False,
                runtime_env={"worker_process_setup_hook":
                             "piaa_dist.orchestration.ray_train.quiet_ray_logs"},
            )
            try:
                for name, workers, threads in ROWS:
                    if name not in wanted:
                        continue
                    cfg = with_overrides(load_config(args.config), {
                        "meta.meta_steps": args.steps, "run.checkpoint_every": args.steps,
                        "run.log_every": 1, "run.validate_every": 0,
                        "run.threads_per_worker": threads, "run.cpus_per_worker": threads,
                        "run.register_name": "",
                    })
                    out = tmp / name.replace(" ", "_")
                    t0 = time.perf_counter()
                    run_distributed(cfg, url, out, workers=workers, s3_endpoint=server.endpoint_url)
                    total = time.perf_counter() - t0
                    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                    row = {"row": name, "workers": workers, "threads_per_worker": threads,
                           **_summarise(rows, args.warmup, cfg.meta.meta_batch, workers)}
                    row["startup_s"] = total - sum(r["step_s"] for r in rows)
                    results.append(row)
                    print(f"{name:<11} {row['tasks_per_s']:.2f} tasks/s, "
                          f"data wait {100 * row['data_wait_share']:.1f}%", flush=True)
            finally:
                ray.shutdown()
        finally:
            server.stop()
    load_after = os.getloadavg()

    cfg = load_config(args.config)
    report = {
        "setup": {
            "config": os.path.relpath(args.config, ROOT),
            "steps": args.steps, "warmup": args.warmup, "users": args.users,
            "meta_batch": cfg.meta.meta_batch, "flavour": cfg.meta.flavour,
            "inner_steps": cfg.meta.inner_steps, "image_size": cfg.data.image_size,
            "shots": cfg.data.shots, "query_size": cfg.data.query_size,
            "data": "synthetic world on a local moto S3 endpoint (HTTP)",
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "loadavg_before": load_before, "loadavg_after": load_after,
        },
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))

    base = next((r for r in results if r["row"] == "ray 1x1"), None)
    print()
    print(f"{'row':<11} {'workers':>7} {'thr/wkr':>7} {'tasks/s':>8} {'speed-up':>8} "
          f"{'s/step':>7} {'data wait':>9} {'tasks/CPU-s':>11} {'start-up s':>10}")
    for r in results:
        speed = r["tasks_per_s"] / base["tasks_per_s"] if base else float("nan")
        print(f"{r['row']:<11} {r['workers']:>7} {r['threads_per_worker']:>7} "
              f"{r['tasks_per_s']:>8.2f} {speed:>7.2f}x {r['s_per_step']:>7.2f} "
              f"{100 * r['data_wait_share']:>8.1f}% {r['rank0_tasks_per_cpu_s']:>11.2f} "
              f"{r['startup_s']:>10.1f}")
    print(f"\nload average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
          f"(on {os.cpu_count()} CPUs); written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
