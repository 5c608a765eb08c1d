"""run.keep_checkpoints: how many checkpoint folders a run keeps (0: all, for a learning curve
scored afterwards, as benchmarks/time_to_quality.py does); the best validation checkpoint is
kept apart whatever the number."""

from __future__ import annotations

from pathlib import Path

import pytest

from piaa_dist.config import load_config
from piaa_dist.orchestration.checkpoint_store import (
    BEST,
    BEST_DIR,
    IN_PROCESS_DIR,
    RunStorage,
)
from piaa_dist.orchestration.in_process import run_in_process

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _folders(root: Path) -> list[int]:
    local = root / "meta-train" / IN_PROCESS_DIR
    return sorted(int(p.name.split("_")[1]) for p in local.glob("checkpoint_*"))


@pytest.mark.parametrize("keep, expected", [(0, [2, 4, 6, 8]), (2, [6, 8]), (3, [4, 6, 8])])
def test_a_run_keeps_the_newest_n_checkpoints_or_all(tiny_dataset_url, tmp_path, keep, expected):
    cfg = load_config(TINY, ["meta.meta_steps=8", "run.checkpoint_every=2", f"run.keep_checkpoints={keep}",
                             "run.validate_every=2", "data.validation_users=2"])
    result = run_in_process(cfg, tiny_dataset_url, RunStorage.from_url(str(tmp_path)))
    assert _folders(tmp_path) == expected
    # the best validation checkpoint lives apart and is always there
    local = tmp_path / "meta-train" / IN_PROCESS_DIR
    assert (local / BEST).read_text() == f"{BEST_DIR}/checkpoint_{result.best.step:06d}"
    assert (local / BEST_DIR / f"checkpoint_{result.best.step:06d}").is_dir()
