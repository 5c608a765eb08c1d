"""Meta-testing's time on the demo world: the per-method fine-tuning search on validation users
and the evaluation of the test users, in this process and on Ray workers.

Rows (each a fresh run of both stages on the same model, GIAA model, data and protocol):

* ``plain, in process``: NCHW tensors (``protocol._CHANNELS_LAST = False``): the computation
  as it was before channels-last, and the search in this process as it always ran;
* ``fast, in process``: what ``evaluate --workers 0`` runs now;
* ``fast, N Ray workers``: what ``evaluate --workers N`` (and the demo) runs now: one worker
  group (start-up timed apart) for the search's (user x method x k) items, then the test users.

The protocol is the demo's (its ``evaluate.json`` config: methods, shots, repeats, the search
grid), one torch thread per process (``run.threads_per_worker``). ``--val-users`` /
``--test-users`` take the first N users to fit a busy machine (the table says how many).
Every fast row must give the same choice and numbers as the first fast row (checked, the
table says ``same``); the plain row's largest per-user SROCC difference to it is printed (float
reordering amplified by many all-parameter steps: see ``piaa_dist.protocol._CHANNELS_LAST``).

The load average before and after each row is printed and saved: the machine is shared.

    python benchmarks/meta_test.py --val-users 2 --test-users 4 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, save, table  # noqa: E402

DEMO = Path("/tmp/demo-out")


def _load(args):
    import torch

    from piaa_dist.checkpoint import load_model
    from piaa_dist.config import with_overrides
    from piaa_dist.data.stream import Dataset
    from piaa_dist.evaluate import standard_models

    torch.set_num_threads(1)
    meta, cfg, _ = load_model(args.model)
    giaa, _, _ = load_model(args.giaa)
    ev = json.loads(Path(args.eval_json).read_text())["config"]["eval"]
    ev["finetune"] = []  # searched here, not taken from the old result
    cfg = with_overrides(cfg, {f"eval.{k}": v for k, v in ev.items()})
    ds = Dataset.open(str(args.data))
    return cfg, ds, standard_models(meta, giaa, cfg.eval.methods)


def _numbers(choice, result) -> dict:
    d = result.to_dict()
    d.pop("seconds")
    return {"choice": choice.to_dict(), "result": d}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO / "train" / "model"))
    p.add_argument("--giaa", default=None, help="GIAA model folder (default: the demo's registered one)")
    p.add_argument("--data", default=str(DEMO / "shards"))
    p.add_argument("--eval-json", default=str(DEMO / "evaluate.json"))
    p.add_argument("--val-users", type=int, default=0, help="first N validation users (0: all)")
    p.add_argument("--test-users", type=int, default=0, help="first N test users (0: all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rows", default="plain,fast,ray", help="which rows, comma-separated")
    args = p.parse_args()
    if args.giaa is None:
        found = sorted(DEMO.glob("mlruns/*/*/artifacts/model/info.json"))
        args.giaa = next(str(f.parent) for f in found if '"giaa"' in f.read_text())

    import piaa_dist.protocol as protocol
    from piaa_dist.evaluate import evaluate, search_finetuning, with_choice
    from piaa_dist.orchestration.ray_evaluate import evaluation_workers
    from piaa_dist.train import validation_users

    cfg, ds, models = _load(args)
    val = validation_users(cfg, ds)
    test = ds.users("test")
    val = val[: args.val_users] if args.val_users else val
    test = test[: args.test_users] if args.test_users else test
    rows, numbers = [], {}
    for row in args.rows.split(","):
        load0 = os.getloadavg()[0]
        protocol._CHANNELS_LAST = row != "plain"
        t0, c0 = time.perf_counter(), time.process_time()
        if row == "ray":
            with evaluation_workers(cfg, ds, models, workers=args.workers) as group:
                start = time.perf_counter() - t0
                t1 = time.perf_counter()
                choice = group.search_finetuning(val)
                t2 = time.perf_counter()
                result = group.evaluate(with_choice(cfg, choice), users=test)
                t3 = time.perf_counter()
            name = f"fast, {args.workers} Ray workers"
        else:
            start, t1 = 0.0, time.perf_counter()
            choice = search_finetuning(cfg, ds, models, val)
            t2 = time.perf_counter()
            result = evaluate(with_choice(cfg, choice), ds, models, users=test)
            t3 = time.perf_counter()
            name = f"{row}, in process"
        numbers[row] = _numbers(choice, result)
        rows.append({"row": name, "start_s": start, "search_s": t2 - t1, "evaluate_s": t3 - t2,
                     "total_s": time.perf_counter() - t0, "driver_cpu_s": time.process_time() - c0,
                     "load_before": load0, "load_after": os.getloadavg()[0]})
        print(f"{name}: search {t2 - t1:.1f}s, evaluate {t3 - t2:.1f}s (load {load0:.1f} -> "
              f"{os.getloadavg()[0]:.1f})", flush=True)
    fast = [r for r in ("fast", "ray") if r in numbers]
    for r, row in zip(numbers, rows):
        row["same_as_fast"] = "same" if fast and numbers[r] == numbers[fast[0]] else "differs"
        if fast and r == "plain":
            a, b = numbers[r]["result"]["methods"], numbers[fast[0]]["result"]["methods"]
            row["max_user_srocc_diff"] = max(abs(a[m][k]["per_user"][u] - b[m][k]["per_user"][u])
                                             for m in a for k in a[m] for u in a[m][k]["per_user"])
            row["same_choice"] = numbers[r]["choice"]["chosen"] == numbers[fast[0]]["choice"]["chosen"]
    print(f"\n{len(val)} validation users (search: {', '.join(cfg.eval.methods)}; grid "
          f"{len(cfg.eval.search_sgd_lrs) + len(cfg.eval.search_adam_lrs)} optimizers x rates x "
          f"{len(cfg.eval.search_params)} params x steps {list(cfg.eval.search_steps)}, "
          f"{cfg.eval.search_repeats} repeats), {len(test)} test users x shots {list(cfg.eval.shots)} x "
          f"{cfg.eval.repeats} repeats; 1 torch thread per process")
    print(table(rows, [("row", "row", "s"), ("start_s", "worker start s", ".1f"), ("search_s", "search s", ".1f"),
                       ("evaluate_s", "evaluate s", ".1f"), ("total_s", "total s", ".1f"),
                       ("load_before", "load before", ".1f"), ("load_after", "load after", ".1f"),
                       ("same_as_fast", "numbers", "s")]))
    for row in rows:
        if "max_user_srocc_diff" in row:
            print(f"plain vs fast: largest per-user SROCC difference {row['max_user_srocc_diff']:.2e}, "
                  f"same choice: {row['same_choice']}")
    print("saved", save("meta_test", {"machine": machine(), "val_users": len(val), "test_users": len(test),
                                      "rows": rows, "args": vars(args)}))


if __name__ == "__main__":
    main()
