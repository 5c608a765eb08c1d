"""Per-module kill rates of the last mutmut run (``make mutation``), as a table and JSON.

Reads mutmut's result files (``mutants/**/*.py.meta``). A mutant is *killed* when a test failed
(or it timed out: the tests ran away, which a user would notice too); *survived* when every
covering test passed; *no tests* when no test of the selection calls its function. The kill
rate is killed / (killed + survived + no tests): a mutant nothing tests counts against it.
Mutants not run yet (a run limited to some functions) are left out and counted as
``not run``.

    python tests/mutation/kill_rates.py [--json benchmarks/results/mutation.json] [--survivors]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

KILLED = {1, 3, 36, -24, 24, 152, 255}  # test failure, pytest internal error, timeouts
TIMEOUTS = {36, -24, 24, 152}  # killed by running out of time: shown apart, worth a look
SURVIVED = {0}
NO_TESTS = {5, 33}


def _module(meta_path: Path, root: Path) -> str:
    rel = meta_path.relative_to(root).as_posix()
    return rel[: -len(".py.meta")].replace("/", ".")


def _function(mutant: str) -> str:
    """``pkg.mod.x_fn__mutmut_3`` -> ``pkg.mod.fn``; methods read ``pkg.mod.Class.method``."""
    head, _, _ = mutant.rpartition("__mutmut_")
    module, _, name = head.rpartition(".")
    return f"{module}.{name[2:].replace('ǁ', '.').strip('.')}"


def kill_rates(root: Path = Path("mutants"), *, by_function: bool = False
               ) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """``({module: counts and rate}, {module: surviving mutant names})``; with `by_function`,
    one row per function that had a mutant run (a run limited to some functions reads fairly)."""
    table: dict[str, dict] = {}
    survivors: dict[str, list[str]] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        module = _module(meta, root)
        if by_function:
            groups: dict[str, dict] = {}
            for name, code in codes.items():
                groups.setdefault(_function(name), {})[name] = code
            for function, sub in sorted(groups.items()):
                if any(code is not None for code in sub.values()):
                    table[function] = _count(sub, function, survivors)
            continue
        table[module] = _count(codes, module, survivors)
    return table, survivors


def _count(codes: dict, group: str, survivors: dict[str, list[str]]) -> dict:
    """Counts and kill rate of one module's (or function's) mutants; survivors go to `survivors`."""
    counts: Counter = Counter()
    for name, code in codes.items():
        if code is None:
            counts["not run"] += 1
        elif code in KILLED:
            counts["killed"] += 1
            if code in TIMEOUTS:
                counts["timed out"] += 1
        elif code in SURVIVED:
            counts["survived"] += 1
            survivors.setdefault(group, []).append(name)
        elif code in NO_TESTS:
            counts["no tests"] += 1
            survivors.setdefault(group, []).append(name)
        else:
            counts["other"] += 1
    ran = counts["killed"] + counts["survived"] + counts["no tests"]
    return dict(counts, run=ran, kill_rate=round(counts["killed"] / ran, 4) if ran else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="mutants", help="mutmut's folder (default: mutants)")
    parser.add_argument("--json", default="", help="also write the table as JSON here")
    parser.add_argument("--survivors", action="store_true", help="list surviving mutants")
    parser.add_argument("--by-function", action="store_true",
                        help="one row per function run (for runs limited with MUTANTS=...)")
    args = parser.parse_args()
    table, survivors = kill_rates(Path(args.root), by_function=args.by_function)
    print(f"{'module / function':<60} {'run':>5} {'killed':>7} {'(timed out)':>11} {'survived':>9} {'no tests':>9} "
          f"{'not run':>8} {'kill rate':>10}")
    for module, row in table.items():
        rate = "-" if row["kill_rate"] is None else f"{100 * row['kill_rate']:.1f}%"
        print(f"{module:<60} {row['run']:>5} {row.get('killed', 0):>7} {row.get('timed out', 0):>11} "
              f"{row.get('survived', 0):>9} {row.get('no tests', 0):>9} {row.get('not run', 0):>8} {rate:>10}")
    if args.survivors:
        for module, names in survivors.items():
            print(f"\n{module}:")
            for name in names:
                print(f"  {name}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"modules": table, "survivors": survivors}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
