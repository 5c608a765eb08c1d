"""The demo's Tune sweep with and without the per-trial start-up tax, in one run.

Both rows run the trials of ``make demo``'s sweep (``jobs/configs/demo.yaml`` with the demo's
``tune_overrides``: ``tune.samples`` trials of ``tune.trial_steps`` meta-steps, ASHA on the
validation SROCC of held-out training users) on the default synthetic world, through
:func:`piaa_dist.orchestration.tune.run_sweep` (no refit: only the trials are compared), each
on a fresh local Ray with 2 CPUs:

* **before**: ``tune.trial_runner=ray-train`` and ``tune.max_concurrent=1``: each trial fits a
  ``TorchTrainer`` (a Train controller, a worker group, a process group), one at a time (what
  the demo did before issue 15);
* **after**: ``tune.trial_runner=in-trial``, ``tune.max_concurrent=2``: each trial runs its
  loop in its trial actor, actors are reused and keep the dataset warm, 2 trials at once.

Columns: wall time of ``run_sweep`` (Ray start to the winner's model loaded), trial steps
(sum over trials of the last step each reached: ASHA may stop some), wall seconds per trial
step, and the ratio before ÷ after of that (the goal: ≥ 2). The load average is recorded:
other work on the machine slows both rows.

Usage::

    python benchmarks/sweep.py [--samples 3] [--steps 100]

Writes ``benchmarks/results/sweep.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _util import in_child, machine, save, table  # noqa: E402

ROWS = (("before: ray-train, 1 at a time", "ray-train", 1), ("after: in-trial, 2 at a time", "in-trial", 2))


def _sweep(data: str, out: str, runner: str, concurrent: int, samples: int, steps: int) -> dict:
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    logging.basicConfig(level=logging.WARNING)
    from piaa_dist.config import load_config
    from piaa_dist.orchestration.demo import DEFAULT_CONFIG, DemoSettings
    from piaa_dist.orchestration.tune import run_sweep

    tune_overrides = [o for o in DemoSettings(out=Path(out)).tune_overrides if not o.startswith("tune.trial_steps")]
    cfg = load_config(DEFAULT_CONFIG, [*tune_overrides, f"tune.trial_steps={steps}", f"tune.samples={samples}",
                                       f"tune.trial_runner={runner}", f"tune.max_concurrent={concurrent}",
                                       "run.register_name="])
    t0 = time.perf_counter()
    result = run_sweep(cfg, data, out, samples=samples, workers_per_trial=1, mlflow_uri=f"sqlite:///{out}/mlflow.db")
    wall = time.perf_counter() - t0
    trial_steps = sum(int(t.get("step") or 0) for t in result.trials)
    return {"wall_s": wall, "trial_steps": trial_steps, "trials": len(result.trials),
            "best_val_srocc": result.best_score, "s_per_trial_step": wall / max(1, trial_steps),
            "runner": result.runner}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="meta-steps per trial (tune.trial_steps)")
    args = parser.parse_args(argv)
    from piaa_dist.data.ingest import ingest
    from piaa_dist.data.synth import TEST_WORKERS_FILE, WorldSpec, make_world

    before = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="piaa-sweep-bench-") as tmp:
        world = make_world(Path(tmp) / "world", WorldSpec())
        data = str(Path(tmp) / "data")
        ingest("flickr-aes", world.out, data, test_users=Path(world.out) / TEST_WORKERS_FILE)
        for label, runner, concurrent in ROWS:
            out = Path(tmp) / runner
            got = in_child(_sweep, data=data, out=str(out), runner=runner, concurrent=concurrent,
                           samples=args.samples, steps=args.steps)
            got.update(row=label, concurrent=concurrent)
            rows.append(got)
            print(f"{label}: {got['wall_s']:.1f} s for {got['trial_steps']} trial steps", flush=True)
    ratio = rows[0]["s_per_trial_step"] / rows[1]["s_per_trial_step"]
    print()
    print(table(rows, [("row", "sweep", "s"), ("trials", "trials", "d"), ("trial_steps", "trial steps", "d"),
                       ("wall_s", "wall s", ".1f"), ("s_per_trial_step", "s / trial step", ".3f"),
                       ("best_val_srocc", "best val SROCC", ".3f")]))
    after = machine()
    print(f"\nload average (1 min) {before['load_average_1m']:.2f} before, {after['load_average_1m']:.2f} after")
    print(f"sweep wall time per trial step, before / after: {ratio:.2f}x")
    path = save("sweep", {"machine": before, "machine_after": after, "samples": args.samples,
                          "steps": args.steps, "rows": rows, "ratio": ratio})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
