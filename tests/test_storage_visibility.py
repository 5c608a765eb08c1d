"""Checkpoint storage that some node cannot see is refused before training starts.

A real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and a
worker node) plus one more node whose view of the filesystem differs: its raylet runs in its own
mount namespace (``unshare --mount``) with an empty tmpfs mounted over the folder that holds the
local checkpoint storage, exactly like a second machine with a local folder of the same name.
Nodes on one machine otherwise share every path, so without that node a local folder would look
shared (and it is: a shared filesystem passes). Needs root (or user namespaces) for ``unshare``;
the module is skipped where that is not allowed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from piaa_dist.config import load_config, with_overrides
from piaa_dist.orchestration.checkpoint_store import VISIBILITY_MARKER, RunStorage, StorageNotShared

TINY = "jobs/configs/tiny.yaml"


def _can_unshare_mounts(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs piaa-probe {folder} && test ! -e {folder}/x"],
        capture_output=True, timeout=30,
    )
    return probe.returncode == 0


class BlindNode:
    """A Ray worker node in its own mount namespace, with an empty tmpfs over ``folder``."""

    def __init__(self, address: str, folder: Path, log: Path):
        ray_cli = Path(sys.executable).parent / "ray"
        script = (f"mount -t tmpfs piaa-blind {folder} && "
                  f"exec {ray_cli} start --address={address} --num-cpus=1 --block")
        self._log = open(log, "w")
        # Its own session: stop() ends the whole process group (raylet and workers), nothing else.
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            start_new_session=True, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # `ray start --block` drains, then exits
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything it left in its group
        except ProcessLookupError:
            pass
        self._log.close()


def _alive(ray) -> int:
    return len([n for n in ray.nodes() if n.get("Alive")])


def _wait_nodes(ray, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while _alive(ray) < n:
        assert time.monotonic() < deadline, f"only {_alive(ray)} of {n} Ray nodes came up"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def local_root(tmp_path_factory) -> Path:
    """The folder local checkpoint storage lives under (what the blind node cannot see)."""
    root = tmp_path_factory.mktemp("node-local-storage")
    if not _can_unshare_mounts(root):
        pytest.skip("cannot give a Ray node its own mount namespace here (unshare --mount needs root)")
    return root


@pytest.fixture(scope="module")
def cluster(local_root, tmp_path_factory):
    """A head (1 CPU) and a worker node (1 CPU); tests add the blind node."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level=logging.WARNING)
    state: dict = {"blind": None}
    logs = tmp_path_factory.mktemp("blind-node-logs")

    def start_blind() -> BlindNode:
        if state["blind"] is None:
            before = _alive(ray)
            state["blind"] = BlindNode(c.address, local_root, logs / "ray-start.log")
            _wait_nodes(ray, before + 1)
        return state["blind"]

    c.start_blind = start_blind
    try:
        _wait_nodes(ray, 2)
        yield c
    finally:
        if state["blind"] is not None:
            state["blind"].stop()
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def cfg():
    # Three 1-CPU Train workers: one per node once the blind node is up; no restarts.
    return with_overrides(load_config(TINY), {"meta.meta_steps": 2, "run.max_failures": 0})


def test_a_node_that_joins_later_and_cannot_see_the_storage_stops_the_run(cluster, cfg, local_root,
                                                                          tiny_dataset_url, tmp_path):
    """The driver's check passes on the two nodes up at submit time; the Train worker placed on
    the node that joins afterwards (as an autoscaled node would) checks the marker itself and
    stops the run before any step, naming the storage and the fix."""
    import ray.train

    from piaa_dist.orchestration.ray_train import run_distributed

    storage = local_root / "later"
    marker = storage / "meta-train" / VISIBILITY_MARKER
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = run_distributed(cfg, tiny_dataset_url, tmp_path / "out", workers=3,
                                                storage_path=str(storage))
        except BaseException as err:  # noqa: BLE001 - examined below
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while not marker.exists():  # the driver's check is under way (2 nodes: both see the folder)
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.2)
    time.sleep(10)  # let the check finish: the Train run now waits for a third CPU
    cluster.start_blind()
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run neither failed nor finished"
    err = outcome.get("error")
    assert isinstance(err, ray.train.TrainingFailedError), outcome
    assert "cannot read the storage marker" in str(err) and "run.storage_path=s3://" in str(err)
    metrics = tmp_path / "out" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # not one step


def test_a_local_folder_is_refused_before_training(cluster, cfg, local_root, tiny_dataset_url, tmp_path):
    """With the blind node up, the driver's check refuses the run: no Train worker starts."""
    from piaa_dist.orchestration.ray_train import run_distributed

    cluster.start_blind()
    t0 = time.monotonic()
    with pytest.raises(StorageNotShared) as info:
        run_distributed(cfg, tiny_dataset_url, tmp_path / "out", workers=2,
                        storage_path=str(local_root / "refused"))
    assert time.monotonic() - t0 < 180
    text = str(info.value)
    assert str(local_root / "refused") in text and "1 node(s) cannot read" in text
    assert "run.storage_path=s3://" in text  # the fix
    metrics = tmp_path / "out" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""


def test_a_shared_folder_and_s3_pass(cluster, tmp_path, s3_endpoint, s3_bucket):
    """Visibility, not the path's form: a local path every node sees (here: any folder outside
    the blind node's tmpfs) passes, and so does S3."""
    import ray

    from piaa_dist.orchestration.ray_train import check_storage_shared

    cluster.start_blind()
    assert _alive(ray) == 3
    shared = RunStorage.from_url(str(tmp_path / "shared"), "run")
    nonce = check_storage_shared(shared)
    assert shared.read_visibility_marker() == nonce
    on_s3 = RunStorage.from_url(f"s3://{s3_bucket}/runs", "run", s3_endpoint)
    nonce = check_storage_shared(on_s3)
    assert on_s3.read_visibility_marker() == nonce
