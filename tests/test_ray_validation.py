"""Validation spread over 2 real Ray Train workers gives the one-process score (slow: Ray)."""

from __future__ import annotations

import json

import pytest

from piaa_dist.config import load_config, with_overrides
from piaa_dist.orchestration.ray_train import run_distributed

TINY = "jobs/configs/tiny.yaml"

pytestmark = pytest.mark.slow


def test_two_workers_validate_like_one_process(ray_session, tiny_dataset_url, tmp_path):
    """2 workers (each scoring half of the validation users, combined by all-reduce) report the
    validation SROCC an in-process run reports for the same steps, with its phase timers."""
    cfg = with_overrides(load_config(TINY), {
        "meta.meta_steps": 4, "run.validate_every": 2, "run.checkpoint_every": 2,
        "data.validation_users": 4, "eval.repeats": 2,
    })
    one = run_distributed(cfg, tiny_dataset_url, tmp_path / "one", workers=0)
    two = run_distributed(cfg, tiny_dataset_url, tmp_path / "two", workers=2)
    assert one.step == two.step == 4

    def reports(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows}

    r1, r2 = reports(tmp_path / "one"), reports(tmp_path / "two")
    for step in (2, 4):
        assert r2[step]["val_srocc"] == pytest.approx(r1[step]["val_srocc"], rel=1e-9, abs=1e-12)
        assert r2[step]["val_total_s"] > 0
        for key in ("inner_s", "outer_s", "allreduce_s", "update_s", "data_s", "time"):
            assert key in r2[step], key
