"""Seeded uniform samples of mutmut's mutants, and their kill rates with a 95% Wilson interval.

The whole mutant set of the core modules (about 7,000) takes days on the shared 2-core machine,
so the README's kill rates are estimates from a uniform sample of each module's mutants. The
sample is a pure function of the mutant names and ``(per, seed, module)``: each module draws
``random.Random(f"{seed}-{module}").sample(sorted(names), min(per, len(names)))``, so anyone can
draw the same names again from the same code (mutant numbers change when the code does).

    python tests/mutation/sample.py draw --per 50 --seed 17 --modules meta,evaluate
    python tests/mutation/sample.py report --per 50 --seed 17 --modules meta,evaluate \
        [--json tests/mutation/sample_17.json --phase before|after]

``draw`` prints the names (for ``mutmut run``); ``report`` prints each module's kill rate over
its sample from mutmut's last results (``mutants/**/*.py.meta``) and, with ``--json``, records
each drawn name's result under ``--phase`` in that file (other phases and modules kept). After a
rerun of the survivors alone (``--carry-killed before``), a mutant the earlier phase killed
counts as killed: tests were only added, so the tests that killed it still run. (A change of
mutmut's test selection resets every result, which is why that carry is needed at all.)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kill_rates import KILLED, NO_TESTS, SURVIVED, TIMEOUTS  # noqa: E402


def meta_file(root: Path, module: str) -> Path:
    """mutmut's result file of a module (``piaa_dist.`` prefix optional)."""
    if not module.startswith("piaa_dist."):
        module = f"piaa_dist.{module}"
    return root / (module.replace(".", "/") + ".py.meta")


def mutant_codes(root: Path, module: str) -> dict[str, int | None]:
    """Every mutant of `module` and its exit code in mutmut's last run (None: not run)."""
    path = meta_file(root, module)
    if not path.is_file():
        raise SystemExit(f"{path}: no mutmut results for module {module!r}; generate the mutants first "
                         "(`make mutation-sample` does)")
    return json.loads(path.read_text())["exit_code_by_key"]


def draw(names: list[str], per: int, seed: int, module: str) -> list[str]:
    """The seeded uniform sample of one module's mutant `names` (order as drawn)."""
    return random.Random(f"{seed}-{module}").sample(sorted(names), min(per, len(names)))


def status(code: int | None) -> str:
    """mutmut's exit code as the kill-rate category (``kill_rates.py``'s rule)."""
    if code is None:
        return "not run"
    if code in TIMEOUTS:
        return "timeout"
    if code in KILLED:
        return "killed"
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    return f"other ({code})"


def wilson(killed: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `killed` / `n` (sound at 0% and 100%, unlike
    the normal approximation, and the sample sizes here are small)."""
    if n == 0:
        return math.nan, math.nan
    p = killed / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_row(statuses: list[str]) -> dict:
    """Counts, kill rate and its Wilson interval over the mutants that ran (timeouts count as
    killed, a mutant no test reaches as surviving: ``kill_rates.py``'s rule)."""
    ran = [s for s in statuses if s != "not run"]
    killed = sum(s in ("killed", "timeout") for s in ran)
    lo, hi = wilson(killed, len(ran))
    return {"run": len(ran), "killed": killed, "survived": sum(s == "survived" for s in ran),
            "no tests": sum(s == "no tests" for s in ran), "not run": len(statuses) - len(ran),
            "kill_rate": killed / len(ran) if ran else None, "wilson95": [lo, hi]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["draw", "report"])
    parser.add_argument("--per", type=int, required=True, help="mutants drawn per module")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--modules", required=True, help="comma-separated, e.g. meta,data.stream")
    parser.add_argument("--root", default="mutants", help="mutmut's folder (default: mutants)")
    parser.add_argument("--json", default="", help="report: record each name's result in this file")
    parser.add_argument("--phase", default="after", help="report: the key results are recorded under")
    parser.add_argument("--carry-killed", default="", metavar="PHASE",
                        help="report: a mutant not run now that PHASE (in --json) records as killed "
                             "counts as killed (a rerun of the survivors only, tests only added)")
    args = parser.parse_args()
    root = Path(args.root)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    samples = {m: draw(list(mutant_codes(root, m)), args.per, args.seed, m) for m in modules}
    if args.action == "draw":
        print(" ".join(name for names in samples.values() for name in names))
        return 0
    doc: dict = {}
    if args.json and Path(args.json).is_file():
        doc = json.loads(Path(args.json).read_text())
    print(f"{'module':<34} {'sample':>6} {'run':>4} {'killed':>6} {'survived':>8} {'no tests':>8} "
          f"{'kill rate':>9}  95% Wilson")
    for module, names in samples.items():
        codes = mutant_codes(root, module)
        got = {n: status(codes[n]) for n in names}
        if args.carry_killed:
            earlier = doc.get("modules", {}).get(module, {}).get("results", {}).get(args.carry_killed, {})
            got = {n: ("killed" if s == "not run" and earlier.get(n) in ("killed", "timeout") else s)
                   for n, s in got.items()}
        row = rate_row(list(got.values()))
        rate = "-" if row["kill_rate"] is None else f"{100 * row['kill_rate']:.1f}%"
        lo, hi = row["wilson95"]
        ci = "-" if math.isnan(lo) else f"[{100 * lo:.1f}%, {100 * hi:.1f}%]"
        print(f"{module:<34} {len(names):>6} {row['run']:>4} {row['killed']:>6} {row['survived']:>8} "
              f"{row['no tests']:>8} {rate:>9}  {ci}")
        for name, s in got.items():
            if s in ("survived", "no tests"):
                print(f"    {s:<9} {name}")
        entry = doc.setdefault("modules", {}).setdefault(module, {})
        entry.update(per=args.per, seed=args.seed, mutants=len(codes))
        entry.setdefault("results", {})[args.phase] = got
        entry.setdefault("rates", {})[args.phase] = {k: v for k, v in row.items()}
    if args.json:
        doc["draw"] = ('random.Random(f"{seed}-{module}").sample(sorted(names), min(per, len(names))) '
                       "over the module's mutant names in mutants/**/*.py.meta")
        Path(args.json).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
