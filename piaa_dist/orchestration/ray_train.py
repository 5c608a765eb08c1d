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
resumes from the newer of Ray's registered checkpoint and the newest complete checkpoint folder
in storage (Ray can lose the registration of a checkpoint that was fully written when a worker
dies right after it) and broadcasts its choice, so every rank loads the same state. At most one
checkpoint interval of work is redone, and because the task stream is a pure function of
``(seed, step)`` the redone steps see the same tasks: a resumed run ends bit-identical to an
uninterrupted one.

``workers=0`` runs the same loop in this process without Ray (checkpoints and resume work the
same way, through :class:`_LocalCheckpoints`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from piaa_dist.config import JobConfig, config_from_dict, config_to_dict, dump_config

log = logging.getLogger(__name__)

DEFAULT_NAME = "meta-train"
#: checkpoints kept in storage (the latest is what a restart resumes from)
KEEP_CHECKPOINTS = 2
_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d{6,})$")

#: ``metrics_callback(step, metrics)``: rank 0's metrics at every report, on the driver's node.
MetricsCallback = Callable[[int, dict], None]


@dataclasses.dataclass
class TrainResult:
    """What a finished meta-training run hands back to the driver.

    Attributes:
        model: the meta-learner (CPU, eval mode not set: as trained).
        state: the trainer's final ``state_dict`` (model, optimizer, step).
        metrics: rank 0's last reported metrics (``step``, ``query_loss``, ...).
        checkpoint: URL or path of the last checkpoint, or None.
        workers: Ray Train workers used (0 = in-process).
    """

    model: nn.Module
    state: dict
    metrics: dict
    checkpoint: str | None
    workers: int

    @property
    def step(self) -> int:
        """Meta-updates applied (the final sampler position)."""
        return int(self.state["step"])


class JsonlMetrics:
    """``metrics_callback`` that appends ``{"step", ...metrics}`` lines to a JSON-lines file.

    :func:`run_distributed` always writes ``<out_dir>/metrics.jsonl`` this way (a restarted
    run appends the steps it redoes, so the file also shows where a run resumed).
    """

    def __init__(self, path: str | Path):
        self.path = str(Path(path).resolve())

    def __call__(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if k != "step"}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


class _Fanout:
    """Several metrics callbacks as one (picklable when its members are)."""

    def __init__(self, callbacks: Sequence[MetricsCallback]):
        self.callbacks = list(callbacks)

    def __call__(self, step: int, metrics: dict) -> None:
        for fn in self.callbacks:
            try:
                fn(step, dict(metrics))
            except Exception:  # noqa: BLE001 - logging must never kill a training run
                log.warning("metrics callback %r failed at step %d", fn, step, exc_info=True)


def quiet_ray_logs() -> None:
    """``worker_process_setup_hook`` for a local Ray started without the dashboard.

    Ray Train V2's placement-group cleaner polls the State API, which needs the dashboard;
    without it every poll logs a warning, once a second, for the whole run.
    """
    logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    ).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# Storage


def resolve_storage(
    storage_path: str, endpoint_url: str | None = None
) -> tuple[str, Any | None]:
    """Turn a storage URL into what Ray Train's ``RunConfig`` wants.

    Args:
        storage_path: a local folder (made absolute, since Train workers change their working
            directory) or ``s3://bucket/prefix``.
        endpoint_url: S3 endpoint (e.g. a moto or MinIO server); default ``$AWS_ENDPOINT_URL``.

    Returns:
        ``(path, filesystem)``: with a custom endpoint, ``path`` is ``bucket/prefix`` and
        ``filesystem`` a ``pyarrow.fs.S3FileSystem`` pointed at it (Ray requires the scheme
        stripped then); otherwise ``filesystem`` is None and Ray infers it from the path.
    """
    if not storage_path.startswith("s3://"):
        return str(Path(storage_path).expanduser().resolve()), None
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or ""
    if not endpoint:
        return storage_path, None
    import pyarrow.fs

    parsed = urlparse(endpoint)
    kwargs: dict[str, Any] = {
        "endpoint_override": parsed.netloc or parsed.path,
        "scheme": parsed.scheme or "http",
        "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
    }
    # Explicit keys travel with the pickled filesystem to every worker, whose environment
    # (raylet-spawned) may not carry the driver's AWS_* variables.
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
    return storage_path[len("s3://") :], pyarrow.fs.S3FileSystem(**kwargs)


def absolute_url(url: str) -> str:
    """Local dataset paths made absolute (Train workers run in their own directory)."""
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


_absolute_url = absolute_url  # the name piaa_dist.orchestration.tune imports


def _save_state_dir(directory: str | Path, trainer: Any, cfg: JobConfig) -> None:
    from piaa_dist.checkpoint import save_training_state

    save_training_state(directory, trainer.state_dict())
    Path(directory, "config.yaml").write_text(dump_config(cfg))


def _load_state_dir(directory: str | Path) -> dict:
    from piaa_dist.checkpoint import load_training_state

    return load_training_state(directory)


class _LocalCheckpoints:
    """Checkpoints of an in-process run, with the same storage options as Ray's.

    Layout: ``<root>/checkpoint_<step:06d>/`` plus ``<root>/LATEST`` naming the newest
    complete one; ``LATEST`` is written last, so a run stopped mid-write resumes from the
    previous checkpoint rather than a torn one.
    """

    def __init__(self, storage_path: str, name: str, endpoint_url: str | None):
        import pyarrow.fs

        path, fs = resolve_storage(storage_path, endpoint_url)
        if fs is None:
            fs, path = pyarrow.fs.FileSystem.from_uri(
                path if "://" in path else Path(path).as_uri()
            )
        self.fs = fs
        self.root = f"{path.rstrip('/')}/{name}/local"
        self.url = (
            f"s3://{self.root}" if storage_path.startswith("s3://") else self.root
        )

    def latest(self) -> str | None:
        import pyarrow.fs

        info = self.fs.get_file_info(f"{self.root}/LATEST")
        if info.type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(f"{self.root}/LATEST") as f:
            return f.read().decode().strip() or None

    def load_latest(self) -> dict | None:
        import pyarrow.fs

        name = self.latest()
        if name is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            pyarrow.fs.copy_files(
                f"{self.root}/{name}", tmp, source_filesystem=self.fs,
                destination_filesystem=pyarrow.fs.LocalFileSystem(),
            )
            return _load_state_dir(tmp)

    def save(self, step: int, trainer: Any, cfg: JobConfig) -> str:
        import pyarrow.fs

        name = f"checkpoint_{step:06d}"
        previous = self.latest()
        with tempfile.TemporaryDirectory() as tmp:
            _save_state_dir(tmp, trainer, cfg)
            self.fs.create_dir(f"{self.root}/{name}", recursive=True)
            pyarrow.fs.copy_files(
                tmp, f"{self.root}/{name}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )
        with self.fs.open_output_stream(f"{self.root}/LATEST") as f:
            f.write(name.encode())
        if previous and previous != name:
            # One older checkpoint is enough to survive a torn write of the newest.
            for info in self.fs.get_file_info(pyarrow.fs.FileSelector(self.root)):
                base = info.base_name
                if base.startswith("checkpoint_") and base not in (name, previous):
                    self.fs.delete_dir(info.path)
        return f"{self.url}/{name}"


# ---------------------------------------------------------------------------------------------
# The per-step hook shared by Ray workers and the in-process loop


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class _StepHook:
    """``on_step`` for :func:`meta_train`: reports, checkpoints, validates, injects failures.

    Reports happen at the same steps on every rank (multiples of ``log_every``,
    ``checkpoint_every``, ``validate_every`` and the last step), because ``ray.train.report``
    is a barrier that every rank must reach equally often.
    """

    def __init__(
        self,
        cfg: JobConfig,
        *,
        rank: int,
        report: Callable[[int, dict, Any, bool], None],
        dataset: Any,
        inject_failure: dict | None,
        progress: Any = None,
        resumed_from: int = 0,
    ):
        self.cfg = cfg
        self.rank = rank
        self.report = report
        self.dataset = dataset
        self.inject_failure = inject_failure
        self.progress = progress
        self.resumed_from = resumed_from
        self.data_s = 0.0
        self.step_s = 0.0

    def __call__(self, step: int, metrics: dict, trainer: Any) -> None:
        run = self.cfg.run
        self._maybe_fail(step)
        self.data_s += metrics["data_s"]
        self.step_s += metrics["step_s"]
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(query_loss=f"{metrics['query_loss']:.4f}")
        last = step == self.cfg.meta.meta_steps
        checkpoint = _due(step, run.checkpoint_every) or last
        validate = _due(step, run.validate_every) or (last and run.validate_every > 0)
        if not (checkpoint or validate or _due(step, run.log_every) or last):
            return
        # resumed_from: the step this attempt started at (0 = fresh; shows where a restart resumed).
        out = dict(metrics, step=step, resumed_from=self.resumed_from)
        # Share of wall time spent waiting for tasks since the last report (data-plane health).
        out["data_wait_share"] = self.data_s / self.step_s if self.step_s > 0 else 0.0
        self.data_s = self.step_s = 0.0
        if validate and self.rank == 0:
            score = _validation_srocc(self.cfg, self.dataset, trainer.model)
            if score is not None:
                out["val_srocc"] = score
        self.report(step, out, trainer, checkpoint)

    def _maybe_fail(self, step: int) -> None:
        """Testing hook: ``os._exit(1)`` once on one rank at one step (a marker file says "done")."""
        spec = self.inject_failure
        if not spec or self.rank != spec.get("rank", 1) or step != spec["step"]:
            return
        marker = Path(spec["marker"])
        if marker.exists():
            return
        marker.write_text(f"rank {self.rank} exited at step {step}\n")
        log.warning("injected failure: rank %d exits at step %d", self.rank, step)
        logging.shutdown()
        os._exit(1)


def _validation_srocc(cfg: JobConfig, dataset: Any, model: nn.Module) -> float | None:
    """Validation SROCC of the meta-learner on the held-out training users (Tune's metric)."""
    try:
        from piaa_dist.evaluate import validation_srocc
    except ImportError:  # evaluate.py not available: report losses only
        return None
    from piaa_dist.train import validation_users

    users = validation_users(cfg, dataset)
    if not users:
        return None
    # A copy: evaluation fine-tunes and switches modes; the meta-learner must stay untouched.
    return float(
        validation_srocc(
            cfg, dataset, copy.deepcopy(model), users,
            shots=min(cfg.eval.shots), repeats=cfg.eval.repeats,
        )
    )


# ---------------------------------------------------------------------------------------------
# Ray Train worker


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The trainer's ``reduce``: in-place SUM over all ranks of one flat tensor."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def stored_checkpoints(fs: Any, root: str) -> list[tuple[int, str]]:
    """``(step, folder)`` of the ``checkpoint_<step>`` folders under ``root``, newest first."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    found = []
    for info in infos:
        m = _CHECKPOINT_DIR.match(info.base_name)
        if m and info.type == pyarrow.fs.FileType.Directory:
            found.append((int(m.group(1)), info.path))
    return sorted(found, reverse=True)


def newest_stored_state(fs: Any, root: str, *, after: int = -1) -> tuple[str | None, dict | None]:
    """The newest complete training state stored under ``root`` with a step above ``after``.

    Folders that fail to load (a torn upload: missing file or hash mismatch) are skipped.

    Returns:
        ``(folder, state)`` or ``(None, None)``.
    """
    import pyarrow.fs

    from piaa_dist.checkpoint import CheckpointError

    for step, folder in stored_checkpoints(fs, root):
        if step <= after:
            break
        with tempfile.TemporaryDirectory() as tmp:
            try:
                pyarrow.fs.copy_files(folder, tmp, source_filesystem=fs,
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())
                return folder, _load_state_dir(tmp)
            except (CheckpointError, OSError) as err:
                log.warning("skipping incomplete checkpoint %s: %s", folder, err)
    return None, None


def _storage_root(storage: dict) -> tuple[Any, str]:
    """``(filesystem, run folder)`` of the run's storage (see :func:`resolve_storage`)."""
    import pyarrow.fs

    path, fs = storage["path"], storage["filesystem"]
    if fs is None:
        fs, path = pyarrow.fs.FileSystem.from_uri(path if "://" in path else Path(path).as_uri())
    return fs, f"{path.rstrip('/')}/{storage['name']}"


def _resume_state(rank: int, world: int, storage: dict) -> dict | None:
    """The state every rank resumes from: the newer of Ray's checkpoint and the stored ones.

    Ray Train hands back the last checkpoint its controller *registered*. A checkpoint that
    rank 0 had fully uploaded can still be unregistered when a worker dies right after it
    (the controller sees the failure before it collects the report), which would silently
    cost one more interval. Checkpoint folders have deterministic names, so rank 0 also looks
    in storage and takes the newest complete one, then tells the other ranks which to load,
    so that all ranks start from the same state.
    """
    import ray.train
    import torch.distributed as dist

    def load_ray() -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return _load_state_dir(directory)

    choice: list[Any] = [("none", None)]
    state = None
    if rank == 0:
        state = load_ray()
        fs, root = _storage_root(storage)
        folder, stored = newest_stored_state(fs, root, after=int(state["step"]) if state else -1)
        if stored is not None:
            state, choice = stored, [("stored", folder)]
        elif state is not None:
            choice = [("ray", None)]
        if state is not None:
            log.info("resuming from %s checkpoint at step %d", choice[0][0], state["step"])
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if rank != 0:
        kind, folder = choice[0]
        if kind == "ray":
            state = load_ray()
        elif kind == "stored":
            fs, _ = _storage_root(storage)
            import pyarrow.fs

            with tempfile.TemporaryDirectory() as tmp:
                pyarrow.fs.copy_files(folder, tmp, source_filesystem=fs,
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())
                state = _load_state_dir(tmp)
    return state


def _train_worker(config: dict) -> None:
    """``train_loop_per_worker``: one rank of meta-training (runs inside a Ray Train worker)."""
    import ray.train

    from piaa_dist.data.stream import Dataset
    from piaa_dist.train import meta_train

    cfg = config_from_dict(config["cfg"])
    torch.set_num_threads(max(1, cfg.run.threads_per_worker))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config["use_gpu"]:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    dataset = Dataset.open(config["data_url"], endpoint_url=config["s3_endpoint"] or None)

    resume = _resume_state(rank, world, config["storage"])

    def report(step: int, metrics: dict, trainer: Any, with_checkpoint: bool) -> None:
        if with_checkpoint and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                _save_state_dir(tmp, trainer, cfg)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"checkpoint_{step:06d}",
                )
        else:
            ray.train.report(metrics)

    hook = _StepHook(
        cfg, rank=rank, report=report, dataset=dataset,
        inject_failure=config.get("inject_failure"),
        resumed_from=int(resume["step"]) if resume else 0,
    )
    meta_train(
        cfg, dataset, rank=rank, world_size=world,
        reduce=_all_reduce_sum if world > 1 else None,
        resume=resume, on_step=hook, device=device,
    )


def _metrics_user_callback(fn: MetricsCallback):
    """Wrap ``fn`` in a Ray Train ``UserCallback`` (it runs in the controller, on the driver's node)."""
    from ray.train import UserCallback

    class _Metrics(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):  # noqa: D401 - Ray's API
            if metrics and metrics[0]:
                fn(int(metrics[0].get("step", 0)), dict(metrics[0]))

    return _Metrics()


def _use_gpu(cfg: JobConfig) -> bool:
    choice = cfg.run.use_gpu
    if choice == "yes":
        return True
    if choice == "no":
        return False
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


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
            ``os._exit(1)`` s at step N once (the marker file records that it happened).
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if workers < 1:
        raise ValueError("build_trainer needs workers >= 1 (use run_distributed for workers=0)")
    use_gpu = _use_gpu(cfg)
    path, fs = resolve_storage(storage_path, s3_endpoint)
    all_callbacks = list(callbacks)
    if metrics_callback is not None:
        # First, before TuneReportCallback: once Tune sees a report it may stop (kill) the
        # trial, and a metric logged after that would be lost from the trial's MLflow run.
        all_callbacks.insert(0, _metrics_user_callback(metrics_callback))
    loop_config = {
        "cfg": config_to_dict(cfg),
        "data_url": absolute_url(data_url),
        "s3_endpoint": s3_endpoint or os.environ.get("AWS_ENDPOINT_URL", ""),
        "use_gpu": use_gpu,
        "inject_failure": inject_failure,
        "storage": {"path": path, "filesystem": fs, "name": name},
    }
    resources = {"CPU": cfg.run.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        _train_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            callbacks=all_callbacks,
        ),
    )


def result_from_checkpoint(cfg: JobConfig, checkpoint: Any, metrics: dict, workers: int) -> TrainResult:
    """Load the meta-learner from a Ray ``Checkpoint`` (e.g. ``Result.checkpoint``)."""
    from piaa_dist.model import build_model

    with checkpoint.as_directory() as directory:
        state = _load_state_dir(directory)
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return TrainResult(model, state, dict(metrics or {}), checkpoint.path, workers)


# ---------------------------------------------------------------------------------------------


def _run_in_process(
    cfg: JobConfig,
    data_url: str,
    storage_path: str,
    name: str,
    s3_endpoint: str | None,
    metrics_callback: MetricsCallback | None,
    progress: bool,
) -> TrainResult:
    from piaa_dist.data.stream import Dataset
    from piaa_dist.train import meta_train

    dataset = Dataset.open(data_url, endpoint_url=s3_endpoint or None)
    store = _LocalCheckpoints(storage_path, name, s3_endpoint)
    resume = store.load_latest()
    if resume is not None:
        log.info("resuming from %s at step %d", store.latest(), resume["step"])
    last: dict = {"metrics": {}, "checkpoint": None}

    def report(step: int, metrics: dict, trainer: Any, with_checkpoint: bool) -> None:
        if with_checkpoint:
            last["checkpoint"] = store.save(step, trainer, cfg)
        last["metrics"] = metrics
        if metrics_callback is not None:
            metrics_callback(step, dict(metrics))

    bar = None
    if progress:
        from tqdm import tqdm

        start = int(resume["step"]) if resume else 0
        bar = tqdm(total=cfg.meta.meta_steps, initial=start, desc="meta-train", unit="step")
    # The run's thread budget, as a Train worker would have it; restored afterwards because
    # this is the caller's process (a test session, a notebook).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.run.threads_per_worker))
    try:
        hook = _StepHook(cfg, rank=0, report=report, dataset=dataset, inject_failure=None,
                         progress=bar, resumed_from=int(resume["step"]) if resume else 0)
        trainer = meta_train(cfg, dataset, resume=resume, on_step=hook)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    if last["checkpoint"] is None and store.latest() is not None:
        last["checkpoint"] = f"{store.url}/{store.latest()}"
    return TrainResult(
        trainer.model.cpu(), trainer.state_dict(), last["metrics"], last["checkpoint"], 0
    )


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to (or start) Ray quietly. Returns True when this call started it.

    ``address`` (or ``$RAY_ADDRESS``, set by ``ray job submit``) connects to a cluster;
    otherwise a local Ray starts without the dashboard.
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
            num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
            runtime_env={"worker_process_setup_hook": f"{__name__}.quiet_ray_logs"},
        )
    return True


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
            resumes from the latest checkpoint.
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
        ray.train.TrainingFailedError: workers kept failing beyond ``run.max_failures``.
    """
    workers = cfg.run.workers if workers is None else workers
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_callback = _Fanout(
        [JsonlMetrics(out_dir / "metrics.jsonl")] + ([metrics_callback] if metrics_callback else [])
    )
    storage = storage_path or cfg.run.storage_path or str(out_dir / "checkpoints")
    s3_endpoint = s3_endpoint or cfg.data.s3_endpoint or None
    data_url = absolute_url(data_url)
    if workers <= 0:
        return _run_in_process(cfg, data_url, storage, name, s3_endpoint, metrics_callback, progress)

    import ray

    started = ensure_ray(ray_address)
    path_fs = resolve_storage(storage, s3_endpoint)
    try:
        trainer = build_trainer(
            cfg, data_url, workers=workers, storage_path=storage, name=name,
            s3_endpoint=s3_endpoint, callbacks=callbacks, metrics_callback=metrics_callback,
            inject_failure=inject_failure,
        )
        result = trainer.fit()
        if result.checkpoint is not None:
            return result_from_checkpoint(cfg, result.checkpoint, result.metrics, workers)
        # Nothing left to do (the stored run had already finished): its newest checkpoint.
        fs, root = _storage_root({"path": path_fs[0], "filesystem": path_fs[1], "name": name})
        folder, state = newest_stored_state(fs, root)
        if state is None:
            raise RuntimeError(f"Ray Train run {name!r} finished without a checkpoint")
        from piaa_dist.model import build_model

        model = build_model(cfg.model)
        model.load_state_dict(state["model"])
        return TrainResult(model, state, dict(result.metrics or {}), folder, workers)
    finally:
        if started:
            ray.shutdown()


__all__ = [
    "DEFAULT_NAME",
    "TrainResult",
    "absolute_url",
    "build_trainer",
    "newest_stored_state",
    "JsonlMetrics",
    "ensure_ray",
    "quiet_ray_logs",
    "resolve_storage",
    "result_from_checkpoint",
    "run_distributed",
    "stored_checkpoints",
]
