"""Meta-training on Ray Train (V2): one ``TorchTrainer``, gloo on CPU, nccl on GPU.

Every Train worker runs :func:`piaa_dist.train.meta_train` on its slice of each meta-batch
(rank ``r`` of ``W`` gets ``batch[r::W]``); the trainer's ``reduce`` is
``torch.distributed.all_reduce(SUM)`` of one flat tensor per step, so all ranks apply the same
update (DDP is not used: it cannot double-backward through the inner loop).

Checkpoints (meta-learner, meta-optimizer, sampler position = step) are reported by rank 0
every ``run.checkpoint_every`` steps and at the end, to ``<storage_path>/<name>/`` (a local
folder or ``s3://``), in folders named ``checkpoint_<step:06d>``.
``FailureConfig(max_failures=run.max_failures)`` restarts a failed worker group; re-running the
same command (same storage path and name) after a stop starts a new one. Either way rank 0
resumes from the newest checkpoint folder in storage that loads
(:func:`~piaa_dist.orchestration.checkpoint_store.newest_loadable`: Ray's registered
checkpoint is one of those folders, and Ray can lose the registration of a folder that was
fully written when a worker dies right after it) and broadcasts its choice, so every rank
loads the same state. At most one checkpoint interval of work is redone, and because the task
stream is a pure function of ``(seed, step)`` the redone steps see the same tasks: a resumed
run ends bit-identical to an uninterrupted one.

``workers=0`` runs the same loop in this process without Ray
(:mod:`piaa_dist.orchestration.in_process`). Either way :func:`run_distributed` holds the
output folder and the checkpoint storage (:mod:`piaa_dist.orchestration.run_lock`), so a
second run on them is refused instead of pruning the first one's checkpoints.

This module is the only one of the runner's that imports Ray; what it shares with the
in-process runner (storage, checkpoint rules, step hook, metric sinks) does not.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from piaa_dist.config import JobConfig, config_from_dict, config_to_dict
from piaa_dist.orchestration.checkpoint_store import (
    DEFAULT_NAME,
    RunStorage,
    StorageNotShared,
    absolute_url,
    checkpoint_dir_name,
    load_checkpoint,
    model_from_state,
    newest_loadable,
    read_best,
    write_best,
    write_checkpoint_folder,
)
from piaa_dist.orchestration.in_process import run_in_process
from piaa_dist.orchestration.run_lock import hold_run
from piaa_dist.orchestration.run_records import (
    Fanout,
    JsonlMetrics,
    MetricsCallback,
    TrainResult,
)
from piaa_dist.orchestration.step_hook import StepHook, is_best_report

log = logging.getLogger(__name__)


def quiet_ray_logs() -> None:
    """``worker_process_setup_hook`` for a local Ray started without the dashboard.

    Ray Train V2's placement-group cleaner polls the State API, which needs the dashboard;
    without it every poll logs a warning, once a second, for the whole run.
    """
    logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    ).setLevel(logging.ERROR)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to (or start) Ray quietly. Returns True when this call started it.

    ``address`` (or ``$RAY_ADDRESS``, set by ``ray job submit``) connects to a cluster;
    otherwise a private local Ray starts without the dashboard. ``address="local"`` matters:
    a bare ``ray.init()`` would join any ``ray start --head`` cluster running on this machine
    (someone else's, or a test's), and share, or fight over, its CPUs.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
            runtime_env={"worker_process_setup_hook": f"{__name__}.quiet_ray_logs"},
        )
    return True


#: Where ``ray up`` puts the cluster launcher's autoscaling config on the head node (the file
#: the autoscaler itself reads, ``--autoscaling-config``); job drivers run on the head.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def _gpus_in_autoscaling_config(path: Path) -> float:
    """GPUs the node types of a cluster launcher config can add: sum of GPU × max nodes."""
    from ray.autoscaler.v2.instance_manager.config import FileConfigReader

    types = FileConfigReader(str(path), skip_content_hash=True).get_cached_autoscaling_config()
    return float(sum(float(t.resources.get("GPU", 0)) * max(0, t.max_worker_nodes)
                     for t in (types.get_node_type_configs() or {}).values()))


def gpu_capacity(bootstrap_config: str | Path | None = None) -> tuple[float, str]:
    """GPUs the connected Ray cluster has now or can get by autoscaling, and the source.

    In order: the cluster's current resources; the autoscaler's cluster config in the GCS
    (``ClusterConfig``: what Ray Train's own resource check reads, reported by autoscalers that
    publish it); the cluster launcher's autoscaling config on this node (``ray up`` puts it at
    :data:`BOOTSTRAP_CONFIG` on the head, where job drivers run). A cluster whose GPU nodes
    scale from zero has no GPU at submit time, so the first figure alone would be 0.

    Args:
        bootstrap_config: the autoscaling config file to read (default :data:`BOOTSTRAP_CONFIG`).

    Returns:
        ``(gpus, where the figure comes from)``; ``(0.0, ...)`` when no source offers a GPU.
    """
    import ray

    now = float(ray.cluster_resources().get("GPU", 0))
    if now > 0:
        return now, "the cluster's current resources"
    try:
        # No public API yet: Ray Train's worker group reads the same (ray._private.state).
        from ray._private.state import state as gcs_state

        limits = gcs_state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - an older GCS without the key: fall through
        log.debug("no cluster config in the GCS", exc_info=True)
        limits = {}
    if float(limits.get("GPU", 0)) > 0:
        return float(limits["GPU"]), "the autoscaler's cluster config (GCS)"
    path = Path(bootstrap_config or BOOTSTRAP_CONFIG).expanduser()
    if path.is_file():
        try:
            gpus = _gpus_in_autoscaling_config(path)
        except Exception as err:  # noqa: BLE001 - an unreadable file is no evidence of GPUs
            log.warning("cannot read the autoscaling config %s: %s", path, err)
            gpus = 0.0
        if gpus > 0:
            return gpus, f"the autoscaling config {path}"
    return 0.0, "no GPU in the cluster now and no autoscaler config that can add one"


def use_gpu(cfg: JobConfig, bootstrap_config: str | Path | None = None) -> bool:
    """Whether Train workers get a GPU (Ray must be initialised for "auto" and "yes").

    * ``run.use_gpu: no``: never.
    * ``auto``: when the cluster can provide GPUs, including by autoscaling
      (:func:`gpu_capacity`), not only when one is idle at submit time.
    * ``yes``: always; a cluster that has no GPU and cannot get one is refused here, at
      once, instead of Ray Train waiting forever for a GPU (or a run quietly on CPU).

    Raises:
        GpuUnavailable: ``yes`` and :func:`gpu_capacity` is 0 (the message also states this
            machine's NVIDIA driver and the one torch needs).
    """
    choice = cfg.run.use_gpu
    if choice == "no":
        return False
    import ray

    if not ray.is_initialized():
        if choice == "yes":
            return True
        return False
    gpus, source = gpu_capacity(bootstrap_config)
    if choice == "auto":
        log.info("run.use_gpu=auto: %s (%s)", f"{gpus:g} GPU(s), Train workers use one each"
                 if gpus > 0 else "no GPU, Train workers run on CPU", source)
        return gpus > 0
    if gpus <= 0:
        from piaa_dist.gpu import GpuUnavailable, cuda_report

        raise GpuUnavailable(
            f"run.use_gpu=yes, but the Ray cluster has no GPU and cannot get one ({source}); "
            f"this driver's node: {cuda_report().diagnosis()}. Submit to a cluster with GPU "
            "nodes (cluster/aws-gpu.yaml, cluster/kuberay.yaml) or set run.use_gpu=no"
        )
    return True


# ---------------------------------------------------------------------------------------------
# Checks before a run starts (every one fails in seconds, before any training)


def _worker_preflight(model_cfg: dict, gpu: bool) -> tuple[str, str] | None:
    """Runs where a Train worker would: is its GPU usable, are the required weights there?"""
    from piaa_dist.config import config_from_dict

    if gpu:
        from piaa_dist.gpu import GpuUnavailable, require_cuda

        try:
            require_cuda("a Train worker's node")
        except GpuUnavailable as err:
            return "gpu", str(err)
    cfg = config_from_dict({"model": model_cfg})
    if cfg.model.backbone == "resnet18":
        from piaa_dist.model import WeightsMissing, resolve_pretrained

        try:
            resolve_pretrained(cfg.model.pretrained)
        except WeightsMissing as err:
            return "weights", str(err)
    return None


def preflight(cfg: JobConfig, gpu: bool, timeout_s: float = 1800.0) -> None:
    """Run :func:`_worker_preflight` once with a Train worker's resources, before the Train run.

    Only when there is something to check (a GPU, or weights that are ``required`` or a path):
    a GPU node with an unusable driver or without the weights then fails the submission with
    the reason, instead of every Train worker failing on every restart. On a cluster whose GPU
    nodes scale from zero, the probe waits for the first GPU node (as the Train run would), at
    most ``timeout_s``; after that the check is skipped with a warning (the workers still check).

    Raises:
        GpuUnavailable: the probe's node has a GPU assigned that CUDA cannot use.
        WeightsMissing: the probe's node lacks the required ImageNet weights.
    """
    required_weights = cfg.model.backbone == "resnet18" and cfg.model.pretrained not in ("auto", "none")
    if not (gpu or required_weights):
        return
    import ray

    from piaa_dist.gpu import GpuUnavailable
    from piaa_dist.model import WeightsMissing

    probe = ray.remote(_worker_preflight).options(
        num_cpus=cfg.run.cpus_per_worker, num_gpus=1 if gpu else 0, max_retries=0,
    )
    ref = probe.remote(config_to_dict(cfg)["model"], gpu)
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        # No node with a worker's resources came up in time (autoscaling still under way): the
        # Train run waits for one the same way, and its workers check again when they start.
        ray.cancel(ref, force=True)
        log.warning("pre-flight check skipped: no node with %s CPU%s came up within %.0f s",
                    cfg.run.cpus_per_worker, " and a GPU" if gpu else "", timeout_s)
        return
    problem = ray.get(ref)
    if problem is not None:
        kind, message = problem
        raise (GpuUnavailable if kind == "gpu" else WeightsMissing)(message)


def _sees_marker(storage: RunStorage, nonce: str) -> dict:
    """Runs on one node: can it read the driver's marker in the run storage?"""
    import ray

    found = storage.read_visibility_marker()
    return {"node": ray.get_runtime_context().get_node_id(),
            "host": os.uname().nodename, "ok": found == nonce, "found": found}


def check_storage_shared(storage: RunStorage, timeout_s: float = 120.0) -> str:
    """Refuse a run storage that some node of the cluster cannot see, before training starts.

    The driver writes a marker holding a fresh nonce into the run's storage; a zero-CPU task
    pinned to every alive node reads it back. S3, or a filesystem mounted on every node at the
    same path, passes; a folder on the driver's local disk fails on every other node (Ray Train
    workers there would write their checkpoints where the driver, and any restart on another
    node, never finds them). What is checked is visibility, not the form of the path. Train
    workers check the same marker when they start, which also covers nodes that join later
    (autoscaling).

    Args:
        storage: the run's storage.
        timeout_s: how long to wait for the nodes' answers; nodes that do not answer in time
            are reported in a warning, not refused.

    Returns:
        The marker's nonce (Train workers compare it).

    Raises:
        StorageNotShared: a node read no marker or another one (names the nodes and the fix).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nonce = storage.write_visibility_marker()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return nonce
    probe = ray.remote(_sees_marker)
    refs = [
        probe.options(
            num_cpus=0, max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False),
        ).remote(storage, nonce)
        for n in nodes
    ]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        log.warning("%d of %d node(s) did not answer the storage check within %.0f s",
                    len(pending), len(refs), timeout_s)
    blind = [r for r in ray.get(ready) if not r["ok"]]
    if blind:
        where = ", ".join(f"{r['host']} (node {r['node'][:8]}: "
                          f"{'no marker' if r['found'] is None else 'a different marker'})"
                          for r in blind)
        raise StorageNotShared(
            f"checkpoint storage {storage.url} is not shared by every node of this {len(nodes)}-node "
            f"Ray cluster: {len(blind)} node(s) cannot read the marker the driver wrote at "
            f"{storage.url_of(storage.visibility_marker_path())}: {where}. Set "
            "run.storage_path=s3://BUCKET/PREFIX (or mount one shared filesystem at the same "
            "path on every node) so that checkpoints written on any node can be resumed from"
        )
    return nonce




# ---------------------------------------------------------------------------------------------
# Ray Train worker


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The trainer's ``reduce``: in-place SUM over all ranks of one flat tensor."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


#: ``inject_failure["when"]``: kill at the step boundary (after the update), or inside the
#: step's all-reduce while the other ranks wait in it
AFTER_STEP = "after-step"
MID_REDUCE = "mid-reduce"


class FaultyReduce:
    """Testing hook: the all-reduce of step ``spec["step"]`` with rank ``spec["rank"]`` killed
    inside it (``inject_failure={"when": "mid-reduce", ...}``), once per marker file.

    Rank 0 announces that it is entering the collective (a file beside the marker), then enters
    it; the failing rank waits for that, gives rank 0 a moment to block inside gloo/nccl, and
    ``os._exit(1)`` s without contributing: the collective is in flight, one peer is gone. Every
    other call is the plain reduce.

    Args:
        reduce: the real reduce.
        spec: ``{"step": N, "rank": R, "marker": PATH, "when": "mid-reduce"}``.
        rank: this process's rank.
        first_step: the step whose update the first step-reduce belongs to (resume step + 1).
        warmup_calls: reduce calls before the first step's (the weight sync of a fresh run).
    """

    def __init__(self, reduce, spec: dict, *, rank: int, first_step: int, warmup_calls: int):
        self.reduce = reduce
        self.spec = spec
        self.rank = rank
        self.first_step = first_step
        self.warmup_calls = warmup_calls
        self.calls = 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        import time
        from pathlib import Path

        self.calls += 1
        step = self.first_step + self.calls - 1 - self.warmup_calls
        marker = Path(self.spec["marker"])
        entered = marker.with_name(marker.name + ".rank0-in-reduce")
        if step != self.spec["step"] or marker.exists():
            return self.reduce(t)
        if self.rank == 0:
            entered.write_text(f"rank 0 entered the all-reduce of step {step}\n")
            return self.reduce(t)
        if self.rank != self.spec.get("rank", 1):
            return self.reduce(t)
        deadline = time.monotonic() + 300
        while not entered.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # rank 0 is now blocked inside the collective, waiting for us
        marker.write_text(f"rank {self.rank} killed inside the all-reduce of step {step}\n")
        log.warning("injected failure: rank %d exits inside the all-reduce of step %d", self.rank, step)
        logging.shutdown()
        os._exit(1)


def _resume_state(rank: int, world: int, storage: RunStorage) -> tuple[dict | None, int]:
    """The state every rank resumes from, and how many newer checkpoints did not load.

    Rank 0 picks the newest checkpoint folder in storage that loads and tells the other ranks
    which one, so all ranks start from the same state even if a folder appears or breaks
    meanwhile.
    """
    import torch.distributed as dist

    choice: list[Any] = [(None, 0)]
    state = None
    if rank == 0:
        point = newest_loadable(storage)
        state = point.state
        choice = [(point.folder, len(point.skipped))]
        if state is not None:
            log.info("resuming from %s at step %d", point.url, point.step)
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    folder, skipped = choice[0]
    if rank != 0 and folder is not None:
        state = load_checkpoint(storage, folder)
    return state, skipped


def _train_worker(config: dict) -> None:
    """``train_loop_per_worker``: one rank of meta-training (runs inside a Ray Train worker)."""
    import ray.train

    from piaa_dist.data.stream import Dataset
    from piaa_dist.train import meta_train

    cfg = config_from_dict(config["cfg"])
    storage: RunStorage = config["storage"]
    torch.set_num_threads(max(1, cfg.run.threads_per_worker))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    nonce = config.get("storage_nonce")
    if nonce and storage.read_visibility_marker() != nonce:
        # A node that joined after the driver's check (autoscaling) and cannot see the storage.
        raise StorageNotShared(
            f"Train worker rank {rank} on {os.uname().nodename} cannot read the storage marker at "
            f"{storage.url_of(storage.visibility_marker_path())}: checkpoint storage {storage.url} "
            "is not shared with the driver. Set run.storage_path=s3://BUCKET/PREFIX (or a "
            "filesystem mounted on every node)"
        )
    if config["use_gpu"]:
        import ray.train.torch

        from piaa_dist.gpu import require_cuda

        # Before get_device()/model.to(): an assigned GPU that CUDA cannot use fails here with
        # the driver found and the driver needed.
        require_cuda(f"Train worker rank {rank}")
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    dataset = Dataset.open(config["data_url"], endpoint_url=config["s3_endpoint"] or None)

    resume, skipped = _resume_state(rank, world, storage)
    spec = config.get("inject_failure") or None
    reduce = _all_reduce_sum if world > 1 else None
    if spec and spec.get("when", AFTER_STEP) == MID_REDUCE:
        if reduce is not None:
            reduce = FaultyReduce(
                reduce, spec, rank=rank, first_step=(int(resume["step"]) if resume else 0) + 1,
                warmup_calls=0 if resume else 1,  # meta_train syncs rank 0's weights first
            )
        spec = None

    def report(step: int, metrics: dict, trainer: Any, with_checkpoint: bool) -> None:
        if with_checkpoint and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                write_checkpoint_folder(tmp, trainer.state_dict(), cfg)
                if is_best_report(step, metrics):
                    # Ray keeps only the newest checkpoints; the best validation one is kept
                    # beside them (<name>/best, <name>/BEST) before Ray may move this folder.
                    write_best(storage, tmp, step)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=checkpoint_dir_name(step),
                )
        else:
            ray.train.report(metrics)

    hook = StepHook(
        cfg, rank=rank, report=report, dataset=dataset,
        inject_failure=spec,
        resumed_from=int(resume["step"]) if resume else 0,
        skipped_checkpoints=skipped,
        # The plain SUM (never FaultyReduce: it counts the step reduces) carries rank 0's
        # validation score, so every rank takes the same early-stopping decision.
        reduce=_all_reduce_sum if world > 1 else None,
    )
    meta_train(
        cfg, dataset, rank=rank, world_size=world,
        reduce=reduce,
        resume=resume, on_step=hook, device=device,
    )


def _metrics_user_callback(fn: MetricsCallback):
    """Wrap ``fn`` in a Ray Train ``UserCallback`` (it runs in the controller, on the driver's node)."""
    from ray.train import UserCallback

    class _Metrics(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0]:
                fn(int(metrics[0].get("step", 0)), dict(metrics[0]))

    return _Metrics()


def build_trainer(
    cfg: JobConfig,
    data_url: str,
    *,
    workers: int,
    storage_path: str,
    name: str = DEFAULT_NAME,
    s3_endpoint: str | None = None,
    callbacks: Sequence[Any] = (),
    metrics_callback: MetricsCallback | None = None,
    inject_failure: dict | None = None,
):
    """Build (but do not fit) the ``TorchTrainer`` for a meta-training run.

    Ray must be initialised. Ray Tune's V2 integration calls this inside a trial function
    with ``callbacks=[TuneReportCallback()]``; :func:`run_distributed` calls it for ``train``.

    Args:
        cfg: job config (``run.cpus_per_worker``, ``run.max_failures``, ``run.use_gpu``...).
        data_url: dataset root (local folder or ``s3://``).
        workers: number of Train workers (>= 1).
        storage_path: checkpoint root (local folder or ``s3://``); the run lives in
            ``<storage_path>/<name>`` and re-running with the same pair resumes it.
        name: run name under the storage path.
        s3_endpoint: S3 endpoint for data and storage (default ``$AWS_ENDPOINT_URL``).
        callbacks: Ray Train ``UserCallback`` s (run in the controller).
        metrics_callback: ``fn(step, metrics)`` with rank 0's metrics at every report, called
            in the controller on the driver's node (so a local MLflow SQLite file is reachable).
        inject_failure: testing hook ``{"step": N, "rank": R, "marker": PATH}``: rank R
            ``os._exit(1)`` s at step N once (the marker file records that it happened), after
            the step's update; with ``"when": "mid-reduce"`` inside the step's all-reduce while
            rank 0 waits in it (:class:`FaultyReduce`).

    Before it builds the trainer it checks, in seconds, what would otherwise fail every worker
    on every restart: the storage is shared by every node (:func:`check_storage_shared`), a GPU
    run can get a usable GPU (:func:`use_gpu`, :func:`preflight`), required weights are there.

    Raises:
        StorageNotShared: some node cannot see the checkpoint storage.
        GpuUnavailable: a GPU is required but the cluster has none, or CUDA cannot use it.
        WeightsMissing: ``model.pretrained`` requires a file that a worker's node lacks.
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from piaa_dist.orchestration.ray_logging import train_logging_config

    if workers < 1:
        raise ValueError("build_trainer needs workers >= 1 (use run_distributed for workers=0)")
    gpu = use_gpu(cfg)
    storage = RunStorage.from_url(storage_path, name, s3_endpoint)
    # Before Ray Train starts: storage every node sees, a usable GPU, the required weights.
    nonce = check_storage_shared(storage)
    preflight(cfg, gpu)
    path, fs = storage.ray_storage()
    all_callbacks = list(callbacks)
    if metrics_callback is not None:
        # First, before TuneReportCallback: once Tune sees a report it may stop (kill) the
        # trial, and a metric logged after that would be lost from the trial's MLflow run.
        all_callbacks.insert(0, _metrics_user_callback(metrics_callback))
    loop_config = {
        "cfg": config_to_dict(cfg),
        "data_url": absolute_url(data_url),
        "s3_endpoint": s3_endpoint or os.environ.get("AWS_ENDPOINT_URL", ""),
        "use_gpu": gpu,
        "inject_failure": inject_failure,
        "storage": storage,
        "storage_nonce": nonce,
    }
    resources = {"CPU": cfg.run.cpus_per_worker}
    if gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        _train_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            # run.keep_checkpoints: the newest N (0: all); the best validation one is kept
            # apart (<name>/best), whatever Ray prunes.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints or None),
            callbacks=all_callbacks,
            # Ray Train's own start-up/checkpoint INFO lines stay in its log files unless asked for.
            logging_config=train_logging_config(),
        ),
    )


def _fit(
    cfg: JobConfig,
    data_url: str,
    storage: RunStorage,
    *,
    workers: int,
    s3_endpoint: str | None,
    callbacks: Sequence[Any],
    metrics_callback: MetricsCallback,
    ray_address: str | None,
    inject_failure: dict | None,
) -> TrainResult:
    import ray

    started = ensure_ray(ray_address)
    try:
        trainer = build_trainer(
            cfg, data_url, workers=workers, storage_path=storage.url, name=storage.name,
            s3_endpoint=s3_endpoint, callbacks=callbacks, metrics_callback=metrics_callback,
            inject_failure=inject_failure,
        )
        result = trainer.fit()
        if result.checkpoint is not None:
            folder = result.checkpoint.path
            state = load_checkpoint(storage, folder)
            url = storage.url_of(folder)
        else:
            # Nothing left to do (the stored run had already finished): its newest checkpoint.
            point = newest_loadable(storage)
            if point.state is None:
                raise RuntimeError(f"Ray Train run {storage.name!r} finished without a checkpoint")
            state, url = point.state, point.url
        stopping = state.get("early_stopping") or {}
        best = read_best(storage, best_step=int(stopping.get("best_step", 0))) \
            if stopping.get("best_score") is not None else None
        return TrainResult(model_from_state(cfg, state), state, dict(result.metrics or {}), url, workers,
                           best=best, best_model=None if best is None else model_from_state(cfg, best.state))
    finally:
        if started:
            ray.shutdown()


def run_distributed(
    cfg: JobConfig,
    data_url: str,
    out_dir: str | Path,
    *,
    workers: int | None = None,
    storage_path: str | None = None,
    name: str = DEFAULT_NAME,
    s3_endpoint: str | None = None,
    callbacks: Sequence[Any] = (),
    metrics_callback: MetricsCallback | None = None,
    progress: bool = False,
    ray_address: str | None = None,
    inject_failure: dict | None = None,
) -> TrainResult:
    """Meta-train with ``workers`` Ray Train workers (0 = in this process, no Ray).

    Args:
        cfg: job config.
        data_url: dataset root (local folder or ``s3://bucket/prefix``).
        out_dir: the run's output folder; checkpoints default to ``<out_dir>/checkpoints``.
        workers: Train workers; default ``cfg.run.workers``.
        storage_path: checkpoint root; default ``cfg.run.storage_path``, else
            ``<out_dir>/checkpoints``. Re-running with the same storage path and ``name``
            resumes from the newest checkpoint that loads.
        name: run name under the storage path.
        s3_endpoint: S3 endpoint for data and checkpoints (default ``$AWS_ENDPOINT_URL``).
        callbacks: extra Ray Train ``UserCallback`` s (ignored in-process).
        metrics_callback: ``fn(step, metrics)`` with rank 0's metrics at every report
            (MLflow logging); runs on the driver's node. Reports also go to
            ``<out_dir>/metrics.jsonl``.
        progress: in-process only: a tqdm bar on stderr.
        ray_address: Ray cluster to connect to when Ray is not initialised yet.
        inject_failure: testing hook, see :func:`build_trainer`.

    Returns:
        The meta-learner and its final state.

    Raises:
        RunLocked: another live run holds ``out_dir`` or the checkpoint storage.
        StorageNotShared, GpuUnavailable, WeightsMissing: see :func:`build_trainer` (before
            any training; ``workers=0`` checks the GPU and the weights in this process).
        ray.train.TrainingFailedError: workers kept failing beyond ``run.max_failures``.
    """
    workers = cfg.run.workers if workers is None else workers
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s3_endpoint = s3_endpoint or cfg.data.s3_endpoint or None
    storage = RunStorage.from_url(
        storage_path or cfg.run.storage_path or str(out_dir / "checkpoints"), name, s3_endpoint
    )
    data_url = absolute_url(data_url)
    with hold_run(out_dir, storage):
        sinks = Fanout(
            [JsonlMetrics(out_dir / "metrics.jsonl")] + ([metrics_callback] if metrics_callback else [])
        )
        if workers <= 0:
            return run_in_process(cfg, data_url, storage, s3_endpoint=s3_endpoint,
                                  metrics_callback=sinks, progress=progress)
        return _fit(cfg, data_url, storage, workers=workers, s3_endpoint=s3_endpoint,
                    callbacks=callbacks, metrics_callback=sinks, ray_address=ray_address,
                    inject_failure=inject_failure)


__all__ = [
    "BOOTSTRAP_CONFIG",
    "DEFAULT_NAME",
    "StorageNotShared",
    "TrainResult",
    "build_trainer",
    "check_storage_shared",
    "ensure_ray",
    "gpu_capacity",
    "preflight",
    "quiet_ray_logs",
    "run_distributed",
    "use_gpu",
]
