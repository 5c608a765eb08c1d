"""Time to quality: piaa-dist against a faithful re-implementation of the released BLG-PIAA loop.

Three meta-training runs per seed, one after the other on this machine, on the same data path
(one ingested synthetic world, tasks from ``TaskStream``) and the same model
(``jobs/configs/demo.yaml``'s, or ``--config``):

* **reference**: :mod:`piaa_dist.reference`, the public code's loop (first-order,
  Reptile-like; one persistent Adam, 1e-4 backbone / 1e-3 head; 5 support then 5 query Adam
  steps per task; the tasks of a meta-batch of 4 applied one after the other as
  ``(adapted − meta) / 4`` moves; learning rates ×0.9 per epoch), sequential in one process
  with ``--ref-threads`` torch threads (default 2: the whole machine), for ``--ref-budget``
  seconds;
* **piaa-dist, 2 Ray workers**: ``run_distributed(workers=2)`` with the config's algorithm
  (second-order meta-gradients through the adapted head, all-reduced), ``meta.meta_steps``
  steps, timed from before Ray starts;
* **piaa-dist, in-process**: the same algorithm in one process with 1 thread, to separate the
  algorithm from the distribution.

The runs validate nothing on the clock (``run.validate_every=0``): each keeps a checkpoint every
``--every`` meta-steps (``run.keep_checkpoints=0``) with its wall time and the CPU time of all
of its processes (driver, Ray daemons and workers; sampled every 0.5 s). Afterwards, off the
clock, every checkpoint is scored on the validation users (training users held out of
meta-training, never test users) with one and the same fine-tuning budget
(:func:`piaa_dist.orchestration.step_hook.validation_score`: ``eval.finetune_*`` at
``min(eval.shots)`` shots, ``eval.repeats`` splits, 5 with ``--quick``). A curve's value at a
checkpoint is the mean of the last 3 checkpoints' scores (8 validation users are noisy); a method's **plateau**
is the highest such value, and its time to a validation SROCC τ is the first checkpoint at
which it reaches τ.

Reported per seed and τ (around and above the validation users' average-user ceiling, and the
reference's plateau minus 0.01, "the reference's plateau"): wall seconds and CPU-seconds to τ
per method, and the ratio reference ÷ piaa-dist split into (steps to τ ratio) × (seconds per
step ratio). The headline is the ratio at the reference's plateau: the median over seeds with
a 95% confidence interval (a t-interval of the mean log-ratio; the seeds' own values beside
it). Goals (issue 15): piaa-dist reaches the reference's plateau ≥ 4× sooner, and its own
plateau is higher.

Usage::

    python benchmarks/time_to_quality.py            # 3 seeds, the README table
    python benchmarks/time_to_quality.py --quick    # 1 seed, fewer τ; last line "ratio X.XX"

Writes ``benchmarks/results/time_to_quality[_quick].json``. The load average is recorded: other
work on the machine slows every run (wall time more than CPU time).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _util import in_child, machine, save, table  # noqa: E402

DEFAULT_CONFIG = ROOT / "jobs" / "configs" / "demo.yaml"
METHODS = ("reference", "piaa-dist 2 Ray workers", "piaa-dist in-process")
#: the curve at a checkpoint: mean of this many last checkpoints' validation scores
SMOOTH = 3
#: "reached the reference's plateau": within this of it
PLATEAU_TOLERANCE = 0.01


class CpuSampler:
    """CPU seconds (user + system) of this process and all its descendants, over time.

    A background thread reads the process tree from ``/proc`` every ``interval`` s; a process
    that exits keeps the last CPU time it was seen with. ``at(t)`` interpolates the total at
    Unix time t. (Linux only, no dependency.)
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, interval: float = 0.5):
        self.root = os.getpid()
        self.interval = interval
        self.seen: dict[int, float] = {}
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _stat(pid: str) -> tuple[int, float] | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / CpuSampler.TICK  # ppid, utime+stime

    def _sample(self) -> None:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (st := self._stat(entry)) is not None:
                stats[int(entry)] = st
        tree, frontier = {self.root}, [self.root]
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in tree:
                    tree.add(child)
                    frontier.append(child)
        for pid in tree:
            if pid in stats:
                self.seen[pid] = stats[pid][1]
        self.samples.append((time.time(), sum(self.seen.values())))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def at(self, t: float) -> float:
        """Total CPU seconds at Unix time ``t`` (linear between samples), from the start."""
        base = self.samples[0][1]
        for (t0, c0), (t1, c1) in zip(self.samples, self.samples[1:]):
            if t0 <= t <= t1:
                return c0 - base + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
        return (self.samples[-1][1] if t > self.samples[-1][0] else self.samples[0][1]) - base


# ---------------------------------------------------------------------------------------------
# The runs (each in a fresh child process: its own CPU accounting, no warm caches)


def _pd_config(config: str, seed: int, every: int, steps: int | None):
    from piaa_dist.config import load_config

    over = [f"run.seed={seed}", "run.validate_every=0", "run.patience=0", f"run.checkpoint_every={every}",
            "run.keep_checkpoints=0", f"run.log_every={every}", "run.register_name=", "run.use_gpu=no"]
    if steps:
        over.append(f"meta.meta_steps={steps}")
    return load_config(config, over)


def _run_piaa(config: str, data: str, out: str, seed: int, every: int, steps: int | None, workers: int) -> dict:
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    logging.basicConfig(level=logging.WARNING)
    import torch

    from piaa_dist.orchestration.ray_train import run_distributed

    cfg = _pd_config(config, seed, every, steps)
    torch.set_num_threads(1)
    with CpuSampler() as cpu:
        t0 = time.time()
        result = run_distributed(cfg, data, out, workers=workers, progress=False)
        t_end = time.time()
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    stamp = {r["step"]: r["time"] for r in rows}
    under = "checkpoints/meta-train" + ("" if workers else "/local")
    points = []
    for folder in sorted((Path(out) / under).glob("checkpoint_*")):
        # checkpoint_<step> folders only (Ray keeps checkpoint_manager_snapshot.json beside them)
        if not (folder.is_dir() and folder.name.split("_", 1)[1].isdigit()):
            continue
        step = int(folder.name.split("_", 1)[1])
        if step in stamp:
            points.append({"step": step, "wall_s": stamp[step] - t0, "cpu_s": cpu.at(stamp[step]), "path": str(folder)})
    return {"points": points, "steps": result.step, "wall_s": t_end - t0, "cpu_s": cpu.at(t_end)}


def _run_reference(config: str, data: str, out: str, seed: int, every: int, budget_s: float, threads: int) -> dict:
    logging.basicConfig(level=logging.WARNING)
    import torch

    from piaa_dist.checkpoint import save_training_state
    from piaa_dist.data.stream import Dataset
    from piaa_dist.reference import reference_train

    cfg = _pd_config(config, seed, every, None)
    torch.set_num_threads(threads)
    points = []
    with CpuSampler() as cpu:
        t0 = time.time()
        dataset = Dataset.open(data)

        def on_step(step, metrics, trainer):
            if step % every == 0:
                folder = Path(out) / f"checkpoint_{step:06d}"
                save_training_state(folder, {"model": trainer.model.state_dict(), "step": step})
                now = time.time()
                points.append({"step": step, "wall_s": now - t0, "cpu_s": cpu.at(now), "path": str(folder)})
            return time.time() - t0 >= budget_s

        trainer = reference_train(cfg, dataset, max_steps=10**9, on_step=on_step)
        t_end = time.time()
    return {"points": points, "steps": trainer.step_count, "wall_s": t_end - t0, "cpu_s": cpu.at(t_end)}


def _score(config: str, data: str, seed: int, every: int, paths: list[str], repeats: int | None = None) -> dict:
    """Validation SROCC of every checkpoint (off the clock), and the validation users' ceilings."""
    logging.basicConfig(level=logging.WARNING)
    import torch

    from piaa_dist.checkpoint import load_training_state
    from piaa_dist.data.stream import Dataset
    from piaa_dist.evaluate import ceilings
    from piaa_dist.model import build_model
    from piaa_dist.orchestration.step_hook import validation_score
    from piaa_dist.train import validation_users

    torch.set_num_threads(2)
    cfg = _pd_config(config, seed, every, None)
    if repeats:
        # fewer random splits per user (--quick): the same for every method and checkpoint
        from piaa_dist.config import with_overrides

        cfg = with_overrides(cfg, {"eval.repeats": int(repeats)})
    dataset = Dataset.open(data)
    scores = {}
    for path in paths:
        model = build_model(cfg.model)
        model.load_state_dict(load_training_state(path)["model"])
        scores[path] = validation_score(cfg, dataset, model)
    ceil = ceilings(dataset, validation_users(cfg, dataset))
    return {"scores": scores, "average_user": ceil.average_user if ceil else None,
            "oracle": ceil.oracle if ceil else None}


# ---------------------------------------------------------------------------------------------
# Curves


def smoothed(points: list[dict]) -> list[dict]:
    """Each checkpoint with ``curve``: the mean of the last ``SMOOTH`` checkpoints' scores."""
    out = []
    for i, p in enumerate(points):
        window = [q["val_srocc"] for q in points[max(0, i - SMOOTH + 1): i + 1]]
        out.append({**p, "curve": sum(window) / len(window)})
    return out


def reach(points: list[dict], tau: float) -> dict | None:
    """The first checkpoint whose curve reaches ``tau`` (None: never)."""
    return next((p for p in points if p["curve"] >= tau), None)


def plateau(points: list[dict]) -> dict:
    """The checkpoint with the highest curve value."""
    return max(points, key=lambda p: p["curve"])


def ratio_row(tau: float, ref: list[dict], pd: list[dict]) -> dict:
    """Times to ``tau`` and the ratio reference ÷ piaa-dist, split into steps × s/step."""
    a, b = reach(ref, tau), reach(pd, tau)
    row = {"tau": tau, "ref_s": a["wall_s"] if a else math.nan, "pd_s": b["wall_s"] if b else math.nan,
           "ref_cpu_s": a["cpu_s"] if a else math.nan, "pd_cpu_s": b["cpu_s"] if b else math.nan,
           "ratio": math.nan, "steps_ratio": math.nan, "s_per_step_ratio": math.nan, "cpu_ratio": math.nan}
    if a and b:
        row["ratio"] = a["wall_s"] / b["wall_s"]
        row["steps_ratio"] = a["step"] / b["step"]
        row["s_per_step_ratio"] = (a["wall_s"] / a["step"]) / (b["wall_s"] / b["step"])
        row["cpu_ratio"] = a["cpu_s"] / b["cpu_s"] if b["cpu_s"] > 0 else math.nan
    return row


def log_ci(values: list[float]) -> tuple[float, float]:
    """95% t-interval of the geometric mean (the mean of the logs), or (nan, nan) for < 2 values."""
    from piaa_dist.metrics import mean_ci95

    logs = [math.log(v) for v in values if v > 0 and math.isfinite(v)]
    if len(logs) < 2:
        return math.nan, math.nan
    _, lo, hi = mean_ci95(logs)
    return math.exp(lo), math.exp(hi)


# ---------------------------------------------------------------------------------------------


def run_seed(args, data: str, tmp: Path, seed: int) -> dict:
    runs = {}
    every = args.every
    runs["reference"] = in_child(_run_reference, config=args.config, data=data, out=str(tmp / f"ref-{seed}"),
                                 seed=seed, every=args.ref_every, budget_s=args.ref_budget, threads=args.ref_threads)
    ref = runs["reference"]
    print(f"  seed {seed}: reference {ref['steps']} steps in {ref['wall_s']:.0f} s", flush=True)
    runs["piaa-dist 2 Ray workers"] = in_child(_run_piaa, config=args.config, data=data, out=str(tmp / f"ray-{seed}"),
                                               seed=seed, every=every, steps=args.steps, workers=2)
    print(f"  seed {seed}: 2 Ray workers {runs['piaa-dist 2 Ray workers']['steps']} steps in "
          f"{runs['piaa-dist 2 Ray workers']['wall_s']:.0f} s", flush=True)
    if not args.no_in_process:
        runs["piaa-dist in-process"] = in_child(_run_piaa, config=args.config, data=data,
                                                out=str(tmp / f"local-{seed}"), seed=seed, every=every,
                                                steps=args.steps, workers=0)
        print(f"  seed {seed}: in-process {runs['piaa-dist in-process']['steps']} steps in "
              f"{runs['piaa-dist in-process']['wall_s']:.0f} s", flush=True)
    paths = [p["path"] for r in runs.values() for p in r["points"]]
    scored = in_child(_score, config=args.config, data=data, seed=seed, every=every, paths=paths,
                      repeats=5 if args.quick else None)
    curves = {}
    for name, r in runs.items():
        pts = [{**p, "val_srocc": scored["scores"][p["path"]]} for p in r["points"]]
        curves[name] = smoothed([{k: v for k, v in p.items() if k != "path"} for p in pts])
    avg = scored["average_user"]
    ref_plateau = plateau(curves["reference"])["curve"]
    star = ref_plateau - PLATEAU_TOLERANCE
    offsets = (0.0, 0.1, 0.2) if args.quick else (-0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
    taus = sorted({round(avg + d, 3) for d in offsets} | {round(star, 4)})
    rows = {name: [ratio_row(t, curves["reference"], curves[name]) for t in taus]
            for name in runs if name != "reference"}
    return {"seed": seed, "runs": {n: {k: v for k, v in r.items() if k != "points"} for n, r in runs.items()},
            "curves": curves, "average_user": avg, "oracle": scored["oracle"], "taus": taus,
            "reference_plateau": ref_plateau, "tau_star": star, "rows": rows,
            "plateaus": {n: plateau(c) for n, c in curves.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer τ, shorter budgets (< 10 min)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run.seed values (default 0 1 2; quick: 0)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=None, help="piaa-dist meta-steps (default: the config's)")
    parser.add_argument("--every", type=int, default=None, help="piaa-dist checkpoint interval (steps)")
    parser.add_argument("--ref-every", type=int, default=None, help="reference checkpoint interval (steps)")
    parser.add_argument("--ref-budget", type=float, default=None, help="reference wall-time budget (s)")
    parser.add_argument("--ref-threads", type=int, default=2)
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process piaa-dist run")
    parser.add_argument("--world-seed", type=int, default=0)
    args = parser.parse_args(argv)
    from piaa_dist.config import load_config

    cfg = load_config(args.config)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.steps = args.steps or (cfg.meta.meta_steps if not args.quick else min(cfg.meta.meta_steps, 600))
    args.every = args.every or max(10, args.steps // (20 if args.quick else 30))
    args.ref_every = args.ref_every or (10 if args.quick else 20)
    args.ref_budget = args.ref_budget or (240.0 if args.quick else 900.0)

    from piaa_dist.data.ingest import ingest
    from piaa_dist.data.synth import TEST_WORKERS_FILE, WorldSpec, make_world

    before = machine()
    t_start = time.time()
    seeds = []
    with tempfile.TemporaryDirectory(prefix="piaa-ttq-") as tmp_name:
        tmp = Path(tmp_name)
        world = make_world(tmp / "world", WorldSpec(seed=args.world_seed))
        data = str(tmp / "data")
        ingest("flickr-aes", world.out, data, test_users=Path(world.out) / TEST_WORKERS_FILE)
        for seed in args.seeds:
            seeds.append(run_seed(args, data, tmp, seed))
    after = machine()

    main_pd = "piaa-dist 2 Ray workers"
    for s in seeds:
        print(f"\nseed {s['seed']}: validation users' average-user ceiling {s['average_user']:.3f}, "
              f"oracle {s['oracle']:.3f}; reference plateau {s['reference_plateau']:.3f}")
        for name, rows in s["rows"].items():
            print(f"\n{name} vs reference (time to validation SROCC τ; ratio = reference ÷ piaa-dist)")
            print(table(rows, [("tau", "τ", ".3f"), ("ref_s", "reference s", ".0f"), ("pd_s", "piaa-dist s", ".0f"),
                               ("ratio", "ratio", ".2f"), ("steps_ratio", "steps ratio", ".2f"),
                               ("s_per_step_ratio", "s/step ratio", ".2f"), ("ref_cpu_s", "ref CPU-s", ".0f"),
                               ("pd_cpu_s", "pd CPU-s", ".0f"), ("cpu_ratio", "CPU ratio", ".2f")]))
        print("\nplateaus (highest 3-checkpoint mean of validation SROCC within the run)")
        print(table([{"method": n, "plateau": p["curve"], "step": p["step"], "wall_s": p["wall_s"],
                      "run_steps": s["runs"][n]["steps"], "run_s": s["runs"][n]["wall_s"]}
                     for n, p in s["plateaus"].items()],
                    [("method", "method", "s"), ("plateau", "plateau", ".3f"), ("step", "at step", "d"),
                     ("wall_s", "at s", ".0f"), ("run_steps", "run steps", "d"), ("run_s", "run s", ".0f")]))

    def star_row(s, name):
        return next(r for r in s["rows"][name] if r["tau"] == round(s["tau_star"], 4))

    summary = {}
    for name in seeds[0]["rows"]:
        ratios = [star_row(s, name)["ratio"] for s in seeds]
        finite = [r for r in ratios if math.isfinite(r)]
        med = statistics.median(finite) if finite else math.nan
        lo, hi = log_ci(finite)
        split = [star_row(s, name) for s in seeds]
        summary[name] = {"ratios": ratios, "median": med, "ci95": [lo, hi],
                         "steps_ratio_median": statistics.median([r["steps_ratio"] for r in split]),
                         "s_per_step_ratio_median": statistics.median([r["s_per_step_ratio"] for r in split]),
                         "cpu_ratio_median": statistics.median([r["cpu_ratio"] for r in split]),
                         "plateau_median": statistics.median([s["plateaus"][name]["curve"] for s in seeds]),
                         "reference_plateau_median": statistics.median([s["reference_plateau"] for s in seeds])}
    print("\ntime to the reference's plateau (its plateau − 0.01), reference ÷ piaa-dist, over seeds "
          f"{args.seeds}")
    print(table([{"method": n, **v, "ci": f"{v['ci95'][0]:.2f} … {v['ci95'][1]:.2f}",
                  "seeds": " ".join(f"{r:.2f}" for r in v["ratios"])} for n, v in summary.items()],
                [("method", "piaa-dist run", "s"), ("median", "ratio (median)", ".2f"), ("ci", "95% CI", "s"),
                 ("seeds", "per seed", "s"), ("steps_ratio_median", "steps ratio", ".2f"),
                 ("s_per_step_ratio_median", "s/step ratio", ".2f"), ("cpu_ratio_median", "CPU-s ratio", ".2f"),
                 ("plateau_median", "its plateau", ".3f"), ("reference_plateau_median", "ref plateau", ".3f")]))
    print(f"\nload average (1 min) {before['load_average_1m']:.2f} before, {after['load_average_1m']:.2f} after; "
          f"{time.time() - t_start:.0f} s in all")
    path = save("time_to_quality_quick" if args.quick else "time_to_quality",
                {"machine": before, "machine_after": after, "args": vars(args), "seeds": seeds, "summary": summary})
    print(f"wrote {path}")
    print(f"ratio {summary[main_pd]['median']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
