"""A node that dies mid-run: the run resumes from its last checkpoint on S3 and finishes.

Ray's own multi-node test cluster (``ray.cluster_utils.Cluster``) on this machine: a head with
no CPU (the driver, the Train controller and Tune's bookkeeping live there; no Train worker can)
and 1-CPU worker nodes, one Train worker per node. Checkpoints go to the local S3 endpoint (moto
over HTTP), as on a real cluster. A worker node is removed (its raylet and workers killed, as
when an instance disappears) after a checkpoint is stored; a replacement node is added; the run
must resume from the newest checkpoint and reach its last step.

The Tune variant is marked slow (``make test-slow``): the Train test exercises the same restart
path (a Tune trial is a function that fits the same ``TorchTrainer``) in the default suite.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from piaa_dist.config import load_config, with_overrides

TINY = "jobs/configs/tiny.yaml"
STEPS, EVERY = 16, 2


@pytest.fixture(scope="module")
def cfg():
    return with_overrides(load_config(TINY), {
        "meta.meta_steps": STEPS, "run.checkpoint_every": EVERY, "run.log_every": 1,
        "run.max_failures": 3,
    })


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Starting a worker group imports torch on a busy machine: allow it time.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0, "include_dashboard": False,
            # Notice a dead node within a few seconds (defaults: ~15-30 s).
            "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                               "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    ray.init(address=c.address, logging_level=logging.WARNING)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _wait(predicate, timeout: float, what: str, thread: threading.Thread | None = None, outcome=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if thread is not None:
            assert thread.is_alive(), f"the run ended before {what}: {outcome}"
        time.sleep(0.25)


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _s3_keys(s3_endpoint: str, bucket: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys, token = [], None
    while True:
        kw = {"Bucket": bucket, **({"ContinuationToken": token} if token else {})}
        page = s3.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def _in_background(fn) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_train_resumes_when_a_node_dies(cluster, cfg, tiny_dataset_url, s3_endpoint, s3_bucket, tmp_path):
    import ray

    from piaa_dist.orchestration.ray_train import run_distributed

    cluster.add_node(num_cpus=1)
    node_b = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out = tmp_path / "out"
    thread, outcome = _in_background(lambda: run_distributed(
        cfg, tiny_dataset_url, out, workers=2, storage_path=f"s3://{s3_bucket}/runs",
        s3_endpoint=s3_endpoint,
    ))
    metrics = out / "metrics.jsonl"
    # A checkpoint is stored (step 4 reported: checkpoints 2 and 4 are on S3 or being written).
    _wait(lambda: any(r["step"] >= 2 * EVERY for r in _rows(metrics)), 600, "step 4", thread, outcome)
    assert max(r["step"] for r in _rows(metrics)) < STEPS, "the run finished before the node could be removed"
    cluster.remove_node(node_b, allow_graceful=False)  # the instance is gone: no goodbye
    _wait(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 120, "Ray to notice the dead node")
    cluster.add_node(num_cpus=1)  # the replacement (what the autoscaler would launch)
    thread.join(timeout=900)
    assert not thread.is_alive(), "the run did not finish after the replacement node joined"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]

    assert result.step == STEPS and result.workers == 2
    assert result.checkpoint == f"s3://{s3_bucket}/runs/meta-train/checkpoint_{STEPS:06d}"
    rows = _rows(metrics)
    resumed = [r for r in rows if r["resumed_from"] > 0]
    assert resumed, "no report came from a restarted worker group"
    seen = max(r["step"] for r in rows if r["resumed_from"] == 0)  # last step the driver saw
    start = resumed[0]["resumed_from"]
    # From the newest checkpoint in storage when the node died: never older than one interval
    # before the last step the driver saw (the dying group may have stored a newer one whose
    # report never reached the driver; resuming from that one is right too) ...
    assert start % EVERY == 0 and seen - EVERY <= start < STEPS
    # ... and on to the end, every step once.
    assert [r["step"] for r in resumed] == list(range(start + 1, STEPS + 1))
    assert {r["resumed_from"] for r in resumed} == {start}
    keys = _s3_keys(s3_endpoint, s3_bucket)
    assert any(k.startswith(f"runs/meta-train/checkpoint_{STEPS:06d}/") for k in keys)
    # The same meta-learner as an uninterrupted run (in-process, 1 rank: equal up to float
    # summation order; the 1-vs-2-rank tolerance of tests/test_ray_train.py).
    from piaa_dist.orchestration.ray_train import run_distributed as run

    reference = run(cfg, tiny_dataset_url, tmp_path / "reference", workers=0)
    for name, tensor in reference.state["model"].items():
        torch.testing.assert_close(result.state["model"][name], tensor, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow  # ~3 min on a busy 2-core machine; the Train test above covers the same path
def test_a_tune_trial_whose_node_dies_resumes(cluster, cfg, tiny_dataset_url, s3_endpoint, s3_bucket, tmp_path):
    """One trial, one Train worker: the trial function sits on one node, its Train worker on
    another; that node dies after a checkpoint; on a replacement node the trial's run resumes
    from the checkpoint and the trial ends at its last step."""
    import ray

    from piaa_dist.orchestration.tune import run_sweep

    # Start from a known layout: the head, one 1-CPU node for the trial function (it takes
    # 0.01 CPU there, so the 1-CPU Train worker cannot share it) ...
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node, allow_graceful=True)
    _wait(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 1, 120, "the old worker nodes to go")
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    tune_cfg = with_overrides(cfg, {
        "run.validate_every": STEPS // 2, "tune.samples": 1, "tune.max_concurrent": 1,
        "tune.grace_period": 1,
        # the trial as a Ray Train run whose worker sits on another node (an in-trial trial
        # has no Train worker to lose)
        "tune.trial_runner": "ray-train",
    })
    thread, outcome = _in_background(lambda: run_sweep(
        tune_cfg, tiny_dataset_url, tmp_path / "sweep", samples=1, workers_per_trial=1,
        storage_path=f"s3://{s3_bucket}/sweep", s3_endpoint=s3_endpoint,
    ))
    # ... then the node the Train worker can go to.
    time.sleep(5)
    worker_node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()

    def stored(step: int) -> bool:
        return any(f"/checkpoint_{step:06d}/" in k for k in _s3_keys(s3_endpoint, s3_bucket))

    _wait(lambda: stored(2 * EVERY), 900, "the trial's step-4 checkpoint", thread, outcome)
    cluster.remove_node(worker_node, allow_graceful=False)
    cluster.add_node(num_cpus=1)
    thread.join(timeout=900)
    assert not thread.is_alive(), "the sweep did not finish after the replacement node joined"
    assert "error" not in outcome, outcome.get("error")
    sweep = outcome["result"]
    (trial,) = sweep.trials
    assert trial["status"] == "TERMINATED" and trial["step"] == STEPS
    # the trial ran to its last step; its model is its best validation checkpoint (issue 15)
    assert sweep.trial_length == STEPS
    assert sweep.best_checkpoint.endswith(f"checkpoint_{sweep.best_step:06d}")
    # The trial's reports (Tune's result.json in S3): a restarted worker group resumed.
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    results = [k for k in _s3_keys(s3_endpoint, s3_bucket) if k.endswith("result.json")]
    assert results, "Tune stored no trial results"
    reports = [json.loads(line) for k in results
               for line in s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read().decode().splitlines()
               if line.strip()]
    resumed = sorted({r["resumed_from"] for r in reports if r.get("resumed_from")})
    assert resumed and all(0 < s < STEPS and s % EVERY == 0 for s in resumed), reports[-1]
    assert max(r["step"] for r in reports) == STEPS
