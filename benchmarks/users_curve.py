"""The users curve: does the meta-learner get better with more meta-training users?

Run::

    python benchmarks/users_curve.py                       # 0, 50, 500 and 5,000 users
    python benchmarks/users_curve.py --train-users 50 500  # some points (results are merged)
    python benchmarks/users_curve.py --report              # table + plot from saved results

Test SROCC at 10 and 100 shots against the number of meta-training users, at **equal
meta-steps** (``--steps``, the same for every point), on one synthetic scale world with known
ceilings. The world (``piaa-dist synth --scale``): 5,000 training users and ``--test-users``
test users, a long tail of 30-300 ratings per user (median 60, so every user makes a full
10 + 30 task and about one test user in seven has the 103 ratings 100 shots need), a pool of
5,000 images of 32 px. It is generated and ingested once (2 Ray workers) into ``--work``
and reused by later invocations.

Each point (``--seeds``: one run per training seed, averaged) meta-trains the CPU config
(``jobs/configs/cpu.yaml``: 32 px convnet, meta-batch 4,
head-only second-order inner loop; ``data.validation_users`` 0, no validation) on the first N
training users of one seeded shuffle (so the 50 are among the 500, and those among the 5,000),
then evaluates the meta-learner on every test user with the CPU config's protocol
(``blg-piaa`` and ``meta-no-adapt``; ``--repeats`` random splits; 2 Ray workers). N = 0 is the
untrained initialisation: what the protocol's fine-tuning alone achieves. The ceilings are
the world's (``oracle``: each test user's noise-free scores; ``average_user``: the population
average's), computed by ``evaluate`` on the same test users.

Prints a table, writes ``benchmarks/results/users_curve.json`` and draws
``docs/users-curve.png``. Time on the shared 2-core machine: the world and its ingest ~5 min
once; each point ~2-4 min at 500 steps (run the points one or two at a time).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS, machine, table

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = RESULTS / "users_curve.json"
PLOT = ROOT / "docs" / "users-curve.png"
CPU_CONFIG = ROOT / "jobs" / "configs" / "cpu.yaml"
TRAIN_USERS = 5_000


class FirstTrainUsers:
    """A dataset whose training split is its first ``n`` training users in a seeded shuffle
    (nested: a smaller ``n`` takes a prefix of the same order). Everything else is the dataset's."""

    def __init__(self, dataset, n: int, seed: int = 0):
        import numpy as np

        rows = dataset.user_indices("train")
        order = np.random.default_rng(seed).permutation(len(rows))
        self._rows = np.sort(rows[order[:n]])
        self._dataset = dataset

    def user_indices(self, split: str):
        return self._rows if split == "train" else self._dataset.user_indices(split)

    def users(self, split: str):
        return self._dataset.manifest.users_at(self._rows) if split == "train" else self._dataset.users(split)

    def __getattr__(self, name: str):
        return getattr(self._dataset, name)


def make_data(work: Path, train_users: int, test_users: int) -> str:
    """The world and its dataset (made once; reused when ``work`` has them)."""
    from piaa_dist.data.scaleworld import ScaleSpec, write_scale_world
    from piaa_dist.orchestration.ray_ingest import ingest_distributed

    data = work / "data"
    if (data / "_CURRENT").is_file():
        return str(data)
    total = train_users + test_users
    spec = ScaleSpec(users=total, images=5_000, image_size=32, test_fraction=test_users / total,
                     ratings_median=60.0, ratings_sigma=0.5, ratings_min=30, ratings_max=300)
    world = work / "world"
    t0 = time.perf_counter()
    summary = write_scale_world(world, spec, images=True, workers=2)
    print(f"world: {summary.users:,} users ({summary.test_users} test), {summary.ratings:,} ratings "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    t0 = time.perf_counter()
    rep = ingest_distributed("ratings", None, str(data), workers=2, ratings_file=world / summary.ratings_file,
                             images_dir=world / "images", score_range=spec.scale)
    print(f"ingested {rep['ratings']['ingested']:,} ratings ({time.perf_counter() - t0:.0f}s)", flush=True)
    (work / "world.json").write_text((world / "world.json").read_text())
    shutil.rmtree(world / "images", ignore_errors=True)
    return str(data)


def point(url: str, n: int, steps: int, repeats: int, seed: int = 0) -> dict:
    """Meta-train on the first ``n`` training users for ``steps`` steps (``seed``: the
    initialisation and the meta-batches); evaluate the test users (splits always seeded 0, so
    every point is scored on the same images)."""
    import torch

    from piaa_dist.config import load_config, with_overrides
    from piaa_dist.data.stream import Dataset
    from piaa_dist.model import build_model
    from piaa_dist.orchestration.ray_evaluate import evaluate_distributed
    from piaa_dist.train import meta_train

    torch.set_num_threads(1)
    cfg = with_overrides(load_config(str(CPU_CONFIG)), {
        "meta.meta_steps": steps, "data.validation_users": 0, "run.validate_every": 0, "run.patience": 0,
        "run.seed": seed,
        "eval.repeats": repeats, "eval.shots": [10, 100], "eval.methods": ["blg-piaa", "meta-no-adapt"],
        "eval.protocol": "shared"})
    ds = Dataset.open(url)
    t0 = time.perf_counter()
    if n:
        model = meta_train(cfg, FirstTrainUsers(ds, n)).model
    else:
        torch.manual_seed(cfg.run.seed)  # meta_train's initialisation, not trained
        model = build_model(cfg.model)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate_distributed(cfg, ds, {"blg-piaa": model, "meta-no-adapt": model}, workers=2, seed=0)
    row = {"train_users": n, "seed": seed, "steps": steps if n else 0, "train_s": train_s,
           "eval_s": time.perf_counter() - t0,
           "test_users": len(res.users), "repeats": repeats,
           "oracle": res.ceilings.oracle if res.ceilings else None,
           "average_user": res.ceilings.average_user if res.ceilings else None}
    for k in (10, 100):
        for method, tag in (("blg-piaa", ""), ("meta-no-adapt", "noadapt_")):
            cell = res.stats(method, k)
            row[f"{tag}srocc{k}"] = cell.srocc_mean if cell else None
            row[f"{tag}std{k}"] = cell.srocc_std if cell else None
            row[f"{tag}users{k}"] = cell.n_users if cell else 0
    return row


def _load() -> dict:
    if OUT_JSON.is_file():
        return json.loads(OUT_JSON.read_text())
    return {"benchmark": "users_curve", "points": {}}


def report(data: dict, plot: Path | None) -> None:
    runs = list(data["points"].values())
    if not runs:
        print("no points yet")
        return
    rows = []
    for n in sorted({r["train_users"] for r in runs}):
        same = [r for r in runs if r["train_users"] == n]
        row = dict(same[0])
        row["seeds"] = len(same)
        for k in (10, 100):
            vals = [r[f"srocc{k}"] for r in same]
            row[f"srocc{k}"] = sum(vals) / len(vals)
            row[f"seedspread{k}"] = (max(vals) - min(vals)) / 2 if len(vals) > 1 else float("nan")
            row[f"noadapt_srocc{k}"] = sum(r[f"noadapt_srocc{k}"] for r in same) / len(same)
        row["train_s"] = sum(r["train_s"] for r in same) / len(same)
        row["eval_s"] = sum(r["eval_s"] for r in same) / len(same)
        rows.append(row)
    print(f"users curve: test SROCC against meta-training users, {rows[-1]['steps']} meta-steps each "
          f"(CPU config), {rows[0]['test_users']} test users, {rows[0]['repeats']} repeats")
    print(table(rows, [
        ("train_users", "train users", ",d"), ("steps", "steps", "d"), ("seeds", "seeds", "d"),
        ("srocc10", "SROCC@10", ".3f"), ("std10", "± splits", ".3f"), ("seedspread10", "± seeds", ".3f"),
        ("srocc100", "SROCC@100", ".3f"), ("std100", "± splits", ".3f"), ("seedspread100", "± seeds", ".3f"),
        ("noadapt_srocc10", "no-adapt@10", ".3f"), ("noadapt_srocc100", "no-adapt@100", ".3f"),
        ("users10", "users@10", "d"), ("users100", "users@100", "d"), ("train_s", "train s", ".0f"),
        ("eval_s", "eval s", ".0f")]))
    print(f"ceilings on these test users: oracle {rows[0]['oracle']:.3f}, average user {rows[0]['average_user']:.3f}")
    print("SROCC = mean over training seeds; ± splits = std over repeats of the user-averaged SROCC (first "
          "seed); ± seeds = half the range over training seeds; no-adapt = the meta-learner without fine-tuning; "
          "0 users = the untrained initialisation")
    if plot is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    trained = [r for r in rows if r["train_users"]]
    x = [r["train_users"] for r in trained]
    for k, marker in ((10, "o"), (100, "s")):
        err = [r[f"seedspread{k}"] if r["seeds"] > 1 else r[f"std{k}"] for r in trained]
        ax.errorbar(x, [r[f"srocc{k}"] for r in trained], yerr=err, marker=marker, capsize=3,
                    label=f"blg-piaa, {k} shots")
        init = [r for r in rows if not r["train_users"]]
        if init:
            ax.axhline(init[0][f"srocc{k}"], ls=":", lw=1, color="grey")
    ax.axhline(rows[0]["oracle"], ls="--", color="green", label="oracle ceiling")
    ax.axhline(rows[0]["average_user"], ls="--", color="orange", label="average-user ceiling")
    ax.set_xscale("log")
    ax.set_xlabel(f"meta-training users ({trained[0]['steps'] if trained else 0} meta-steps each)")
    ax.set_ylabel("test SROCC")
    ax.set_title("More meta-training users, same meta-steps (dotted: untrained)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    print(f"plot: {plot}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-users", type=int, nargs="*", default=[0, 50, 500, 5_000],
                   help="meta-training users per point (0 = untrained; at most 5000)")
    p.add_argument("--steps", type=int, default=500, help="meta-steps of every point")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds per point (initialisation and meta-batches; results are averaged)")
    p.add_argument("--test-users", type=int, default=500, help="test users of the world")
    p.add_argument("--world-train-users", type=int, default=TRAIN_USERS,
                   help=f"training users of the world (default {TRAIN_USERS}; a new --work folder if changed)")
    p.add_argument("--repeats", type=int, default=5, help="random splits per test user and shot count")
    p.add_argument("--work", default="/tmp/piaa-users-curve", help="where the world's dataset is kept between runs")
    p.add_argument("--report", action="store_true", help="only print the table and draw the plot")
    p.add_argument("--plot", default=str(PLOT), help=f"plot path (default {PLOT.relative_to(ROOT)})")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = _load()
    if not args.report and args.train_users:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        try:
            work = Path(args.work)
            work.mkdir(parents=True, exist_ok=True)
            url = make_data(work, args.world_train_users, args.test_users)
            data["world"] = json.loads((work / "world.json").read_text()).get("counts")
            for n in args.train_users:
                if n > args.world_train_users:
                    raise SystemExit(f"--train-users {n}: the world has {args.world_train_users} training users")
                for seed in args.seeds if n else [0]:
                    print(f"point: {n:,} meta-training users, {args.steps} steps, seed {seed}", flush=True)
                    row = point(url, n, args.steps, args.repeats, seed)
                    row["machine"] = machine()
                    data["points"][f"{n}" if seed == 0 else f"{n}-s{seed}"] = row
                    RESULTS.mkdir(parents=True, exist_ok=True)
                    OUT_JSON.write_text(json.dumps(data, indent=1) + "\n")
                    print(f"  SROCC@10 {row['srocc10']:.3f}, SROCC@100 {row['srocc100']:.3f} "
                          f"(train {row['train_s']:.0f}s, eval {row['eval_s']:.0f}s)", flush=True)
        finally:
            ray.shutdown()
    report(data, Path(args.plot) if args.plot else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
