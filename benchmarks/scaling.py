"""Meta-training throughput on 2 Ray Train workers against the best one-core run, by phase.

Each row meta-trains the CPU configuration (``jobs/configs/cpu.yaml``: convnet, 32 px, 10 shots
/ 30 query, 3 second-order inner steps on the head, 4 user tasks per meta-step) for
``--steps`` meta-steps on a synthetic world served by a local S3 endpoint (moto over real
HTTP), validating and checkpointing every ``--every`` steps, reporting every ``--log-every``
steps, and reads rank 0's reports from the run's ``metrics.jsonl`` (each carries its own
step's timings, so the reported steps are a sample of all steps, and running totals):

* **tasks/s**: tasks of the global meta-batch per second of meta-step wall time (data wait +
  the step itself), over the reported steps after ``--warmup``;
* **end-to-end tasks/s**: tasks per second of wall clock between the first and the last
  report after the warm-up: meta-steps plus validation, checkpoints and Ray's reports;
* **tasks/CPU-s**: tasks per second of process CPU time (all threads), over all ranks (rank
  0's CPU time times the number of ranks), which a busy machine distorts less than wall time;
* **per-phase time** per meta-step (rank 0): waiting for data, inner loops, outer gradients,
  all-reduce (including waiting for the slower rank), the meta-optimizer update; and
  validation and checkpoints per measured step (their totals over the window / steps).

Rows (threads fixed per worker so the comparison is fair on 2 cores):

==============  =======  ================  =========================================
row             workers  threads / worker  what it shows
==============  =======  ================  =========================================
in-process      0        1                 the same loop without Ray
ray 1x1         1        1                 Ray Train overhead on one core
ray 2x1         2        1                 data parallelism on both cores (all-reduce)
ray 1x2         1        2                 intra-op threads on both cores (``--rows``)
==============  =======  ================  =========================================

The goal is 2 workers at >= 1.7x the best one-core run (in-process or ray 1x1, whichever is
faster). The load average is sampled before, between and after the rows: other processes on
the machine slow every row, and the two-worker row most (it needs both cores).

Usage::

    RAY_TMPDIR=/tmp/myray python benchmarks/scaling.py [--steps 80] [--warmup 5] [--every 20]

Writes ``benchmarks/results/scaling.json`` and prints the tables.
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
    ("ray 2x1", 2, 1),
    ("ray 1x2", 1, 2),
)
DEFAULT_ROWS = "in-process,ray 1x1,ray 2x1"
PHASES = (("data_s", "data"), ("inner_s", "inner loop"), ("outer_s", "outer backward"),
          ("allreduce_s", "all-reduce"), ("update_s", "update"))


def _make_data(tmp: Path, users: int, endpoint: str) -> str:
    from piaa_dist.data.ingest import ingest
    from piaa_dist.data.synth import WorldSpec, make_world
    from piaa_dist.s3local import create_bucket

    make_world(tmp / "world", WorldSpec(users=users, images=600, ratings_per_user=(60, 100), seed=0))
    create_bucket(endpoint, "piaa-bench")
    url = "s3://piaa-bench/world"
    ingest("flickr-aes", tmp / "world", url, endpoint_url=endpoint, workers=2)
    return url


def _summarise(records: list[dict], warmup: int, meta_batch: int, workers: int) -> dict:
    """Rank 0's reports after the warm-up. Each report holds its own step's timings (a sample of
    the steps when not every step reports) and running totals, so the window's end-to-end time
    is the wall clock between its first and last report."""
    last = {r["step"]: r for r in records}  # a restarted run logs redone steps again
    steady = [last[s] for s in sorted(last) if s > warmup]
    if len(steady) < 2:
        raise RuntimeError("fewer than 2 reports after the warm-up: raise --steps")
    ranks = max(1, workers)
    wall = sum(r["step_s"] for r in steady)
    cpu = sum(r["cpu_s"] for r in steady)
    n = len(steady)
    first, end = steady[0], steady[-1]
    span_steps = end["step"] - first["step"]
    e2e = end["time"] - first["time"]
    val = end["val_total_s"] - first["val_total_s"]
    ckpt = end["checkpoint_total_s"] - first["checkpoint_total_s"]
    out = {
        "steps_measured": n,
        "tasks_per_s": meta_batch * n / wall,
        "e2e_tasks_per_s": meta_batch * span_steps / e2e if e2e > 0 else float("nan"),
        "s_per_step": wall / n,
        "s_per_step_median": statistics.median(r["step_s"] for r in steady),
        "data_wait_share": sum(r["data_s"] for r in steady) / wall,
        # rank 0's CPU time stands for every rank's (they run the same work)
        "tasks_per_cpu_s": meta_batch * n / (cpu * ranks) if cpu > 0 else float("nan"),
        "measured_wall_s": wall,
        "phases_ms_per_step": {key: 1e3 * sum(r.get(key, 0.0) for r in steady) / n for key, _ in PHASES},
        "validation_ms_per_step": 1e3 * val / span_steps if span_steps else float("nan"),
        "checkpoint_ms_per_step": 1e3 * ckpt / span_steps if span_steps else float("nan"),
        "validations": sum(1 for r in steady if "val_srocc" in r),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="meta-steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="first steps not measured")
    parser.add_argument("--every", type=int, default=20, help="validate and checkpoint every N steps (0: off)")
    parser.add_argument("--log-every", type=int, default=5,
                        help="report every N steps (each report is a Ray barrier; cpu.yaml logs every 10)")
    parser.add_argument("--users", type=int, default=24, help="users in the synthetic world")
    parser.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "cpu.yaml"))
    parser.add_argument("--rows", default=DEFAULT_ROWS,
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
    wanted = [r for r in ROWS if r[0] in set(args.rows.split(","))]
    loads = {"before": os.getloadavg()}
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
                for name, workers, threads in wanted:
                    cfg = with_overrides(load_config(args.config), {
                        "meta.meta_steps": args.steps, "run.checkpoint_every": args.every,
                        "run.validate_every": args.every,
                        "run.log_every": args.log_every, "run.threads_per_worker": threads,
                        "run.cpus_per_worker": threads, "run.register_name": "",
                    })
                    out = tmp / name.replace(" ", "_")
                    load0 = os.getloadavg()[0]
                    c0 = time.perf_counter()
                    run_distributed(cfg, url, out, workers=workers, s3_endpoint=server.endpoint_url)
                    total = time.perf_counter() - c0
                    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                    row = {"row": name, "workers": workers, "threads_per_worker": threads,
                           **_summarise(records, args.warmup, cfg.meta.meta_batch, workers),
                           "run_wall_s": total,
                           "loadavg_1m": [load0, os.getloadavg()[0]]}
                    results.append(row)
                    print(f"{name:<11} {row['tasks_per_s']:.2f} tasks/s ({row['e2e_tasks_per_s']:.2f} end to end), "
                          f"load {load0:.1f}->{os.getloadavg()[0]:.1f}", flush=True)
            finally:
                ray.shutdown()
        finally:
            server.stop()
    loads["after"] = os.getloadavg()

    one_core = [r for r in results if r["workers"] <= 1 and r["threads_per_worker"] == 1]
    best = max(one_core, key=lambda r: r["tasks_per_s"]) if one_core else None
    best_e2e = max(one_core, key=lambda r: r["e2e_tasks_per_s"]) if one_core else None
    for r in results:
        r["speedup_vs_best_one_core"] = r["tasks_per_s"] / best["tasks_per_s"] if best else float("nan")
        r["e2e_speedup_vs_best_one_core"] = (r["e2e_tasks_per_s"] / best_e2e["e2e_tasks_per_s"]
                                             if best_e2e else float("nan"))
    cfg = load_config(args.config)
    report = {
        "setup": {
            "config": os.path.relpath(args.config, ROOT),
            "steps": args.steps, "warmup": args.warmup, "every": args.every, "users": args.users,
            "meta_batch": cfg.meta.meta_batch, "flavour": cfg.meta.flavour,
            "inner_params": cfg.meta.inner_params,
            "inner_steps": cfg.meta.inner_steps, "image_size": cfg.data.image_size,
            "shots": cfg.data.shots, "query_size": cfg.data.query_size,
            "data": "synthetic world on a local moto S3 endpoint (HTTP)",
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "loadavg": loads,
            "best_one_core": best["row"] if best else None,
        },
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"\n{'row':<11} {'workers':>7} {'thr/wkr':>7} {'tasks/s':>8} {'x best 1-core':>13} "
          f"{'e2e tasks/s':>11} {'x e2e':>6} {'tasks/CPU-s':>11} {'load 1m':>9}")
    for r in results:
        print(f"{r['row']:<11} {r['workers']:>7} {r['threads_per_worker']:>7} {r['tasks_per_s']:>8.2f} "
              f"{r['speedup_vs_best_one_core']:>12.2f}x {r['e2e_tasks_per_s']:>11.2f} "
              f"{r['e2e_speedup_vs_best_one_core']:>5.2f}x {r['tasks_per_cpu_s']:>11.2f} "
              f"{r['loadavg_1m'][0]:>4.1f}-{r['loadavg_1m'][1]:.1f}")
    print(f"\nper-phase time, ms per meta-step (rank 0; validation and checkpoints every {args.every} "
          "steps, spread over the measured steps)")
    names = [label for _, label in PHASES] + ["validation", "checkpoint"]
    print(f"{'row':<11} " + " ".join(f"{n:>14}" for n in names))
    for r in results:
        vals = [r["phases_ms_per_step"][k] for k, _ in PHASES]
        vals += [r["validation_ms_per_step"], r["checkpoint_ms_per_step"]]
        print(f"{r['row']:<11} " + " ".join(f"{v:>14.1f}" for v in vals))
    print(f"\nbest one-core run: {best['row'] if best else '-'}; load average before "
          f"{loads['before'][0]:.1f}, after {loads['after'][0]:.1f} on {os.cpu_count()} CPUs"
          + (" (busy: other processes share these cores; read tasks/CPU-s too)"
             if max(loads['before'][0], loads['after'][0]) > 1.0 else "")
          + f"; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
