"""piaa-dist from Python (a notebook, a script): the functions the ``piaa-dist`` commands run.

Example, end to end on a local folder (the README shows the same lines)::

    from piaa_dist import api

    api.synth(out="world")                                        # a synthetic world
    api.ingest(format="flickr-aes", root="world", out="dataset")  # shards + manifest
    run = api.train(data="dataset", out="run", config="jobs/configs/cpu.yaml", workers=0)
    result = api.evaluate(data="dataset", model="run", shots=[10, 100])
    print(api.format_table(result))

Every function takes keyword arguments with the command's flag names and returns a frozen
dataclass (:class:`TrainOutcome`, :class:`SweepOutcome`, :class:`Registration`,
:class:`Ranking`) or the typed :class:`EvaluationResult`; none of them prints. Their
documentation is in :mod:`piaa_dist.orchestration.usecases`, where they live.
"""

from __future__ import annotations

from piaa_dist.orchestration.usecases import (
    DatasetVersions,
    Ranking,
    Registration,
    SweepOutcome,
    TrainOutcome,
    dataset_versions,
    evaluate,
    ingest,
    personalize,
    register,
    resolve_model_ref,
    scale_world,
    synth,
    train,
    tune,
    verify,
)
from piaa_dist.presentation import format_table, markdown_table
from piaa_dist.results import EvaluationResult

__all__ = [
    "DatasetVersions",
    "EvaluationResult",
    "Ranking",
    "Registration",
    "SweepOutcome",
    "TrainOutcome",
    "dataset_versions",
    "evaluate",
    "format_table",
    "ingest",
    "markdown_table",
    "personalize",
    "register",
    "resolve_model_ref",
    "scale_world",
    "synth",
    "train",
    "tune",
    "verify",
]
