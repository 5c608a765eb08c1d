"""Streaming throughput: meta-training tasks from shards, local folder vs local S3.

Run: ``python benchmarks/stream.py [--steps 40]``. Two measurements per store, each in a
fresh child process (cold cache; peak memory is that child's peak RSS, VmHWM):

* ``fetch``: load every user once (GET + sha256 + tar parse), no decoding: the I/O path;
* ``tasks``: iterate the TaskStream (meta-batch 4, 10 shots + 20 query, 64 px, augmented
  support): what a trainer rank sees, decoding included; once flat out without prefetch,
  then with a simulated trainer step (a sleep) per meta-step without and with prefetch, to
  show how much of the data time prefetching hides;
* ``imports only``: the peak memory of importing the stream module (torch) for reference.

Prints a table and writes ``benchmarks/results/stream.json``. The S3 endpoint is moto's
server in this parent process on 127.0.0.1 (real HTTP, no real network).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import in_child, machine, save, table  # noqa: E402


def run_fetch(url: str, endpoint: str | None) -> dict:
    logging.disable(logging.WARNING)
    from piaa_dist.data.stream import Dataset

    t0 = time.perf_counter()
    ds = Dataset.open(url, endpoint_url=endpoint)
    n = nbytes = 0
    for u in ds.users("all"):
        r = ds.load_user(u)
        n += len(r)
        nbytes += sum(len(j) for j in r.jpegs)
    return {"seconds": time.perf_counter() - t0, "images": n, "jpeg_bytes": nbytes}


def run_baseline() -> dict:
    """Peak memory of the imports alone (torch dominates), to read the others against."""
    import piaa_dist.data.stream  # noqa: F401

    return {"seconds": float("nan"), "images": 0}


def run_tasks(url: str, endpoint: str | None, steps: int, image_size: int, prefetch: int, compute_s: float) -> dict:
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    from piaa_dist.data.stream import Dataset, TaskStream

    t0 = time.perf_counter()
    ds = Dataset.open(url, endpoint_url=endpoint)
    stream = TaskStream(ds, ds.users("train"), rank=0, world_size=1, meta_batch=4, shots=10, query_size=20,
                        image_size=image_size, augment=True, seed=0, num_steps=steps, prefetch=prefetch)
    n = 0
    for _, tasks in stream:
        n += sum(len(t.support[1]) + len(t.query[1]) for t in tasks)
        if compute_s:
            time.sleep(compute_s)  # stands in for a trainer step (which releases the GIL too)
    return {"seconds": time.perf_counter() - t0, "images": n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=80)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--steps", type=int, default=40, help="meta-steps streamed in the tasks measurement")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--compute", type=float, default=0.1,
                   help="seconds of simulated trainer compute per step in the overlap rows")
    args = p.parse_args()

    from piaa_dist.data.ingest import ingest
    from piaa_dist.data.synth import WorldSpec, make_world
    from piaa_dist.s3local import ensure_fake_credentials, start_local_s3

    ensure_fake_credentials()
    logging.disable(logging.INFO)
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    try:
        spec = WorldSpec(users=args.users, images=args.images)
        make_world(tmp / "world", spec)
        rows = []
        with start_local_s3(bucket="bench") as s3:
            urls = {"local": (str(tmp / "data"), None), "s3": ("s3://bench/data", s3.endpoint_url)}
            for url, endpoint in urls.values():
                ingest("flickr-aes", tmp / "world", url, endpoint_url=endpoint)
            for target, (url, endpoint) in urls.items():
                r = in_child(run_fetch, url=url, endpoint=endpoint)
                r.update(target=target, what="fetch all users", images_per_s=r["images"] / r["seconds"],
                         mb_per_s=r["jpeg_bytes"] / 1e6 / r["seconds"])
                rows.append(r)
            for prefetch, compute in ((0, 0.0), (0, args.compute), (1, args.compute)):
                for target, (url, endpoint) in urls.items():
                    r = in_child(run_tasks, url=url, endpoint=endpoint, steps=args.steps,
                                 image_size=args.image_size, prefetch=prefetch, compute_s=compute)
                    what = f"tasks, prefetch {prefetch}" + (f", {compute * 1000:.0f} ms compute" if compute else "")
                    r.update(target=target, what=what, images_per_s=r["images"] / r["seconds"],
                             mb_per_s=float("nan"))
                    rows.append(r)
            r = in_child(run_baseline)
            r.update(target="-", what="imports only", images_per_s=float("nan"), mb_per_s=float("nan"))
            rows.append(r)
        print(f"stream: {spec.users} users, {spec.images} images; tasks = {args.steps} steps x 4 users x (10+20) "
              f"images at {args.image_size} px, {os.cpu_count()} CPUs")
        print(table(rows, [
            ("target", "target", "s"), ("what", "measurement", "s"), ("images", "images", "d"),
            ("seconds", "seconds", ".2f"), ("images_per_s", "images/s", ".0f"),
            ("mb_per_s", "JPEG MB/s", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
        ]))
        path = save("stream", {"benchmark": "stream", "machine": machine(), "spec": vars(args), "rows": rows})
        print(f"saved {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
