"""A Train worker killed in the middle of the all-reduce: the run recovers from its checkpoint.

``tests/test_ray_train.py`` kills rank 1 at a step boundary. Here rank 1 dies *inside* the
all-reduce of step 3: rank 0 has entered the collective and waits in it for a peer that never
comes (``inject_failure={"when": "mid-reduce"}``). The worker group must fail instead of
hanging, restart from the step-2 checkpoint, redo steps 3-4 and end where an uninterrupted
2-worker run ends, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from piaa_dist.config import load_config, with_overrides
from piaa_dist.orchestration.ray_train import run_distributed

TINY = "jobs/configs/tiny.yaml"


@pytest.fixture(scope="module")
def cfg():
    return with_overrides(load_config(TINY), {"meta.meta_steps": 4, "run.checkpoint_every": 2})


@pytest.fixture(scope="module")
def killed_mid_reduce(ray_session, cfg, tiny_dataset_url, tmp_path_factory):
    out = tmp_path_factory.mktemp("mid-reduce")
    marker = out / "killed"
    result = run_distributed(
        cfg, tiny_dataset_url, out / "run", workers=2,
        inject_failure={"step": 3, "rank": 1, "marker": str(marker), "when": "mid-reduce"},
    )
    return result, out / "run", marker


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_equal_states(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal_states(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            _assert_equal_states(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_a_worker_killed_inside_the_all_reduce_resumes_from_its_checkpoint(killed_mid_reduce, cfg):
    result, out, marker = killed_mid_reduce
    # The fault happened where it was meant to: rank 0 inside the collective, rank 1 killed.
    assert marker.read_text().startswith("rank 1 killed inside the all-reduce of step 3")
    assert marker.with_name(marker.name + ".rank0-in-reduce").read_text().startswith(
        "rank 0 entered the all-reduce of step 3")
    assert result.step == cfg.meta.meta_steps
    rows = _steps(out)
    before = [r["step"] for r in rows if r["resumed_from"] == 0]
    after = [r["step"] for r in rows if r["resumed_from"] != 0]
    assert before in ([1], [1, 2])  # step 2's report may die with the group
    assert {r["resumed_from"] for r in rows if r["resumed_from"] != 0} == {2}
    assert after == [3, 4]
    assert result.checkpoint and result.checkpoint.endswith("checkpoint_000004")


@pytest.mark.slow
def test_the_recovered_run_equals_an_uninterrupted_one_bit_for_bit(killed_mid_reduce, cfg, tiny_dataset_url,
                                                                   tmp_path):
    uninterrupted = run_distributed(cfg, tiny_dataset_url, tmp_path, workers=2)
    killed, _, _ = killed_mid_reduce
    _assert_equal_states(killed.state, uninterrupted.state)
