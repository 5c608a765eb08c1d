"""Ingestion on Ray: partitions of whole shards run as Ray tasks, published by the driver.

The staged ingestion of :mod:`piaa_dist.data.ingest` (plan → partitions → publish) spread
over Ray: the driver plans (reads the ratings, checks every path and user ID, packs users
into shards; no image decoded), each partition runs :func:`~piaa_dist.data.ingest.ingest_partition`
in a Ray task that writes its users' shards straight to the store and returns its manifest
rows, and the driver publishes (manifest and report, then the pointer, atomically).

Why plain Ray tasks and not Ray Data: a partition is already the right unit (a run of whole
shards, decided by the plan, written sequentially by one writer with its own image cache),
and what must come back is small (manifest rows, counts). Ray Data would cut its own blocks,
move the image bytes through the object store between a decode stage and a write stage, and
decide the order of rows itself, all of which the byte-identical contract would then have to
undo; tasks keep the decode-and-write pipeline inside one process, as in-process ingestion.

* **Byte-identical output** whatever the number of workers: packing is decided by the plan,
  a partition is whole shards, and the bytes of a shard do not depend on which process
  writes it (:mod:`piaa_dist.data.ingest`).
* **Per-worker memory does not grow with the dataset**: a task holds its spec (its own
  samples' indices and scores, tens of bytes per rating) and the partition's bounded working
  set (a window of images in flight, the image cache, one upload part). The driver submits
  at most ``workers`` tasks at a time and builds each spec only when it submits it.
* **Each image encoded once per machine**: the ingest's encoded-image store
  (:mod:`piaa_dist.data.encstore`) is a folder at the same path on every node; the workers of
  a node share it (atomic entries), so on N nodes an image is encoded at most N times (twice
  on one node only when two workers miss it at the same moment). The driver removes it from
  every live node at the end (a task pinned to each node), whether the ingest succeeded or not.
* **At most ``workers`` at once**: that in-flight limit is also what holds the run to
  ``workers`` Ray workers on a cluster with more CPUs (a task reserves 1 CPU, and Ray runs
  every submitted task it has CPUs for); queueing a second task per worker to hide the
  driver's hand-over (1.8-2.1% of the write phase at 10k users) ran 2 workers for ``--workers 1``.
* **Failures**: a task that raises bad input (``--strict``) or a storage error stops the
  ingest and nothing is published (the error is the worker's own one-line message); a task
  whose worker process died is retried by Ray (rewriting a shard gives the same bytes).
  Partitions are at most :data:`PARTITION_SHARDS` shards by default, so a task's size, and
  with it a worker's memory, is bounded whatever the dataset's.

``workers=0`` runs :func:`piaa_dist.data.ingest.ingest` in this process without Ray.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

from piaa_dist.data.images import DEFAULT_MAX_PIXELS
from piaa_dist.data.ingest import (
    DEFAULT_IMAGE_CACHE_MB,
    DEFAULT_MAX_SIDE,
    DEFAULT_QUALITY,
    DEFAULT_SHARD_SIZE,
    IngestSettings,
    PartitionResult,
    PartitionSpec,
    ingest,
    ingest_partition,
    plan_ingest,
    publish,
)
from piaa_dist.orchestration.ray_workers import ray_workers, user_error_of

log = logging.getLogger(__name__)

#: Default threads per Ray worker for image work and uploads (overlaps I/O with decoding).
DEFAULT_THREADS = 2
#: Default threads when ingesting in this process (the machine's CPUs, at most 8).
DEFAULT_LOCAL_THREADS = min(8, os.cpu_count() or 1)
#: Default largest partition, in shards: a task's memory (its spec, tens of bytes per sample,
#: and its manifest rows) follows its partition's size, so partitions are capped rather than
#: a fixed number, and a worker's memory does not grow with the dataset.
PARTITION_SHARDS = 4


def run_partition(spec: PartitionSpec) -> tuple[PartitionResult, dict[str, float]]:
    """One partition in a Ray task; returns its result and what it cost the worker.

    The cost: ``seconds`` (wall), ``cpu_s`` (CPU time of the worker process, all threads),
    ``peak_rss_mb`` (the worker process's peak RSS so far), ``rss_anon_mb`` and
    ``rss_shmem_mb`` at the end (see :func:`_status_mb`), ``samples``, ``pid`` and ``started``
    (wall-clock time the task began, ``time.time()``: when tasks ran, and on which worker).
    """
    started = time.time()
    wall, cpu = time.perf_counter(), time.process_time()
    result = ingest_partition(spec)
    status = _status_mb()
    return result, {"seconds": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                    "peak_rss_mb": status.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0),
                    "rss_anon_mb": status.get("RssAnon", float("nan")),
                    "rss_shmem_mb": status.get("RssShmem", float("nan")),
                    "samples": float(result.samples), "pid": float(os.getpid()), "started": started}


def _status_mb() -> dict[str, float]:
    """This process's memory figures from ``/proc/self/status`` in MB (Linux; else empty).

    ``VmHWM`` is the peak RSS (``ru_maxrss`` would count the memory of the process a Ray
    worker was forked from before it exec'd); ``RssAnon`` the private memory; ``RssShmem``
    the shared memory touched, i.e. pages of Ray's object store that task arguments were
    read from (shared with every process on the node, not this worker's own).
    """
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssShmem"):
                    out[key] = int(rest.split()[0]) / 1024.0
    except OSError:
        pass
    return out


def _remove_encode_store_everywhere(plan: Any) -> None:
    """Remove the ingest's encoded-image store on every live node (tasks may have made one on
    any of them), then on this machine. Best effort: a node that cannot be reached keeps its
    folder, which is logged (it holds encoded images only, and no later ingest reads it)."""
    plan.remove_encode_store()
    if not plan.encode_store:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from piaa_dist.data.encstore import remove_store

    rm = ray.remote(remove_store)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [rm.options(num_cpus=0, max_retries=0,
                       scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        plan.encode_store) for n in nodes]
    try:
        ray.get(refs, timeout=120)
    except Exception as err:  # noqa: BLE001 - cleanup must not hide the ingest's own outcome
        log.warning("encoded-image store %s may be left on some Ray nodes: %s", plan.encode_store, err)


def ingest_distributed(
    fmt: str,
    root: str | Path | None,
    out_url: str,
    *,
    workers: int,
    ray_address: str | None = None,
    partitions: int | None = None,
    threads: int | None = None,
    test_workers: str | Path | None = None,
    test_users: str | Path | None = None,
    test_fraction: float | None = None,
    split_seed: int = 0,
    fold: int | None = None,
    ratings_file: str | Path | None = None,
    images_dir: str | Path | None = None,
    score_range: tuple[float, float] | None = None,
    endpoint_url: str | None = None,
    strict: bool = False,
    max_side: int = DEFAULT_MAX_SIDE,
    quality: int = DEFAULT_QUALITY,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB,
    progress: bool = False,
    encode_store: bool = True,
    encode_store_dir: str | None = None,
) -> dict[str, Any]:
    """Ingest into a new, atomically published version, with ``workers`` Ray workers.

    Args:
        fmt, root, out_url: as :func:`piaa_dist.data.ingest.ingest`.
        workers: Ray workers (1 CPU each); 0 ingests in this process without Ray.
        ray_address: Ray cluster to connect to (default ``$RAY_ADDRESS``, else a local Ray).
        partitions: partitions of whole shards (default: at least ``2 * workers``, and at
            most :data:`PARTITION_SHARDS` shards each); the output bytes do not depend on it.
        threads: threads per worker for image work and uploads (default
            :data:`DEFAULT_THREADS` per Ray worker, :data:`DEFAULT_LOCAL_THREADS` in process).
        test_workers ... image_cache_mb: as :func:`piaa_dist.data.ingest.ingest`.
        progress: a tqdm bar over samples (advanced as partitions finish).
        encode_store, encode_store_dir: the on-disk store of encoded images
            (:class:`~piaa_dist.data.ingest.IngestSettings`). With Ray it is one folder per
            machine, at the same path on each (``encode_store_dir``, default each machine's temp
            folder): the workers of one machine share it, so an image is encoded once per
            machine its raters' partitions ran on; it is removed from every node at the end.

    Returns:
        The ingest report (as :func:`~piaa_dist.data.ingest.ingest`'s), plus ``execution``:
        ``workers``, ``partitions``, per-partition ``tasks`` (``seconds``, ``cpu_s``,
        ``peak_rss_mb``, ``samples``, ``pid``), ``worker_peak_rss_mb`` (largest of any worker) and
        ``write_seconds`` (from the first task submitted to the last finished); on Ray also
        ``plan_seconds``, ``store_cleanup_seconds`` (removing the encoded-image store from every
        node) and ``publish_seconds``.

    Raises:
        DataError: bad input (names the file and row), or nothing to ingest; nothing is published.
        StorageError: the output cannot be written (names the URL); nothing is published.
        NotEnoughCPUs: the Ray cluster cannot run that many workers.
    """
    options: dict[str, Any] = {
        "test_workers": test_workers, "test_users": test_users, "test_fraction": test_fraction,
        "split_seed": split_seed, "fold": fold, "ratings_file": ratings_file, "images_dir": images_dir,
        "score_range": score_range, "endpoint_url": endpoint_url,
    }
    if threads is None:
        threads = DEFAULT_THREADS if workers > 0 else DEFAULT_LOCAL_THREADS
    settings = IngestSettings(max_side=max_side, quality=quality, shard_size=shard_size, max_pixels=max_pixels,
                              image_cache_mb=image_cache_mb, workers=threads, strict=strict,
                              encode_store=encode_store, encode_store_dir=encode_store_dir)
    if workers <= 0:
        t0 = time.perf_counter()
        report = ingest(fmt, root, out_url, strict=strict, max_side=max_side, quality=quality,
                        shard_size=shard_size, max_pixels=max_pixels, image_cache_mb=image_cache_mb,
                        workers=threads, partitions=partitions or 1, progress=progress,
                        encode_store=encode_store, encode_store_dir=encode_store_dir, **options)
        report["execution"] = {"workers": 0, "partitions": report["partitions"], "tasks": [],
                               "worker_peak_rss_mb": report["peak_rss_mb"],
                               "write_seconds": time.perf_counter() - t0}
        return report

    import ray

    results: list[PartitionResult] = []
    costs: list[dict[str, float]] = []
    # The cluster is checked first: planning a large log takes a while, and a request the
    # cluster cannot run should not wait for it.
    with ray_workers(workers, cpus=1.0, ray_address=ray_address):
        t_plan = time.perf_counter()
        plan = plan_ingest(fmt, root, out_url, settings=settings, **options)
        plan_s = time.perf_counter() - t_plan
        bounds = plan.partition_bounds(partitions or max(2 * workers, math.ceil(plan.n_shards / PARTITION_SHARDS)))
        task = ray.remote(run_partition).options(num_cpus=1, max_retries=2)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(plan.sample_idx), desc=f"samples ({workers} Ray workers)", unit="img",
                       leave=False)
        t0 = time.perf_counter()
        pending: list[Any] = []
        queue = list(enumerate(bounds))
        try:
            try:
                while queue or pending:
                    while queue and len(pending) < workers:  # also what caps the run at `workers` workers
                        i, (u0, u1) = queue.pop(0)
                        # Built only now: the driver never holds every partition's spec at once.
                        pending.append(task.remote(plan.partition(i, u0, u1)))
                    ready, pending = ray.wait(pending, num_returns=1)
                    result, cost = ray.get(ready[0])
                    results.append(result)
                    costs.append(cost)
                    if bar is not None:
                        u0, u1 = bounds[result.index]
                        bar.update(int(plan.user_start[u1] - plan.user_start[u0]))
            except Exception as err:
                for ref in pending:
                    ray.cancel(ref, force=True)
                cause = user_error_of(err)
                if cause is err:
                    raise
                raise cause from None  # the worker's one-line message: file and row, or URL
            finally:
                if bar is not None:
                    bar.close()
                write_s = time.perf_counter() - t0
            t_pub = time.perf_counter()
            report = publish(plan, results)
            publish_s = time.perf_counter() - t_pub
        finally:
            # After publishing (the version is out first), before Ray goes: the store's removal
            # waits on the filesystem, which the shards just written may keep busy (28.8 s for
            # 20,000 entries after 2.8 GB of shards at 100k users, against 1.4 s on a quiet disk).
            t_clean = time.perf_counter()
            _remove_encode_store_everywhere(plan)
            cleanup_s = time.perf_counter() - t_clean
    report["execution"] = {
        "workers": workers, "partitions": len(bounds), "tasks": costs,
        "worker_peak_rss_mb": round(max(c["peak_rss_mb"] for c in costs), 1),
        "write_seconds": write_s,
        "plan_seconds": plan_s, "store_cleanup_seconds": cleanup_s, "publish_seconds": publish_s,
    }
    log.info("ingested %d samples in %d partitions on %d Ray workers in %.1fs", report["samples"], len(bounds),
             workers, write_s)
    return report


__all__ = ["DEFAULT_LOCAL_THREADS", "DEFAULT_THREADS", "PARTITION_SHARDS", "ingest_distributed", "run_partition"]
