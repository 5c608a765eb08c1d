"""Shared plumbing of the benchmarks: run a measurement in a fresh child process, print a
table, save JSON. Each measurement runs in its own process so that its peak memory is its
own and no cache from a previous measurement helps it."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    """Peak resident memory of this process image, in MB.

    VmHWM (Linux) rather than ``ru_maxrss``: a spawned child is forked before it execs, and
    Linux carries the forked copy's RSS (the parent's, which here holds the S3 server's
    objects) into ``ru_maxrss``; VmHWM belongs to the new image only.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(fn: Callable[..., dict], kwargs: dict, queue: Any) -> None:
    try:
        out = fn(**kwargs)
        out["peak_rss_mb"] = peak_rss_mb()
        queue.put(("ok", out))
    except BaseException as err:  # report, don't hang the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))


def in_child(fn: Callable[..., dict], **kwargs: Any) -> dict:
    """Run ``fn(**kwargs)`` in a spawned process; return its dict plus ``peak_rss_mb``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, kwargs, queue))
    proc.start()
    status, payload = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        # Other work on the machine slows every row alike; record it to read the numbers.
        "load_average_1m": os.getloadavg()[0],
    }


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Text table; ``columns`` are (key, header, format)."""
    def fmt(v: Any, f: str) -> str:
        return "-" if isinstance(v, float) and v != v else format(v, f)  # NaN: not applicable

    cells = [[h for _, h, _ in columns]] + [[fmt(r[k], f) for k, _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line through (xs, ys): (slope, intercept); slope 0 when xs are all equal
    (used to extrapolate peak memory to larger support sets)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx
