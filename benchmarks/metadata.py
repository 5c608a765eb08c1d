"""Per-worker metadata cost at scale: open a dataset's manifest and draw meta-batches.

Run: ``python benchmarks/metadata.py [--users 10000 100000 1000000]``. For each size a
synthetic manifest (a long tail of 3-40 ratings per user, 10% test users, users packed into
10,000-sample shards) is written to a folder; then, in a fresh child process each:

* ``open``: ``Dataset.open`` (read + validate the Parquet manifest, build the columnar index):
  seconds, RSS added by opening (VmRSS after - before; the imports are not counted) and the
  transient peak while opening (VmHWM reset just before);
* ``stream``: building a ``TaskStream`` over the training rows (no Python object per user);
* per-step costs, averaged over many calls: ``global_batch`` (meta-batch of 4 at random
  steps), ``index_of`` (user ID -> row), ``parts`` (row -> byte ranges); and, for reference,
  what the old sampler did at every step: ``rng.permutation(n)``;
* ``users("train")``: the list-returning API (a Python string per user), for comparison.

Targets (issue 12.4): at 1,000,000 users, opening adds < 300 MB RSS and takes < 5 s, and no
per-step cost grows with the number of users. Prints a table and writes
``benchmarks/results/metadata.json``. No shard is read (they do not exist).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import in_child, machine, save, table  # noqa: E402


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux), so a peak can be measured for one step."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def write_manifest(folder: Path, n: int, seed: int = 0) -> dict:
    """A synthetic manifest of ``n`` users (columns built with numpy/Arrow, not row by row)."""
    import pyarrow as pa

    from piaa_dist.data.manifest import SCHEMA, manifest_bytes

    rng = np.random.default_rng(seed)
    users = [f"user-{i:09d}" for i in range(n)]  # already sorted
    keys = np.array([int.from_bytes(hashlib.sha256(u.encode()).digest()[:8], "little") for u in users], np.uint64)
    n_ratings = np.clip(rng.zipf(1.6, n) + 2, 3, 40).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(n_ratings)[:-1]])
    shard = (starts // 10_000).astype(np.int32)
    offset = ((starts % 10_000) * 30_000).astype(np.int64)
    length = (n_ratings * 30_000).astype(np.int64)
    one = pa.array(np.arange(n + 1, dtype=np.int32))

    def lists(values: np.ndarray, kind: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(one, pa.array(values, kind))

    sha = pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [None, pa.py_buffer(rng.bytes(32 * n))])
    split = np.where(rng.random(n) < 0.1, "test", "train")
    t = pa.Table.from_arrays([
        pa.array(users), pa.array(keys), pa.array(split), pa.array(n_ratings), pa.array(np.zeros(n, bool)),
        lists(shard, pa.int32()), lists(offset, pa.int64()), lists(length, pa.int64()),
        lists(n_ratings, pa.int64()), pa.ListArray.from_arrays(one, sha),
    ], schema=SCHEMA)
    data = manifest_bytes(t, {"source": "synth", "max_side": "256"})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.parquet").write_bytes(data)
    return {"manifest_mb": len(data) / 1e6, "ratings": int(n_ratings.sum())}


def measure(url: str, n: int, calls: int) -> dict:
    import logging

    logging.disable(logging.WARNING)
    from piaa_dist.data.stream import Dataset, TaskStream

    before = rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    ds = Dataset.open(url)
    open_s = time.perf_counter() - t0
    after, peak = rss_mb(), rss_mb("VmHWM")
    t0 = time.perf_counter()
    stream = TaskStream(ds, ds.user_indices("train"), rank=0, world_size=1, meta_batch=4, shots=10, query_size=20,
                        image_size=64, augment=True, seed=0)
    stream_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    steps = rng.integers(0, 10**9, calls)
    t0 = time.perf_counter()
    for s in steps:
        stream.global_batch(int(s))
    batch_us = (time.perf_counter() - t0) / calls * 1e6
    probe = [ds.user_at(int(i)) for i in rng.integers(0, n, calls)]
    t0 = time.perf_counter()
    for u in probe:
        ds.index_of(u)
    lookup_us = (time.perf_counter() - t0) / calls * 1e6
    rows = rng.integers(0, n, calls)
    t0 = time.perf_counter()
    for r in rows:
        ds.manifest.parts(int(r))
    parts_us = (time.perf_counter() - t0) / calls * 1e6
    reps = max(1, min(20, calls // 50))
    gen = np.random.default_rng(2)
    t0 = time.perf_counter()
    for _ in range(reps):
        gen.permutation(n)
    perm_us = (time.perf_counter() - t0) / reps * 1e6
    t0 = time.perf_counter()
    listed = ds.users("train")
    list_s = time.perf_counter() - t0
    return {"open_s": open_s, "open_rss_mb": after - before, "open_peak_extra_mb": peak - before,
            "rss_before_mb": before, "stream_s": stream_s,
            "batch_us": batch_us, "lookup_us": lookup_us, "parts_us": parts_us, "old_permutation_us": perm_us,
            "users_list_s": list_s, "listed": len(listed)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--calls", type=int, default=2000, help="calls averaged per per-step figure")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-metadata-"))
    rows = []
    try:
        for n in args.users:
            folder = tmp / f"m{n}"
            t0 = time.perf_counter()
            info = write_manifest(folder, n)
            r = in_child(measure, url=str(folder), n=n, calls=args.calls)
            r.update(users=n, write_s=time.perf_counter() - t0, **info)
            rows.append(r)
            shutil.rmtree(folder, ignore_errors=True)
        print("metadata: one worker opening a dataset's manifest and drawing meta-batches (no shard read)")
        print(table(rows, [
            ("users", "users", "d"), ("manifest_mb", "manifest MB", ".1f"), ("open_s", "open s", ".2f"),
            ("open_rss_mb", "RSS added MB", ".0f"), ("open_peak_extra_mb", "peak extra MB", ".0f"),
            ("stream_s", "TaskStream s", ".3f"), ("batch_us", "batch µs", ".1f"), ("lookup_us", "lookup µs", ".1f"),
            ("parts_us", "parts µs", ".1f"), ("old_permutation_us", "old perm µs", ".0f"),
            ("users_list_s", "users() list s", ".2f"),
        ]))
        print("batch = TaskStream.global_batch (4 users); lookup = Dataset.index_of; parts = row -> byte ranges; "
              "old perm = rng.permutation(n), what the previous sampler did at every step")
        path = save("metadata", {"benchmark": "metadata", "machine": machine(), "spec": vars(args), "rows": rows})
        print(f"saved {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
