"""Meta-testing on Ray: test users spread over Ray workers, the numbers of one process.

:func:`evaluate_distributed` cuts the users into chunks and runs
:func:`piaa_dist.evaluate.evaluate_users` on each chunk in a Ray worker, then merges the
per-user outcomes on the driver with :func:`piaa_dist.evaluate.merge_outcomes`: the very
function :func:`piaa_dist.evaluate.evaluate` uses. Everything random in the protocol is a
function of ``(seed, user, k, repeat)``, so the result is identical to the in-process run
with the same seeds whatever the number of workers or the chunking (with the same torch
thread count per process: CPU kernels may sum in another order on more threads).

Workers are Ray *actors* (one per worker; each chunk is an actor task): a worker opens the
dataset (the manifest: seconds and ~170 MB at a million users) and receives the models once,
not once per chunk, so the time per test user stays flat as users grow. Each opens the exact
version the driver opened (its version folder's URL), never a newer one published meanwhile.
A worker that dies fails the run (re-running it gives the same numbers: nothing is written
until the result). ``workers=0`` runs :func:`~piaa_dist.evaluate.evaluate`
in this process, without Ray.

The per-method fine-tuning search on validation users runs on the same workers
(:func:`evaluation_workers` opens one worker group; :meth:`RayEvaluators.search_finetuning`
then :meth:`RayEvaluators.evaluate` use it, so Ray and the workers start once): its units
(validation user × method × k, :func:`piaa_dist.evaluate.search_items`) are shared out as
actor tasks and the choice is made on the driver by
:func:`piaa_dist.evaluate.choose_finetuning`, the function the in-process search uses.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from piaa_dist.config import JobConfig, config_from_dict, config_to_dict
from piaa_dist.evaluate import (
    SearchItem,
    UserOutcome,
    evaluate,
    evaluate_users,
    merge_outcomes,
    protocol_of,
    search_cells,
    search_finetuning,
)
from piaa_dist.orchestration.ray_workers import ray_workers, user_error_of
from piaa_dist.results import EvaluationResult, FinetuneChoice

log = logging.getLogger(__name__)

#: Largest chunk of users per actor task by default: small enough for a smooth progress bar
#: and balance at the end of the run, large enough that a task's overhead does not show.
MAX_CHUNK_USERS = 32


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``), in MB (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class EvaluationWorker:
    """One Ray worker of meta-testing (run as an actor): the dataset and the models, once.

    Args:
        cfg: the job config as a dict (``config_to_dict``).
        version_url: the dataset version folder to open (pinned: the driver's version).
        endpoint_url: S3 endpoint, if any.
        models: method name → prior (CPU modules).
        threads: torch intra-op threads in this worker.
    """

    def __init__(self, cfg: dict, version_url: str, endpoint_url: str | None, models: Mapping[str, nn.Module],
                 threads: int):
        import torch

        from piaa_dist.data.stream import Dataset
        from piaa_dist.model import select_device

        torch.set_num_threads(max(1, int(threads)))
        self.cfg = config_from_dict(cfg)
        before, t0 = _rss_mb(), time.perf_counter()
        self.dataset = Dataset.open(version_url, endpoint_url)
        self.open_s = time.perf_counter() - t0
        self.open_rss_mb = _rss_mb() - before
        device = select_device(self.cfg.run.use_gpu)
        # One copy per distinct module: methods that share a prior keep sharing it.
        moved: dict[int, nn.Module] = {}
        self.models = {n: moved.setdefault(id(m), m.to(device)) for n, m in models.items()}
        self.users_done = 0
        self.items_done = 0

    def run(self, index: int, users: list[str], shots: list[int], repeats: int, seed: int,
            cfg: dict | None = None) -> tuple[int, list[UserOutcome]]:
        """Outcomes of a chunk of users (``index`` comes back, to put chunks in order); ``cfg``
        (a dict) replaces the worker's config first (the settings the search chose)."""
        if cfg is not None:
            self.cfg = config_from_dict(cfg)
        out = evaluate_users(self.cfg, self.dataset, self.models, users, shots=shots, repeats=repeats, seed=seed)
        self.users_done += len(users)
        return index, out

    def search(self, index: int, items: list[SearchItem], repeats: int, seed: int
               ) -> tuple[int, list[dict[str, list[float]]]]:
        """The fine-tuning search's cells of a chunk of items
        (:func:`piaa_dist.evaluate.search_cells`; ``index`` comes back)."""
        out = search_cells(self.cfg, self.dataset, self.models, items, repeats=repeats, seed=seed)
        self.items_done += len(items)
        return index, out

    def ready(self) -> bool:
        """Answers once the worker is built (its dataset open, its models loaded)."""
        return True

    def stats(self) -> dict[str, Any]:
        """This worker's dataset open time and the RSS it added, its peak RSS (imports
        included: torch alone is several hundred MB) and the users it evaluated."""
        return {"pid": os.getpid(), "open_s": self.open_s, "open_rss_mb": self.open_rss_mb,
                "peak_rss_mb": _rss_mb("VmHWM"), "users": self.users_done, "search_items": self.items_done}


def _cpu_models(models: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The models as CPU modules for shipping (a copy only when some are elsewhere)."""
    import torch

    on_cpu = all(p.device == torch.device("cpu") for m in models.values() for p in m.parameters())
    if on_cpu:
        return dict(models)
    # deepcopy of the dict keeps shared modules shared.
    return {n: m.to("cpu") for n, m in copy.deepcopy(dict(models)).items()}


def chunks_of(users: Sequence[str], workers: int, chunk_users: int | None = None) -> list[list[str]]:
    """Contiguous chunks of ``users``: ``chunk_users`` each, or about 8 per worker (at most
    :data:`MAX_CHUNK_USERS`)."""
    if chunk_users is None:
        chunk_users = min(MAX_CHUNK_USERS, max(1, math.ceil(len(users) / (8 * max(1, workers)))))
    chunk_users = max(1, int(chunk_users))
    return [list(users[i : i + chunk_users]) for i in range(0, len(users), chunk_users)]


class RayEvaluators:
    """One group of :class:`EvaluationWorker` actors, started once, for the fine-tuning search
    and then the evaluation (made by :func:`evaluation_workers`).

    Attributes:
        workers: the number of actors.
        ready_s: per actor, seconds from the start until it was built.
    """

    def __init__(self, actors: list[Any], cfg: JobConfig, dataset: Any, models: Mapping[str, nn.Module],
                 ready_s: list[float], t0: float):
        self._actors = actors
        self.cfg = cfg
        self.dataset = dataset
        self.methods = list(models)
        self._models = models
        self.ready_s = ready_s
        self.workers = len(actors)
        self._t0 = t0

    def _map(self, method: str, jobs: list[tuple], advance: Callable[[Any], object] | None = None) -> dict[int, Any]:
        """Run ``actor.<method>(index, *job)`` for every job on the pool; index → result."""
        from ray.util import ActorPool

        done: dict[int, Any] = {}
        try:
            pool = ActorPool(self._actors)
            for i, job in enumerate(jobs):
                pool.submit(lambda a, v: getattr(a, method).remote(*v), (i, *job))
            while pool.has_next():
                i, out = pool.get_next_unordered()
                done[i] = out
                if advance is not None:
                    advance(out)
        except Exception as err:
            cause = user_error_of(err)
            if cause is err:
                raise
            raise cause from None  # a worker's bad-input error reaches the user as one line
        return done

    def search_finetuning(self, users: Sequence[str], *, shots: Sequence[int] | None = None,
                          seed: int | None = None, progress: bool = False,
                          chunk_items: int = 1) -> FinetuneChoice:
        """:func:`piaa_dist.evaluate.search_finetuning` of the group's config and models on
        `users` (validation users), its items shared out over the workers: the same choice and
        scores as in one process. ``chunk_items`` items per actor task (one by default: the
        items' costs differ a hundredfold, from a ridge fit to fine-tuning every parameter)."""
        t0 = time.perf_counter()

        def run_items(items: list[SearchItem], repeats: int, seed_: int,
                      advance: Callable[[int], object] | None) -> list[dict[str, list[float]]]:
            size = max(1, int(chunk_items))
            chunks = [items[i : i + size] for i in range(0, len(items), size)]
            done = self._map("search", [(c, repeats, seed_) for c in chunks],
                             (lambda out: advance(len(out))) if advance is not None else None)
            return [cell for i in range(len(chunks)) for cell in done[i]]

        choice = search_finetuning(self.cfg, self.dataset, self._models, users, shots=shots, seed=seed,
                                   progress=progress, run_items=run_items)
        log.info("fine-tuning search on %d validation users on %d Ray workers in %.1fs", len(users),
                 self.workers, time.perf_counter() - t0)
        return choice

    def evaluate(self, cfg: JobConfig | None = None, *, shots: Sequence[int] | None = None,
                 repeats: int | None = None, seed: int | None = None, users: Sequence[str] | None = None,
                 progress: bool = False, chunk_users: int | None = None,
                 stats: list[dict[str, Any]] | None = None) -> EvaluationResult:
        """:func:`piaa_dist.evaluate.evaluate` on the workers (see :func:`evaluate_distributed`);
        ``cfg`` replaces the group's config (e.g. with the searched settings,
        :func:`piaa_dist.evaluate.with_choice`)."""
        import ray

        cfg = cfg if cfg is not None else self.cfg
        shots, repeats, seed = protocol_of(cfg, shots, repeats, seed)
        users = list(users if users is not None else self.dataset.users("test"))
        if not users:
            raise ValueError("evaluate: no users to evaluate")
        t_users = time.perf_counter()
        chunks = chunks_of(users, self.workers, chunk_users)
        cfg_dict = config_to_dict(cfg)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(users), desc=f"evaluate ({self.workers} Ray workers)", unit="user")
        try:
            done = self._map("run", [(chunk, shots, repeats, seed, cfg_dict) for chunk in chunks],
                             (lambda out: bar.update(len(out))) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        users_s = time.perf_counter() - t_users
        if stats is not None:
            for i, st in enumerate(ray.get([a.stats.remote() for a in self._actors])):
                stats.append({**st, "ready_s": self.ready_s[i], "users_s": users_s})
        outcomes = [o for i in range(len(chunks)) for o in done[i]]
        log.info("evaluated %d users on %d Ray workers in %.1fs", len(users), self.workers,
                 time.perf_counter() - t_users)
        return merge_outcomes(cfg, outcomes, methods=self.methods, users=users, shots=shots, repeats=repeats,
                              seed=seed, seconds=time.perf_counter() - t_users)


@contextlib.contextmanager
def evaluation_workers(cfg: JobConfig, dataset, models: Mapping[str, nn.Module], *, workers: int,
                       ray_address: str | None = None) -> Iterator[RayEvaluators]:
    """Start ``workers`` :class:`EvaluationWorker` actors (each with the dataset and the models
    once) and yield them as a :class:`RayEvaluators`; the actors (and a Ray this started) stop
    on exit.

    Raises:
        NotEnoughCPUs: the cluster cannot run that many workers.
        DataError / StorageError: a worker could not open the dataset (its own message).
    """
    import ray

    from piaa_dist.orchestration.ray_train import use_gpu

    if workers <= 0:
        raise ValueError(f"evaluation_workers: workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    cpus = float(cfg.run.cpus_per_worker)
    gpus = 1.0 if use_gpu(cfg) else 0.0
    with ray_workers(workers, cpus=cpus, gpus=gpus, ray_address=ray_address):
        actor_cls = ray.remote(EvaluationWorker).options(num_cpus=cpus, num_gpus=gpus)
        models_ref = ray.put(_cpu_models(models))
        endpoint = getattr(dataset.store, "endpoint_url", None)
        cfg_dict = config_to_dict(cfg)
        actors = [actor_cls.remote(cfg_dict, dataset.store.url, endpoint, models_ref,
                                   int(cfg.run.threads_per_worker)) for _ in range(workers)]
        try:
            # Start-up (a worker's imports, the dataset, the models) is timed apart from the work.
            ready_s = [0.0] * workers
            waiting = {a.ready.remote(): i for i, a in enumerate(actors)}
            try:
                while waiting:
                    ready, _ = ray.wait(list(waiting), num_returns=1)
                    ray.get(ready[0])  # raises the worker's error (e.g. the dataset cannot be read)
                    ready_s[waiting.pop(ready[0])] = time.perf_counter() - t0
            except Exception as err:
                cause = user_error_of(err)
                if cause is err:
                    raise
                raise cause from None
            log.info("%d Ray evaluation workers ready in %.1fs", workers, max(ready_s))
            yield RayEvaluators(actors, cfg, dataset, models, ready_s, t0)
        finally:
            for a in actors:
                ray.kill(a)


def evaluate_distributed(
    cfg: JobConfig,
    dataset,
    models: Mapping[str, nn.Module],
    *,
    workers: int,
    ray_address: str | None = None,
    shots: Sequence[int] | None = None,
    repeats: int | None = None,
    seed: int | None = None,
    users: Sequence[str] | None = None,
    progress: bool = False,
    chunk_users: int | None = None,
    stats: list[dict[str, Any]] | None = None,
) -> EvaluationResult:
    """The meta-testing protocol with test users spread over ``workers`` Ray workers.

    Args:
        cfg: job config (as :func:`piaa_dist.evaluate.evaluate`; each worker reserves
            ``run.cpus_per_worker`` CPUs, a GPU when ``run.use_gpu`` says so, and runs
            ``run.threads_per_worker`` torch threads).
        dataset: the opened :class:`~piaa_dist.data.stream.Dataset` (workers open the same
            version by URL).
        models: method name → prior (see :func:`piaa_dist.evaluate.standard_models`).
        workers: Ray workers; 0 evaluates in this process without Ray.
        ray_address: Ray cluster to connect to (default ``$RAY_ADDRESS``, else a local Ray).
        shots, repeats, seed, users: the protocol (defaults as :func:`~piaa_dist.evaluate.evaluate`).
        progress: a tqdm bar over users.
        chunk_users: users per actor task (default: see :func:`chunks_of`).
        stats: if given, one dict per worker is appended: ``open_s``, ``open_rss_mb``,
            ``peak_rss_mb``, ``users`` (evaluated by it), ``ready_s`` (from the start until
            the worker was built: imports, dataset, models) and ``users_s`` (from all workers
            ready until the last user's outcome).

    Returns:
        The typed result, equal (but for ``seconds``) to :func:`~piaa_dist.evaluate.evaluate`'s.

    Raises:
        ValueError: no models, or no user has enough ratings for any k.
        NotEnoughCPUs: the cluster cannot run that many workers.
        DataError / StorageError: a worker could not read a user (the worker's own message).
    """
    if not models:
        raise ValueError("evaluate: no models to evaluate")
    if workers <= 0:
        return evaluate(cfg, dataset, models, shots=shots, repeats=repeats, seed=seed, users=users,
                        progress=progress)
    users = list(users if users is not None else dataset.users("test"))
    if not users:
        raise ValueError("evaluate: no users to evaluate")
    t0 = time.perf_counter()
    with evaluation_workers(cfg, dataset, models, workers=min(int(workers), len(users)),
                            ray_address=ray_address) as group:
        result = group.evaluate(shots=shots, repeats=repeats, seed=seed, users=users, progress=progress,
                                chunk_users=chunk_users, stats=stats)
    return dataclasses.replace(result, seconds=round(time.perf_counter() - t0, 2))


__all__ = ["MAX_CHUNK_USERS", "EvaluationWorker", "RayEvaluators", "chunks_of", "evaluate_distributed",
           "evaluation_workers"]
