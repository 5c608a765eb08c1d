"""The scale benchmark: the full data path at 1k-100k users, the metadata path up to 1M users.

Run::

    python benchmarks/scale.py                              # everything (long: see below)
    python benchmarks/scale.py --users 1000 10000           # the full data path at these sizes
    python benchmarks/scale.py --metadata-users 1000 1000000 --users   # the metadata path only
    python benchmarks/scale.py --report                     # tables + plot from saved results

Each size's rows are merged into ``benchmarks/results/scale.json`` (so sizes can be run one
at a time, each within a few minutes) and every run ends by printing the tables from that file
and drawing ``docs/scale-cost-per-rating.png`` (log-log cost per rating against users).

**Full data path** (per number of users N), on a scale world (``piaa-dist synth --scale``: a
long tail of ratings per user, median 6, most users 2-20, a few up to 200; 32 px images; an
image pool of N/5, at least 2,000 and at most 20,000 images), in this order:

1. *ingest*: the ratings log into packed shards (``--shard-size`` samples each) on a local
   folder, with 1 and then 2 Ray workers (``ingest_distributed``, the same partitions of at
   most 4 shards for both, so both do the same work; one local Ray of 2 CPUs, its workers warmed up first).
   Reports ratings/s, the speed-up of 2 workers over 1 with the load average beside it
   (the machine is shared; ``--ingest-repeats R`` alternates R runs of each and keeps the
   fastest), ratings per CPU-second of the workers (what a busy machine distorts least),
   objects and bytes written, the image amplification and the workers' peak RSS; and checks
   that both runs wrote byte-identical shards and manifests. A third table takes the speed-up
   apart: the cores the workers got (their CPU time over the write
   phase's wall), how busy the whole machine was (``/proc/stat``), the workers' idle share
   between tasks, and the driver's serial plan + publish with the bound it alone sets.
2. *open*: ``Dataset.open`` in a fresh process: seconds, RSS added, manifest bytes.
3. *meta-steps*: ``meta_train`` with the CPU config (``jobs/configs/cpu.yaml``: 32 px convnet,
   4 tasks of 10 + 30 images, head-only second-order inner loop) for ``--steps`` steps in a
   fresh process with one torch thread (a Train worker's setting): steady-state seconds per
   meta-step (median after the first 3) and the data-wait share (time waiting for tasks /
   step time, with the stream's one-batch prefetch).
4. *evaluate*: ``evaluate_distributed`` with 2 Ray workers on up to ``--eval-users`` test
   users (shots 10, 2 repeats, blg-piaa and meta-no-adapt, the CPU config's fine-tuning
   budget; users with fewer than 13 ratings are skipped by the protocol and cost a read):
   seconds per test user, and per worker the dataset open time and the RSS it added.

**Metadata path** (per N up to 1M): a synthetic manifest (``benchmarks/metadata.py``'s, 3-40
ratings per user), opened in a fresh process: open seconds, RSS added and transient peak,
and the per-step costs (a meta-batch, a user lookup, a user's byte ranges).

Goals (issue 12.7): cost per rating flat within 1.5x from 1k to 100k users (full path) and up
to 1M (metadata path); no stage growing faster than linear (the log-log slope of each stage's
cost against ratings is printed: <= 1 is linear or better).

**Ingest only** (``--ingest-only``, issue 12's "no stage faster than linear"): the ingest of
the same scale world with ``--ingest-workers`` Ray workers (default 1) and nothing else, into
``benchmarks/results/scale-ingest.json`` under ``--label`` (e.g. ``main`` and ``store`` for
the code before and after the encoded-image store; ``--no-encode-store`` turns it off). It
reports the load-independent measures, decodes (images encoded) per rating and the CPU-seconds
per rating of the workers (and of the driver's plan + publish), with the wall and the load
average beside them, and the log-log slope of ingest CPU time against ratings between sizes.
``--world-dir DIR`` keeps the generated worlds there and reuses them, so runs of different
code ingest the very same files. To measure older code, run this script with ``PYTHONPATH``
pointing at a checkout of it (the store options are only passed when asked for).

Time on the 2-core development machine (shared, load average 5-40 during these runs): 1k
users ~1.5 min, 10k ~4 min, 100k ~25 min (run it alone: ``--users 100000``), metadata path
~2 min.
"""

from __future__ import annotations

import argparse
import filecmp
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS, in_child, machine, table

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = RESULTS / "scale.json"
PLOT = ROOT / "docs" / "scale-cost-per-rating.png"
CPU_CONFIG = ROOT / "jobs" / "configs" / "cpu.yaml"


# ---------------------------------------------------------------------------------------------
# Measurements that run in fresh child processes


def _rss(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure_open(url: str) -> dict:
    """Open the dataset in this fresh process: seconds and RSS added (imports excluded)."""
    logging.disable(logging.WARNING)
    from piaa_dist.data.stream import Dataset

    before = _rss()
    t0 = time.perf_counter()
    ds = Dataset.open(url)
    seconds = time.perf_counter() - t0
    return {"open_s": seconds, "open_rss_mb": _rss() - before, "users": ds.num_users(),
            "train_users": ds.num_users("train"), "test_users": ds.num_users("test")}


class TrainableUsers:
    """A dataset whose training split keeps only the users whose meta-task has at least 2
    support and 2 query images.

    Why: the CPU config's head has BatchNorm1d, which cannot normalise a batch of one image
    in training mode ("Expected more than 1 value per channel"), and a long-tailed log has
    many users whose task would have one: 2-5 ratings (the 80% rule leaves one query image)
    or ``shots + 1``. ``meta_train`` itself does not filter them (reported in the README's
    Scale section as a wall of the long tail). Everything else is the dataset's.
    """

    def __init__(self, dataset, shots: int, query_size: int):
        self._dataset, self._shots, self._query = dataset, shots, query_size

    def user_indices(self, split: str):
        import numpy as np

        rows = self._dataset.user_indices(split)
        if split != "train":
            return rows
        n = self._dataset.n_ratings_at(rows)
        few = np.minimum(n - 1, np.maximum(1, np.floor(0.8 * n).astype(np.int64)))
        support = np.where(n > self._shots, self._shots, few)
        query = np.minimum(self._query, n - support)
        return rows[(support >= 2) & (query >= 2)]

    def __getattr__(self, name: str):
        return getattr(self._dataset, name)


def measure_meta_steps(url: str, steps: int) -> dict:
    """``steps`` meta-steps of the CPU config on this dataset (users whose tasks BatchNorm can
    take: :class:`TrainableUsers`), one torch thread."""
    logging.disable(logging.WARNING)
    import torch

    from piaa_dist.config import load_config, with_overrides
    from piaa_dist.data.stream import Dataset
    from piaa_dist.train import meta_train

    torch.set_num_threads(1)
    cfg = with_overrides(load_config(str(CPU_CONFIG)), {"meta.meta_steps": steps, "run.validate_every": 0,
                                                        "run.patience": 0})
    ds = TrainableUsers(Dataset.open(url), cfg.data.shots, cfg.data.query_size)
    rows: list[dict] = []
    meta_train(cfg, ds, on_step=lambda step, m, trainer: rows.append(
        {"step_s": m["step_s"], "data_s": m["data_s"], "cpu_s": m["cpu_s"]}))
    steady = rows[3:] if len(rows) > 5 else rows
    step_s = statistics.median(r["step_s"] for r in steady)
    return {"steps": len(rows), "trainable_users": len(ds.user_indices("train")), "step_s": step_s,
            "step_s_mean": statistics.fmean(r["step_s"] for r in steady),
            "step_cpu_s": statistics.median(r["cpu_s"] for r in steady),
            "data_wait_share": sum(r["data_s"] for r in steady) / max(1e-9, sum(r["step_s"] for r in steady))}


# ---------------------------------------------------------------------------------------------
# The full data path at one size


def world_spec(users: int):
    from piaa_dist.data.scaleworld import ScaleSpec

    return ScaleSpec(users=users, images=min(20_000, max(2_000, users // 5)), image_size=32, ratings_median=6.0,
                     ratings_sigma=1.0, ratings_max=200, test_fraction=0.1)


def _warm_ray_workers(n: int) -> None:
    """Start ``n`` Ray worker processes and import the ingest code in them, so that neither
    run pays for worker start-up (the 2-worker run would otherwise pay for one more)."""
    import ray

    @ray.remote(num_cpus=1)
    def warm() -> int:
        import piaa_dist.data.ingest  # noqa: F401

        time.sleep(2.0)
        return os.getpid()

    pids = set(ray.get([warm.remote() for _ in range(n)]))
    if len(pids) < n:
        print(f"  (only {len(pids)} of {n} Ray workers warmed up)", flush=True)


def _cpu_ticks() -> tuple[float, float]:
    """The machine's (busy, total) CPU-seconds since boot, all CPUs, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return (total - idle) / hz, total / hz


def _same_output(a: str, b: str) -> bool:
    """Whether two ingests wrote byte-identical shards and manifests (reports differ)."""
    from piaa_dist.data.layout import resolve
    from piaa_dist.storage import open_store

    (_, va), (_, vb) = resolve(open_store(a)), resolve(open_store(b))
    fa = sorted(r for r in va.list("") if r != "ingest_report.json")
    fb = sorted(r for r in vb.list("") if r != "ingest_report.json")
    return fa == fb and all(filecmp.cmp(Path(va.url) / r, Path(vb.url) / r, shallow=False) for r in fa)


def full_path(users: int, tmp: Path, *, shard_size: int, partitions: int | None, steps: int, eval_users: int,
              threads: int, repeats: int = 1) -> dict:
    """Scale world -> ingest (1 and 2 Ray workers) -> open -> meta-steps -> evaluate."""
    import torch

    from piaa_dist.config import load_config, with_overrides
    from piaa_dist.data.scaleworld import write_scale_world
    from piaa_dist.data.stream import Dataset
    from piaa_dist.model import build_model
    from piaa_dist.orchestration.ray_evaluate import evaluate_distributed
    from piaa_dist.orchestration.ray_ingest import ingest_distributed

    row: dict = {"users": users}
    world = tmp / f"world-{users}"
    spec = world_spec(users)
    t0 = time.perf_counter()
    summary = write_scale_world(world, spec, images=True, workers=2)
    row.update(world_s=time.perf_counter() - t0, images=spec.images, ratings_read=summary.ratings,
               ratings_per_user_mean=summary.ratings_per_user["mean"])
    print(f"  world: {users:,} users, {summary.ratings:,} ratings, {spec.images:,} images "
          f"({row['world_s']:.0f}s)", flush=True)

    # Partitions of at most 4 shards (ingest_distributed's default rule), the same count for
    # both worker counts so both do the same work.
    partitions = partitions or max(4, math.ceil(summary.ratings / shard_size / 4))
    outs = {}
    for rep_i in range(repeats):
        # Alternating 1 and 2 workers, best of `repeats`: other load on a shared machine only
        # ever slows a run down, so the fastest run is the closest to what the code can do.
        for workers in (1, 2):
            out = str(tmp / f"data-{users}-w{workers}-{rep_i}")
            load0 = os.getloadavg()[0]
            busy0, total0 = _cpu_ticks()
            t0 = time.perf_counter()
            rep = ingest_distributed("ratings", None, out, workers=workers, partitions=partitions,
                                     threads=threads, ratings_file=world / summary.ratings_file,
                                     images_dir=world / "images", score_range=spec.scale, shard_size=shard_size)
            total_s = time.perf_counter() - t0
            busy1, total1 = _cpu_ticks()
            ex = rep["execution"]
            cpu = sum(t["cpu_s"] for t in ex["tasks"])
            # What the run got of the machine: the workers' CPU over the write phase's wall
            # ("cores": at most the worker count), and how busy the whole machine was meanwhile
            # (the rest is the driver, Ray's own processes and everyone else's load).
            machine_busy_s = busy1 - busy0
            n = rep["ratings"]["ingested"]
            run = {
                "seconds": total_s, "write_s": ex["write_seconds"], "ratings_per_s": n / total_s,
                "write_ratings_per_s": n / ex["write_seconds"], "cpu_s": cpu, "ratings_per_cpu_s": n / cpu,
                "partitions": ex["partitions"], "worker_peak_rss_mb": ex["worker_peak_rss_mb"],
                "load_before": load0, "load_after": os.getloadavg()[0],
                "cores": cpu / ex["write_seconds"], "machine_busy": machine_busy_s / max(1e-9, total1 - total0),
                "others_cpu_s": machine_busy_s - cpu, "task_wall_s": sum(t["seconds"] for t in ex["tasks"]),
            }
            key = f"ingest{workers}"
            row.setdefault(f"{key}_runs", []).append(run)
            if key not in row or run["seconds"] < row[key]["seconds"]:
                row[key] = run
            if workers in outs:
                shutil.rmtree(outs[workers], ignore_errors=True)
            outs[workers] = out
            print(f"  ingest, {workers} Ray worker(s): {n:,} ratings in {total_s:.1f}s ({n / total_s:,.0f}/s; "
                  f"{n / cpu:,.0f} per worker CPU-second; workers got {run['cores']:.2f} cores; machine "
                  f"{100 * run['machine_busy']:.0f}% busy; load {load0:.1f})", flush=True)
    row.update(
        ratings=rep["ratings"]["ingested"], skipped=sum(rep["ratings"]["skipped"].values()),
        objects=rep["objects"], shards=rep["shards"], bytes=rep["bytes"],
        amplification=rep["image_amplification"], decodes=rep["image_decodes"],
        decodes_per_rating=rep["image_decodes"] / rep["ratings"]["ingested"],
        train_users=rep["users"]["train"], test_users=rep["users"]["test"],
        identical=_same_output(outs[1], outs[2]),
    )
    w1, w2 = row["ingest1"], row["ingest2"]
    row["speedup_write"] = w1["write_s"] / w2["write_s"]
    row["speedup_total"] = w1["seconds"] / w2["seconds"]
    shutil.rmtree(outs[1], ignore_errors=True)
    url = outs[2]
    from piaa_dist.data.layout import resolve
    from piaa_dist.storage import open_store

    _, vstore = resolve(open_store(url))
    row["manifest_bytes"] = vstore.size("manifest.parquet")

    r = in_child(measure_open, url=url)
    row.update(open_s=r["open_s"], open_rss_mb=r["open_rss_mb"])
    print(f"  open: {row['open_s']:.2f}s, +{row['open_rss_mb']:.0f} MB RSS, manifest "
          f"{row['manifest_bytes'] / 1e6:.2f} MB", flush=True)

    r = in_child(measure_meta_steps, url=url, steps=steps)
    row.update(step_s=r["step_s"], step_cpu_s=r["step_cpu_s"], data_wait_share=r["data_wait_share"],
               train_peak_rss_mb=r["peak_rss_mb"], trainable_users=r["trainable_users"])
    print(f"  meta-steps: {row['step_s']:.3f}s per step (median of {r['steps'] - 3}), data wait "
          f"{100 * row['data_wait_share']:.1f}%", flush=True)

    torch.set_num_threads(1)
    cfg = with_overrides(load_config(str(CPU_CONFIG)), {
        "eval.shots": [10], "eval.repeats": 2, "eval.methods": ["blg-piaa", "meta-no-adapt"],
        "eval.protocol": "shared"})
    ds = Dataset.open(url)
    test = ds.users("test")[:eval_users]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    stats: list[dict] = []
    t0 = time.perf_counter()
    res = evaluate_distributed(cfg, ds, {"blg-piaa": model, "meta-no-adapt": model}, workers=2, users=test,
                               stats=stats)
    eval_s = time.perf_counter() - t0
    cell = res.stats("blg-piaa", 10)
    users_s = stats[0]["users_s"]
    row.update(eval_users=len(test), eval_scored=cell.n_users if cell else 0, eval_s=eval_s,
               eval_users_s=users_s, eval_s_per_user=users_s / len(test),
               eval_worker_ready_s=max(s["ready_s"] for s in stats),
               eval_worker_open_s=max(s["open_s"] for s in stats),
               eval_worker_open_rss_mb=max(s["open_rss_mb"] for s in stats),
               eval_worker_peak_rss_mb=max(s["peak_rss_mb"] for s in stats))
    print(f"  evaluate: {len(test)} test users ({row['eval_scored']} with >= 13 ratings) in {users_s:.1f}s on 2 "
          f"Ray workers = {row['eval_s_per_user'] * 1000:.0f} ms per user (+ {row['eval_worker_ready_s']:.1f}s "
          "worker start-up)", flush=True)
    shutil.rmtree(world, ignore_errors=True)
    shutil.rmtree(url, ignore_errors=True)
    row["machine"] = machine()
    return row


# ---------------------------------------------------------------------------------------------
# Ingest only: before/after comparisons of the ingest stage


def _world(users: int, tmp: Path, world_dir: Path | None) -> tuple[Path, dict]:
    """A scale world of ``users`` users: generated into ``tmp``, or kept and reused in
    ``world_dir`` (its summary in ``summary.json``)."""
    from piaa_dist.data.scaleworld import write_scale_world

    world = (world_dir or tmp) / f"world-{users}"
    done = world / "summary.json"
    if world_dir is not None and done.is_file():
        return world, json.loads(done.read_text())
    t0 = time.perf_counter()
    summary = write_scale_world(world, world_spec(users), images=True, workers=2)
    info = {"ratings_file": summary.ratings_file, "ratings": summary.ratings, "world_s": time.perf_counter() - t0}
    done.write_text(json.dumps(info) + "\n")
    return world, info


def ingest_only(users: int, tmp: Path, *, world_dir: Path | None, shard_size: int, partitions: int | None,
                threads: int, workers_list: list[int], encode_store: bool | None, repeats: int) -> dict:
    """The ingest stage alone, 1 Ray worker by default: decodes and CPU-seconds per rating."""
    from piaa_dist.orchestration.ray_ingest import ingest_distributed

    spec = world_spec(users)
    world, info = _world(users, tmp, world_dir)
    partitions = partitions or max(4, math.ceil(info["ratings"] / shard_size / 4))
    extra = {} if encode_store is None else {"encode_store": encode_store}
    row: dict = {"users": users, "images_pool": spec.images, "partitions": partitions}
    for workers in workers_list:
        best = None
        for rep_i in range(repeats):
            out = str(tmp / f"ingest-{users}-w{workers}-{rep_i}")
            load0 = os.getloadavg()[0]
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            rep = ingest_distributed("ratings", None, out, workers=workers, partitions=partitions, threads=threads,
                                     ratings_file=world / info["ratings_file"], images_dir=world / "images",
                                     score_range=spec.scale, shard_size=shard_size, **extra)
            wall = time.perf_counter() - t0
            driver_cpu = time.process_time() - cpu0
            shutil.rmtree(out, ignore_errors=True)
            ex = rep["execution"]
            n = rep["ratings"]["ingested"]
            cpu = sum(t["cpu_s"] for t in ex["tasks"])
            st = rep.get("image_store") or {}
            run = {"ratings": n, "images": rep["images"], "amplification": rep["image_amplification"],
                   "seconds": wall, "write_s": ex["write_seconds"], "cpu_s": cpu, "driver_cpu_s": driver_cpu,
                   "decodes": rep["image_decodes"], "store_hits": st.get("hits", 0),
                   "store_bytes": st.get("bytes_written", 0), "store_entries": st.get("writes", 0),
                   "cache_hits": rep["image_cache_hits"], "worker_peak_rss_mb": ex["worker_peak_rss_mb"],
                   "load_before": load0, "load_after": os.getloadavg()[0], "uptime": _uptime(),
                   "plan_s": ex.get("plan_seconds", float("nan")), "publish_s": ex.get("publish_seconds", float("nan")),
                   "cleanup_s": ex.get("store_cleanup_seconds", float("nan"))}
            print(f"  {users:,} users, {workers} Ray worker(s): {n:,} ratings, {run['decodes']:,} encodes "
                  f"({run['decodes'] / n:.3f}/rating), worker CPU {cpu:.1f}s ({1e6 * cpu / n:.1f} µs/rating), "
                  f"wall {wall:.1f}s (write {ex['write_seconds']:.1f}s, plan {run['plan_s']:.1f}s, store clean-up "
                  f"{run['cleanup_s']:.1f}s, publish {run['publish_s']:.1f}s); {run['uptime']}", flush=True)
            if best is None or cpu < best["cpu_s"]:
                best = run
        row[f"w{workers}"] = best
    row["machine"] = machine()
    return row


def _uptime() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}"


def ingest_report(data: dict) -> None:
    """Tables per label and worker count: per-rating decodes and CPU, and the log-log slopes."""
    for label in sorted(data):
        rows_by_n = data[label]
        sizes = sorted(rows_by_n, key=int)
        keys = sorted({k for n in sizes for k in rows_by_n[n] if k.startswith("w")})
        for key in keys:
            rows = []
            for n in sizes:
                r = rows_by_n[n].get(key)
                if r is None:
                    continue
                rows.append({"users": int(n), "ratings": r["ratings"], "images": r["images"],
                             "amplification": r["amplification"], "dec": r["decodes"] / r["ratings"],
                             "cpu": r["cpu_s"], "cpu_us": 1e6 * r["cpu_s"] / r["ratings"],
                             "drv_us": 1e6 * r["driver_cpu_s"] / r["ratings"],
                             "wall": r["seconds"], "wall_us": 1e6 * r["seconds"] / r["ratings"],
                             "store_mb": r["store_bytes"] / 1e6, "rss": r["worker_peak_rss_mb"],
                             "load": r["load_before"]})
            print(f"\ningest only: {label}, {key[1:]} Ray worker(s)")
            print(table(rows, [
                ("users", "users", ",d"), ("ratings", "ratings", ",d"), ("images", "images", ",d"),
                ("amplification", "amplif.", ".1f"), ("dec", "encodes/rating", ".3f"),
                ("cpu_us", "worker CPU µs/rating", ".1f"), ("drv_us", "driver CPU µs/rating", ".1f"),
                ("wall_us", "wall µs/rating", ".1f"), ("store_mb", "store MB", ".1f"),
                ("rss", "worker RSS MB", ".0f"), ("load", "load avg", ".1f")]))
            for cost, name in (("cpu", "worker CPU time"), ("wall", "wall time")):
                slopes = _slope(rows, cost)
                print(f"log-log slope of ingest {name} against ratings: " + ", ".join(f"{x:.2f}" for x in slopes))


# ---------------------------------------------------------------------------------------------
# The metadata path


def metadata_path(users: int, tmp: Path, calls: int) -> dict:
    from metadata import measure, write_manifest

    folder = tmp / f"m{users}"
    info = write_manifest(folder, users)
    r = in_child(measure, url=str(folder), n=users, calls=calls)
    shutil.rmtree(folder, ignore_errors=True)
    return {"users": users, "ratings": info["ratings"], "manifest_bytes": int(info["manifest_mb"] * 1e6),
            "open_s": r["open_s"], "open_rss_mb": r["open_rss_mb"], "open_peak_extra_mb": r["open_peak_extra_mb"],
            "batch_us": r["batch_us"], "lookup_us": r["lookup_us"], "parts_us": r["parts_us"],
            "machine": machine()}


# ---------------------------------------------------------------------------------------------
# Report: tables, goals, plot


def _load() -> dict:
    if OUT_JSON.is_file():
        return json.loads(OUT_JSON.read_text())
    return {"benchmark": "scale", "full": {}, "metadata": {}}


def _slope(rows: list[dict], cost: str, size: str = "ratings") -> list[float]:
    """Log-log slope of a stage's total cost against ``size`` between successive rows."""
    out = []
    for a, b in itertools.pairwise(rows):
        if a[cost] > 0 and b[cost] > 0:
            out.append(math.log(b[cost] / a[cost]) / math.log(b[size] / a[size]))
    return out


def report(data: dict, plot: Path | None) -> None:
    full = [data["full"][k] for k in sorted(data["full"], key=int)]
    meta = [data["metadata"][k] for k in sorted(data["metadata"], key=int)]
    if full:
        for r in full:
            r.setdefault("decodes_per_rating", r["decodes"] / r["ratings"])
            r["_ingest1_us"] = 1e6 * r["ingest1"]["seconds"] / r["ratings"]
            r["_ingest2_us"] = 1e6 * r["ingest2"]["seconds"] / r["ratings"]
            r["_cpu_us"] = 1e6 * r["ingest1"]["cpu_s"] / r["ratings"]
            r["_open_us"] = 1e6 * r["open_s"] / r["ratings"]
            r["_manifest_b"] = r["manifest_bytes"] / r["ratings"]
            r["_path_us"] = r["_ingest1_us"] + r["_open_us"]
            r["_r1"] = r["ingest1"]["ratings_per_s"]
            r["_r2"] = r["ingest2"]["ratings_per_s"]
            r["_rcpu1"] = r["ingest1"]["ratings_per_cpu_s"]
            r["_rcpu2"] = r["ingest2"]["ratings_per_cpu_s"]
            r["_load"] = r["ingest2"]["load_before"]
            r["_mb"] = r["bytes"] / 1e6
            r["_wrss"] = max(r["ingest1"]["worker_peak_rss_mb"], r["ingest2"]["worker_peak_rss_mb"])
            r["_eval_ms"] = 1000 * r["eval_s_per_user"]
            r["_wait"] = 100 * r["data_wait_share"]
        print("\nscale: full data path (scale world -> ingest -> open -> meta-steps -> evaluate), local folder")
        print(table(full, [
            ("users", "users", ",d"), ("ratings", "ratings", ",d"), ("_r1", "ingest/s 1w", ",.0f"),
            ("_r2", "ingest/s 2w", ",.0f"), ("speedup_total", "2w/1w", ".2f"), ("speedup_write", "2w/1w write", ".2f"),
            ("_load", "load avg", ".1f"), ("_rcpu1", "per CPU-s 1w", ",.0f"), ("_rcpu2", "per CPU-s 2w", ",.0f"),
            ("objects", "objects", ",d"), ("_mb", "MB written", ",.1f"), ("amplification", "amplif.", ".2f"),
            ("decodes_per_rating", "decodes/rating", ".2f"),
            ("_wrss", "worker RSS MB", ".0f"), ("identical", "1w==2w", "")]))
        print(table(full, [
            ("users", "users", ",d"), ("manifest_bytes", "manifest B", ",d"), ("open_s", "open s", ".3f"),
            ("open_rss_mb", "open +RSS MB", ".1f"), ("eval_worker_open_rss_mb", "eval worker +RSS MB", ".1f"),
            ("step_s", "s/meta-step", ".3f"), ("_wait", "data wait %", ".1f"),
            ("train_peak_rss_mb", "train RSS MB", ".0f"), ("eval_users", "eval users", ",d"),
            ("_eval_ms", "eval ms/user", ".0f")]))
        nan = float("nan")
        for r in full:
            a, b = r["ingest1"], r["ingest2"]
            r["_serial1"] = a["seconds"] - a["write_s"]
            r["_cores1"] = a.get("cores", a["cpu_s"] / a["write_s"])
            r["_cores2"] = b.get("cores", b["cpu_s"] / b["write_s"])
            r["_cores_ratio"] = r["_cores2"] / r["_cores1"]
            r["_eff"] = b["ratings_per_cpu_s"] / a["ratings_per_cpu_s"]
            r["_busy1"], r["_busy2"] = 100 * a.get("machine_busy", nan), 100 * b.get("machine_busy", nan)
            r["_amdahl"] = a["seconds"] / (r["_serial1"] + a["write_s"] / 2)
            # Workers idle between their tasks (waiting for the driver's next partition).
            r["_idle1"] = 100 * (1 - a["task_wall_s"] / a["write_s"]) if "task_wall_s" in a else nan
            r["_idle2"] = 100 * (1 - b["task_wall_s"] / (2 * b["write_s"])) if "task_wall_s" in b else nan
        print("ingest speed-up, taken apart: write-phase 2w/1w = (cores the workers got, 2w/1w) x (ratings per "
              "worker CPU-second, 2w/1w); the driver's plan + publish is serial (Amdahl = the bound it alone sets)")
        print(table(full, [
            ("users", "users", ",d"), ("speedup_total", "2w/1w", ".2f"), ("_load", "load avg", ".1f"),
            ("_cores1", "cores 1w", ".2f"), ("_cores2", "cores 2w", ".2f"), ("_cores_ratio", "cores 2w/1w", ".2f"),
            ("_eff", "per CPU-s 2w/1w", ".2f"), ("_busy1", "machine busy % 1w", ".0f"),
            ("_busy2", "machine busy % 2w", ".0f"), ("_idle1", "idle % 1w", ".1f"), ("_idle2", "idle % 2w", ".1f"),
            ("_serial1", "plan+publish s", ".2f"),
            ("_amdahl", "Amdahl bound", ".2f")]))
        print("cost per rating (µs): ingest = wall of the 1-worker ingest (plan + write + publish); "
              "CPU = the workers' CPU time; path = ingest + open")
        print(table(full, [("users", "users", ",d"), ("_ingest1_us", "ingest 1w", ".1f"),
                           ("_ingest2_us", "ingest 2w", ".1f"), ("_cpu_us", "ingest CPU", ".1f"),
                           ("_open_us", "open", ".3f"), ("_manifest_b", "manifest B/rating", ".2f"),
                           ("_path_us", "path", ".1f")]))
        lo, hi = full[0], full[-1]
        for key, name in (("_path_us", "full path (ingest + open)"), ("_cpu_us", "ingest CPU"),
                          ("_manifest_b", "manifest bytes")):
            ratio = hi[key] / lo[key]
            print(f"goal: {name} per rating {lo['users']:,} -> {hi['users']:,} users: x{ratio:.2f} "
                  f"({'within' if ratio <= 1.5 else 'OUTSIDE'} 1.5x)")
        for key, name in (("ingest1.seconds", "ingest"), ("open_s", "open"), ("eval_s_per_user", "eval per user"),
                          ("step_s", "meta-step")):
            rows = [{"ratings": r["ratings"], "v": _get(r, key)} for r in full]
            slopes = _slope(rows, "v")
            print(f"log-log slope of {name} against ratings: " + ", ".join(f"{s:.2f}" for s in slopes))
    if meta:
        for r in meta:
            r["_open_us"] = 1e6 * r["open_s"] / r["ratings"]
            r["_rss_b"] = r["open_rss_mb"] * 2**20 / r["ratings"]
            r["_man_b"] = r["manifest_bytes"] / r["ratings"]
        print("\nscale: metadata path (a worker opening a manifest; no shard read)")
        print(table(meta, [
            ("users", "users", ",d"), ("ratings", "ratings", ",d"), ("manifest_bytes", "manifest B", ",d"),
            ("open_s", "open s", ".2f"), ("open_rss_mb", "+RSS MB", ".0f"), ("open_peak_extra_mb", "peak MB", ".0f"),
            ("batch_us", "batch µs", ".0f"), ("lookup_us", "lookup µs", ".1f"), ("parts_us", "parts µs", ".1f"),
            ("_open_us", "open µs/rating", ".3f"), ("_rss_b", "RSS B/rating", ".1f"),
            ("_man_b", "manifest B/rating", ".2f")]))
        big = [r for r in meta if r["users"] >= 10_000] or meta
        for key, name in (("_open_us", "open time"), ("_rss_b", "RSS added"), ("_man_b", "manifest bytes")):
            ratio = big[-1][key] / big[0][key]
            print(f"goal: metadata {name} per rating {big[0]['users']:,} -> {big[-1]['users']:,} users: x{ratio:.2f} "
                  f"({'within' if ratio <= 1.5 else 'OUTSIDE'} 1.5x)")
        print("log-log slope of open time against ratings: " + ", ".join(f"{s:.2f}" for s in _slope(meta, "open_s")))
    if plot is not None and (full or meta):
        _plot(full, meta, plot)
        print(f"plot: {plot}")


def _get(row: dict, key: str) -> float:
    for part in key.split("."):
        row = row[part]
    return float(row)


def _plot(full: list[dict], meta: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if full:
        u = [r["users"] for r in full]
        ax.loglog(u, [r["_ingest1_us"] for r in full], "o-", label="ingest, 1 Ray worker (wall)")
        ax.loglog(u, [r["_ingest2_us"] for r in full], "s-", label="ingest, 2 Ray workers (wall)")
        ax.loglog(u, [r["_cpu_us"] for r in full], "^--", label="ingest, worker CPU time")
        ax.loglog(u, [r["_open_us"] for r in full], "d-", label="open dataset (full path)")
    if meta:
        ax.loglog([r["users"] for r in meta], [r["_open_us"] for r in meta], "x:",
                  label="open manifest (metadata path)")
    ax.set_xlabel("users")
    ax.set_ylabel("µs per rating")
    ax.set_title("Cost per rating against users (flat = linear scaling)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, nargs="*", default=None,
                   help="full data path at these sizes (default 1000 10000 100000; give none to skip)")
    p.add_argument("--metadata-users", type=int, nargs="*", default=None,
                   help="metadata path at these sizes (default 1000 10000 100000 1000000 when running everything)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--partitions", type=int, default=None,
                   help="ingest partitions, the same for 1 and 2 workers (default: 4 shards each, at least 4)")
    p.add_argument("--threads", type=int, default=2, help="threads per ingest worker")
    p.add_argument("--ingest-repeats", type=int, default=1,
                   help="ingest runs with 1 and 2 workers, alternating; the fastest of each is reported")
    p.add_argument("--steps", type=int, default=23, help="meta-steps per size (the first 3 are warm-up)")
    p.add_argument("--eval-users", type=int, default=1000, help="test users evaluated at most, per size")
    p.add_argument("--calls", type=int, default=500, help="calls averaged per metadata per-step figure")
    p.add_argument("--report", action="store_true", help="only print the tables and draw the plot")
    p.add_argument("--ingest-only", action="store_true",
                   help="only the ingest stage at --users sizes, into scale-ingest.json under --label")
    p.add_argument("--label", default="current", help="--ingest-only: the name of this code's rows")
    p.add_argument("--ingest-workers", type=int, nargs="+", default=[1], help="--ingest-only: Ray workers (default 1)")
    p.add_argument("--no-encode-store", dest="encode_store", action="store_const", const=False, default=None,
                   help="--ingest-only: ingest without the encoded-image store")
    p.add_argument("--world-dir", default=None, help="--ingest-only: keep and reuse the generated worlds here")
    p.add_argument("--plot", default=str(PLOT), help=f"plot path (default {PLOT.relative_to(ROOT)})")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    everything = args.users is None and args.metadata_users is None and not args.report
    users = [1000, 10_000, 100_000] if args.users is None and not args.report else (args.users or [])
    meta_users = ([1000, 10_000, 100_000, 1_000_000] if everything else args.metadata_users or [])
    if args.ingest_only:
        return _main_ingest_only(args)
    data = _load()
    data["benchmark"] = "scale"
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        if users:
            import ray

            # No worker set-up hook (ray_train's would import torch into the ingest workers).
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
            try:
                _warm_ray_workers(2)
                for n in users:
                    print(f"full data path, {n:,} users", flush=True)
                    data["full"][str(n)] = full_path(n, tmp, shard_size=args.shard_size, partitions=args.partitions,
                                                     steps=args.steps, eval_users=args.eval_users,
                                                     threads=args.threads, repeats=args.ingest_repeats)
                    _save(data)
            finally:
                ray.shutdown()
        for n in meta_users:
            print(f"metadata path, {n:,} users", flush=True)
            data["metadata"][str(n)] = metadata_path(n, tmp, args.calls)
            _save(data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(data, Path(args.plot) if args.plot else None)
    print(f"results: {OUT_JSON}")
    return 0


def _code_path() -> str:
    import piaa_dist

    return str(Path(piaa_dist.__file__).parent)


def _main_ingest_only(args: argparse.Namespace) -> int:
    path = RESULTS / "scale-ingest.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-ingest-"))
    world_dir = Path(args.world_dir) if args.world_dir else None
    if world_dir is not None:
        world_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.users:
            import ray

            ray.init(address="local", num_cpus=max(2, max(args.ingest_workers)), include_dashboard=False,
                     logging_level=logging.WARNING)
            try:
                _warm_ray_workers(max(args.ingest_workers))
                # Which code the workers run (Ray puts the driver's working folder first on
                # their path: run from the checkout being measured).
                import piaa_dist

                code = ray.get(ray.remote(_code_path).remote())
                print(f"driver code: {Path(piaa_dist.__file__).parent}; Ray workers' code: {code}", flush=True)
                if code != str(Path(piaa_dist.__file__).parent):
                    raise SystemExit("the Ray workers import other code than the driver: run from the checkout")
                for n in args.users:
                    print(f"ingest only, {n:,} users ({args.label})", flush=True)
                    row = ingest_only(n, tmp, world_dir=world_dir, shard_size=args.shard_size,
                                      partitions=args.partitions, threads=args.threads,
                                      workers_list=args.ingest_workers, encode_store=args.encode_store,
                                      repeats=args.ingest_repeats)
                    data.setdefault(args.label, {})[str(n)] = row
                    RESULTS.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ingest_report(data)
    print(f"results: {path}")
    return 0


def _save(data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(data, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
