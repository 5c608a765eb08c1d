"""Ingestion throughput: a synthetic world into per-user shards, local folder vs local S3.

Run: ``python benchmarks/ingest.py [--users 80 --images 3000 --repeats 1]``. Prints a table
and writes ``benchmarks/results/ingest.json``. Each measurement runs in a fresh child process
(peak memory is that child's peak RSS, VmHWM). The S3 endpoint is moto's server running in
this parent process on 127.0.0.1, so S3 numbers include real HTTP round trips but not a
real network; the server's own memory is not in the child's figure.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import in_child, machine, save, table  # noqa: E402


def run_ingest(root: str, out: str, endpoint: str | None, workers: int) -> dict:
    logging.disable(logging.INFO)
    from piaa_dist.data.ingest import ingest

    t0 = time.perf_counter()
    report = ingest("flickr-aes", root, out, endpoint_url=endpoint, workers=workers)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "samples": report["ratings"]["ingested"],
        "images": report["images"],
        "bytes": report["bytes"],
        "shards": report["shards"],
    }


def run_baseline() -> dict:
    """Peak memory of the imports alone, to read the others against."""
    import piaa_dist.data.ingest  # noqa: F401

    return {"seconds": float("nan"), "samples": 0, "images": 0, "bytes": 0, "shards": 0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=80)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4], help="thread counts to compare")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()

    from piaa_dist.data.synth import WorldSpec, make_world
    from piaa_dist.s3local import ensure_fake_credentials, start_local_s3

    ensure_fake_credentials()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        spec = WorldSpec(users=args.users, images=args.images)
        t0 = time.perf_counter()
        make_world(tmp / "world", spec)
        synth_s = time.perf_counter() - t0
        rows = []
        with start_local_s3(bucket="bench") as s3:
            for workers in args.workers:
                for target in ("local", "s3"):
                    for rep in range(args.repeats):
                        if target == "local":
                            out, endpoint = str(tmp / f"out-{uuid.uuid4().hex[:8]}"), None
                        else:
                            out, endpoint = f"s3://bench/{uuid.uuid4().hex[:8]}", s3.endpoint_url
                        r = in_child(run_ingest, root=str(tmp / "world"), out=out, endpoint=endpoint, workers=workers)
                        r.update(target=target, workers=workers, repeat=rep,
                                 samples_per_s=r["samples"] / r["seconds"],
                                 images_per_s=r["images"] / r["seconds"],
                                 mb_per_s=r["bytes"] / 1e6 / r["seconds"])
                        rows.append(r)
                        if target == "local":
                            shutil.rmtree(out, ignore_errors=True)
        r = in_child(run_baseline)
        r.update(target="imports only", workers=0, repeat=0, samples_per_s=float("nan"),
                 images_per_s=float("nan"), mb_per_s=float("nan"))
        rows.append(r)
        print(f"ingest: synthetic world of {spec.users} users, {spec.images} images "
              f"({rows[0]['samples']} ratings; generated in {synth_s:.1f}s), {os.cpu_count()} CPUs")
        print(table(rows, [
            ("target", "target", "s"), ("workers", "threads", "d"), ("seconds", "seconds", ".2f"),
            ("samples_per_s", "samples/s", ".0f"), ("images_per_s", "unique images/s", ".0f"),
            ("mb_per_s", "MB/s written", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
        ]))
        print("samples/s = rated images written into shards per second (an image rated by 5 users is 5 samples)")
        path = save("ingest", {"benchmark": "ingest", "machine": machine(), "spec": vars(args),
                               "synth_seconds": synth_s, "rows": rows})
        print(f"saved {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
