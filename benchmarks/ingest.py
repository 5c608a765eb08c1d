"""Ingestion throughput and memory: synthetic worlds into packed shards, local folder vs local S3.

Run: ``python benchmarks/ingest.py [--scales 1 4 --workers 4 --targets local s3]``. Prints a
table and writes ``benchmarks/results/ingest.json``. Each measurement runs in a fresh child
process (peak memory is that child's peak RSS, VmHWM). The S3 endpoint is moto's server
running in this parent process on 127.0.0.1, so S3 numbers include real HTTP round trips but
not a real network; the server's own memory is not in the child's figure.

``--image-cache-mb`` compares image cache sizes: the cache (re-encoded images shared by
several raters, bounded) is the one buffer that fills as the world grows, up to its bound;
without it every sample is decoded.

``--scales`` multiplies the default world (80 users, 3000 images, ~16,000 ratings): issue 11.3
asks that peak memory not grow with the dataset, i.e. the 4x world's peak RSS may exceed the
default world's by at most one shard's batch plus decode buffers. Rows report the ingest
report's own figures too (objects written, bytes, image amplification = stored copies /
distinct images, decodes and cache hits).
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


def run_ingest(root: str, out: str, endpoint: str | None, workers: int, shard_size: int, cache_mb: float) -> dict:
    logging.disable(logging.INFO)
    from piaa_dist.data.ingest import ingest

    t0 = time.perf_counter()
    report = ingest("flickr-aes", root, out, endpoint_url=endpoint, workers=workers, shard_size=shard_size,
                    image_cache_mb=cache_mb)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "samples": report["ratings"]["ingested"],
        "images": report["images"],
        "bytes": report["bytes"],
        "shards": report["shards"],
        "objects": report["objects"],
        "amplification": report["image_amplification"],
        "decodes": report["image_decodes"],
        "cache_hits": report["image_cache_hits"],
    }


def run_baseline() -> dict:
    """Peak memory of the imports alone, to read the others against."""
    import piaa_dist.data.ingest  # noqa: F401

    return {"seconds": float("nan"), "samples": 0, "images": 0, "bytes": 0, "shards": 0, "objects": 0,
            "amplification": float("nan"), "decodes": 0, "cache_hits": 0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=80)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4], help="world sizes (multiples of the default)")
    p.add_argument("--workers", type=int, nargs="+", default=[4], help="thread counts to compare")
    p.add_argument("--targets", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    p.add_argument("--shard-size", type=int, default=2000,
                   help="samples per shard (default 2000: several shards even in the default world)")
    p.add_argument("--image-cache-mb", type=float, nargs="+", default=[64.0, 0.0],
                   help="image cache sizes to compare (the cache is what grows, up to its bound)")
    args = p.parse_args()

    from piaa_dist.data.synth import WorldSpec, make_world
    from piaa_dist.s3local import ensure_fake_credentials, start_local_s3

    ensure_fake_credentials()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        rows = []
        with start_local_s3(bucket="bench") as s3:
            for scale in args.scales:
                spec = WorldSpec(users=args.users * scale, images=args.images * scale)
                world = tmp / f"world{scale}"
                t0 = time.perf_counter()
                make_world(world, spec)
                synth_s = time.perf_counter() - t0
                for workers, cache_mb in [(w, c) for w in args.workers for c in args.image_cache_mb]:
                    for target in args.targets:
                        if target == "local":
                            out, endpoint = str(tmp / f"out-{uuid.uuid4().hex[:8]}"), None
                        else:
                            out, endpoint = f"s3://bench/{uuid.uuid4().hex[:8]}", s3.endpoint_url
                        r = in_child(run_ingest, root=str(world), out=out, endpoint=endpoint, workers=workers,
                                     shard_size=args.shard_size, cache_mb=cache_mb)
                        r.update(world=f"{scale}x ({spec.users} users)", scale=scale, target=target, cache_mb=cache_mb,
                                 workers=workers, synth_s=synth_s, samples_per_s=r["samples"] / r["seconds"],
                                 mb_per_s=r["bytes"] / 1e6 / r["seconds"])
                        rows.append(r)
                        if target == "local":
                            shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(world, ignore_errors=True)
        r = in_child(run_baseline)
        r.update(world="-", scale=0, target="imports only", workers=0, cache_mb=float("nan"), synth_s=float("nan"),
                 samples_per_s=float("nan"), mb_per_s=float("nan"))
        rows.append(r)
        print(f"ingest: synthetic worlds ({args.users} users x scale, {args.images} images x scale), "
              f"shards of {args.shard_size} samples, {os.cpu_count()} CPUs")
        print(table(rows, [
            ("world", "world", "s"), ("target", "target", "s"), ("workers", "threads", "d"),
            ("cache_mb", "cache MB", ".0f"),
            ("samples", "samples", "d"), ("seconds", "seconds", ".1f"), ("samples_per_s", "samples/s", ".0f"),
            ("mb_per_s", "MB/s", ".1f"), ("shards", "shards", "d"), ("objects", "objects", "d"),
            ("amplification", "amplif.", ".2f"), ("decodes", "decodes", "d"), ("cache_hits", "cache hits", "d"),
            ("peak_rss_mb", "peak RSS MB", ".0f"),
        ]))
        growth = []
        for target in args.targets:
            for workers, cache_mb in [(w, c) for w in args.workers for c in args.image_cache_mb]:
                peaks = {r["scale"]: r["peak_rss_mb"] for r in rows
                         if r["target"] == target and r["workers"] == workers and r["cache_mb"] == cache_mb}
                if len(peaks) > 1:
                    lo, hi = min(peaks), max(peaks)
                    growth.append({"target": target, "workers": workers, "cache_mb": cache_mb, "from": lo, "to": hi,
                                   "growth_mb": peaks[hi] - peaks[lo]})
                    print(f"peak RSS growth {lo}x -> {hi}x world ({target}, {workers} threads, image cache "
                          f"{cache_mb:g} MB): {peaks[hi] - peaks[lo]:+.0f} MB")
        print("amplification = stored image copies / distinct images (each rater's shard holds its own copy)")
        path = save("ingest", {"benchmark": "ingest", "machine": machine(), "spec": vars(args), "rows": rows,
                               "peak_rss_growth": growth})
        print(f"saved {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
