"""What the Ray layers of ingestion and meta-testing share: one meaning of ``workers``.

``workers`` means the same thing for ``ingest``, ``train`` and ``evaluate``: the number of Ray
workers (each reserves ``cpus`` CPUs), and ``0`` runs the work in this process without Ray.
:func:`ray_workers` connects to the cluster at ``ray_address`` (or ``$RAY_ADDRESS``) or starts
a local Ray sized to fit the workers, checks that the cluster can ever run them (a request
for more CPUs than the cluster has would otherwise wait forever), and shuts down a Ray it
started itself. :func:`user_error_of` turns a remote failure back into the one-line
:class:`~piaa_dist.errors.UserError` the worker raised, so the CLI prints it as it would
in-process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator

from piaa_dist.errors import UserError

log = logging.getLogger(__name__)


class NotEnoughCPUs(UserError):
    """The Ray cluster has fewer CPUs than the workers asked for reserve."""


@contextlib.contextmanager
def ray_workers(workers: int, *, cpus: float = 1.0, gpus: float = 0.0,
                ray_address: str | None = None) -> Iterator[None]:
    """A Ray session that can run ``workers`` workers of ``cpus`` CPUs (and ``gpus`` GPUs) each.

    Uses an initialised Ray as is (left running afterwards); else connects to
    ``ray_address`` / ``$RAY_ADDRESS``, else starts a new local Ray (never one that a
    ``ray start`` left running) with at least enough CPUs for the workers (the machine's CPU
    count, or more if the workers ask for more: they then share cores) and shuts it down on
    exit.

    Raises:
        NotEnoughCPUs: the cluster can never run the workers at once (names both numbers).
    """
    import ray

    from piaa_dist.orchestration.ray_train import ensure_ray

    need = workers * cpus
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        started = False
    elif address:
        started = ensure_ray(address)
    else:
        # address="local": a new Ray of our own. Without it ray.init() joins whatever Ray a
        # `ray start` left running on this machine (someone else's, on a shared host). No
        # worker set-up hook: ray_train's imports torch into every worker (~600 MB), which
        # ingest tasks never need.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(need)), include_dashboard=False,
                 logging_level=logging.WARNING)
        started = True
    try:
        have = ray.cluster_resources().get("CPU", 0.0)
        if need > have:
            raise NotEnoughCPUs(f"{workers} Ray worker(s) of {cpus:g} CPU each need {need:g} CPUs, but the "
                                f"Ray cluster has {have:g}; use fewer workers (--workers) or a larger cluster")
        if gpus and workers * gpus > ray.cluster_resources().get("GPU", 0.0):
            raise NotEnoughCPUs(f"{workers} Ray worker(s) of {gpus:g} GPU each need {workers * gpus:g} GPUs, "
                                f"but the Ray cluster has {ray.cluster_resources().get('GPU', 0.0):g}")
        yield
    finally:
        if started:
            ray.shutdown()


def user_error_of(err: BaseException) -> BaseException:
    """The :class:`UserError` a Ray task raised, else ``err`` itself.

    ``ray.get`` wraps a task's exception in a ``RayTaskError`` whose text is the remote
    traceback; bad input must still reach the user as the worker's one-line message.
    """
    cause = getattr(err, "cause", None)
    while cause is not None and not isinstance(cause, UserError):
        cause = getattr(cause, "cause", None)
    return cause if isinstance(cause, UserError) else err


__all__ = ["NotEnoughCPUs", "ray_workers", "user_error_of"]
