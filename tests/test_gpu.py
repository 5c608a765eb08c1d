"""A GPU asked for but not usable is an error at once, naming the driver found and the driver
needed; "auto" counts the GPUs the cluster can add by autoscaling.

This machine has no NVIDIA driver (and torch may be a CUDA build): exactly the situation of a
GPU node whose driver is missing or too old. Ray runs for real on a local multi-node test
cluster (``ray.cluster_utils.Cluster``); the "GPU" of its GPU node is a resource Ray hands out
(``num_gpus=1``) that CUDA cannot use, as on a host with a mismatched driver.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

from piaa_dist.config import load_config, with_overrides
from piaa_dist.errors import UserError
from piaa_dist.gpu import (
    GpuUnavailable,
    cuda_report,
    driver_version,
    required_driver,
)

REPO = Path(__file__).resolve().parents[1]
TINY = "jobs/configs/tiny.yaml"

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")


@pytest.fixture(scope="module")
def cfg():
    return with_overrides(load_config(TINY), {"meta.meta_steps": 2, "run.checkpoint_every": 1})


# ---------------------------------------------------------------------------------------------
# The diagnosis (no Ray)


def test_required_driver_follows_the_cuda_release_notes():
    assert required_driver("13.0") == "580.65.06"
    assert required_driver("12.8") == "570.26"
    assert required_driver("12.1") == "530.30.02"
    assert required_driver("12.7") == "560.28.03"  # unlisted minor: the newest listed below it
    assert required_driver("13.2") == "580.65.06"
    assert required_driver("") is None
    # the installed torch
    assert required_driver() == (required_driver(torch.version.cuda) if torch.version.cuda else None)


def test_the_driver_is_read_from_the_kernel_module(tmp_path, monkeypatch):
    """Both layouts of /proc/driver/nvidia/version; a driver older than torch's CUDA needs is
    called too old, with both versions in the sentence."""
    import piaa_dist.gpu as gpu

    proc = tmp_path / "version"
    monkeypatch.setattr(gpu, "PROC_DRIVER_VERSION", proc)
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
                    "(dvs-builder@U16-I3-B03-4-3)\n")
    assert driver_version() == ("580.65.06", str(proc))
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  510.47.03  Mon Jan 24 22:58:54 UTC 2022\n"
                    "GCC version:  gcc version 7.5.0 (Ubuntu 7.5.0-3ubuntu1~18.04)\n")
    assert driver_version() == ("510.47.03", str(proc))
    report = cuda_report()
    text = report.diagnosis()
    assert f"NVIDIA driver 510.47.03 found ({proc})" in text
    if torch.version.cuda:  # every CUDA torch supports needs a newer driver than 510
        assert report.driver_too_old and "too old" in text
        assert f"CUDA {torch.version.cuda}, which needs NVIDIA driver >= {required_driver()}" in text


@needs_no_cuda
def test_asking_for_a_gpu_here_names_the_driver_found_and_needed():
    from piaa_dist.model import select_device

    with pytest.raises(GpuUnavailable) as info:
        select_device("yes", "evaluate")
    err = info.value
    assert isinstance(err, UserError) and isinstance(err, RuntimeError)  # one line in the CLI
    text = str(err)
    assert "\n" not in text
    assert text.startswith("evaluate")
    found, _ = driver_version()
    assert (f"NVIDIA driver {found} found" if found else "no NVIDIA driver found") in text
    if torch.version.cuda:
        assert f"CUDA {torch.version.cuda}" in text and f"driver >= {required_driver()}" in text
    else:
        assert "CPU-only build" in text
    assert "run.use_gpu=no" in text  # the way out
    assert select_device("auto").type == "cpu" and select_device("no").type == "cpu"


@needs_no_cuda
def test_an_in_process_run_with_use_gpu_yes_stops_before_training(cfg, tiny_dataset_url, tmp_path):
    from piaa_dist.orchestration.ray_train import run_distributed

    gpu = with_overrides(cfg, {"run.use_gpu": "yes"})
    with pytest.raises(GpuUnavailable, match="meta-training.*driver"):
        run_distributed(gpu, tiny_dataset_url, tmp_path, workers=0)
    metrics = tmp_path / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # never a step on CPU


@needs_no_cuda
def test_personalize_and_giaa_on_an_unusable_gpu_fail_with_the_driver(cfg, tiny_dataset_url, tmp_path):
    from piaa_dist.data.stream import Dataset
    from piaa_dist.giaa import train_giaa
    from piaa_dist.model import build_model
    from piaa_dist.personalize import Ratings, personalize
    from piaa_dist.train import meta_training_users

    model = build_model(cfg.model)
    ratings = Ratings([], torch.zeros(0).numpy(), {})
    with pytest.raises(GpuUnavailable, match="^personalize: .*driver"):
        personalize(model, cfg, ratings, [], device="cuda")
    dataset = Dataset.open(tiny_dataset_url)
    with pytest.raises(GpuUnavailable, match="^GIAA training: .*driver"):
        train_giaa(cfg, dataset, meta_training_users(cfg, dataset), device=torch.device("cuda"))


# ---------------------------------------------------------------------------------------------
# On a Ray cluster


@pytest.fixture(scope="module")
def cluster():
    """A head with 2 CPUs and no GPU (a CPU cluster); the last test adds a "GPU" node."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
    })
    ray.init(address=c.address, logging_level=logging.WARNING)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@needs_no_cuda
def test_use_gpu_yes_on_a_cluster_without_gpus_is_refused_at_once(cluster, cfg, tiny_dataset_url, tmp_path):
    """Without the check, Ray Train would wait forever for a GPU that cannot come."""
    from piaa_dist.orchestration.ray_train import run_distributed

    t0 = time.monotonic()
    with pytest.raises(GpuUnavailable, match="no GPU and cannot get one") as info:
        run_distributed(with_overrides(cfg, {"run.use_gpu": "yes"}), tiny_dataset_url, tmp_path, workers=1)
    assert time.monotonic() - t0 < 60
    assert "driver" in str(info.value) and "run.use_gpu=no" in str(info.value)


def test_auto_counts_gpus_the_autoscaler_can_add(cluster, cfg, tmp_path):
    """No GPU is up, but the autoscaler can add GPU nodes: "auto" means GPUs."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from piaa_dist.orchestration.ray_train import gpu_capacity, use_gpu

    auto = with_overrides(cfg, {"run.use_gpu": "auto"})
    missing = tmp_path / "no-such-bootstrap.yaml"
    assert use_gpu(auto, missing) is False
    assert gpu_capacity(missing)[0] == 0

    # What an autoscaler reports to the GCS (Ray Train's own resource check reads the same key).
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.name, group.max_count = "gpu-workers", 4
    group.resources["CPU"], group.resources["GPU"] = 8, 1
    _internal_kv_put(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(), overwrite=True,
                     namespace=GCS_AUTOSCALER_STATE_NAMESPACE)
    try:
        assert gpu_capacity(missing) == (4.0, "the autoscaler's cluster config (GCS)")
        assert use_gpu(auto, missing) is True
    finally:
        _internal_kv_del(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, namespace=GCS_AUTOSCALER_STATE_NAMESPACE)
    assert use_gpu(auto, missing) is False

    # The cluster launcher's config (what `ray up` leaves on the head): g5 ×4 + p4d ×1 (8 GPUs).
    gpus, source = gpu_capacity(REPO / "cluster" / "aws-gpu.yaml")
    assert gpus == 4 * 1 + 1 * 8 and "aws-gpu.yaml" in source
    assert use_gpu(auto, REPO / "cluster" / "aws-gpu.yaml") is True
    assert use_gpu(with_overrides(cfg, {"run.use_gpu": "no"}), REPO / "cluster" / "aws-gpu.yaml") is False


def test_required_weights_missing_where_workers_run_fail_before_training(cluster, cfg, tiny_dataset_url,
                                                                         tmp_path):
    """The pre-flight probe runs where a Train worker would and finds no ImageNet file there."""
    import ray

    from piaa_dist.model import WeightsMissing, resolve_pretrained
    from piaa_dist.orchestration.ray_train import run_distributed

    worker_cache = ray.get(ray.remote(lambda: str(__import__("torch").hub.get_dir())).remote())
    if (Path(worker_cache) / "checkpoints" / "resnet18-f37072fd.pth").exists():
        pytest.skip("this machine has the ImageNet file in its torch hub cache")
    required = with_overrides(cfg, {"model.backbone": "resnet18", "model.pretrained": "required",
                                    "model.feature_dim": 16, "model.head_hidden": [8]})
    with pytest.raises(WeightsMissing) as info:
        run_distributed(required, tiny_dataset_url, tmp_path, workers=1)
    assert f"{worker_cache}/checkpoints/resnet18-f37072fd.pth" in str(info.value)
    metrics = tmp_path / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""
    assert resolve_pretrained("none") is None


@needs_no_cuda
def test_a_gpu_assigned_but_unusable_fails_the_run_before_it_trains(cluster, cfg, tiny_dataset_url, tmp_path):
    """Ray assigns the GPU of a node where CUDA cannot use it: the run fails at once, with the
    driver found and needed, before any Train worker starts (no restarts, no CPU fallback)."""
    import ray

    from piaa_dist.orchestration.ray_train import run_distributed

    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    deadline = time.monotonic() + 60
    while ray.cluster_resources().get("GPU", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    auto = with_overrides(cfg, {"run.use_gpu": "auto"})
    t0 = time.monotonic()
    with pytest.raises(GpuUnavailable) as info:
        run_distributed(auto, tiny_dataset_url, tmp_path, workers=1)
    assert time.monotonic() - t0 < 180
    text = str(info.value)
    assert "CUDA_VISIBLE_DEVICES='0'" in text  # Ray did assign a GPU
    assert "no NVIDIA driver found" in text or "NVIDIA driver" in text
    if torch.version.cuda:
        assert f"driver >= {required_driver()}" in text
    metrics = tmp_path / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""
