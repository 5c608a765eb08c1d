"""What a user sees during ``piaa-dist train --workers 2``: our progress, not Ray's chatter.

One real run on a local Ray (2 Train workers, the tiny world, validation every 2 steps) in a
subprocess, as a user runs it; its terminal output (a pipe, not a terminal) is checked.
``-v`` (slow test) brings Ray's own lines back.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
#: Ray Train's per-report line (every rank, every report, with the whole metrics dict).
REPORT_LINE = "Reporting training result"
#: Ray Train's start-up INFO lines (controller) and per-checkpoint line (rank 0).
STARTUP_LINES = ("Requesting resources", "Started training worker group", "Checkpoint successfully created")


def _train(tmp: Path, data: str, *flags: str) -> str:
    cmd = [sys.executable, "-m", "piaa_dist.cli", *flags, "train", "--data", data, "--config", str(TINY),
           "--out", str(tmp / "run"), "--workers", "2", "--no-mlflow", "run.validate_every=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def default_output(tmp_path_factory, tiny_dataset_url) -> str:
    return _train(tmp_path_factory.mktemp("quiet"), tiny_dataset_url)


def test_default_run_shows_our_progress_and_not_rays_per_report_lines(default_output):
    # not Ray Train's per-report dump of the metrics dict (every rank, every report)
    assert REPORT_LINE not in default_output, default_output[-4000:]
    # nor the PreemptionWatcher error a one-machine Ray logs at every worker-group start
    assert "PreemptionWatcher" not in default_output
    # but rank 0's progress line for every step, and the command's result
    for step in range(1, 5):
        assert f"step {step}/4 query_loss" in default_output, default_output[-4000:]
    assert re.search(r"meta-learner \(step [24] of 4\) written to", default_output), default_output[-4000:]


def test_validation_srocc_is_on_rank_0s_progress_lines_and_in_the_summary(default_output):
    for step in (2, 4):
        assert f"step {step}/4 val_srocc " in default_output, default_output[-4000:]
    # the command's summary line names the written checkpoint's step and its validation SROCC
    summary = r"meta-learner of step [24] \(best validation SROCC -?[0-9.]+; trained 4 steps\) written to"
    assert re.search(summary, default_output), default_output[-4000:]


def test_no_colour_codes_when_the_output_is_not_a_terminal(default_output):
    # Ray colours the "(RayTrainWorker pid=...)" prefix of forwarded lines unless told not to
    assert "(RayTrainWorker pid=" in default_output
    assert "\x1b[" not in default_output, repr(default_output[-2000:])


def test_default_run_hides_ray_trains_startup_and_checkpoint_info_lines(default_output):
    assert not [line for line in STARTUP_LINES if line in default_output], default_output[-4000:]


@pytest.mark.slow
def test_verbose_brings_rays_own_lines_back(tmp_path, tiny_dataset_url):
    output = _train(tmp_path, tiny_dataset_url, "-v")
    assert REPORT_LINE in output and "step 4/4 query_loss" in output


def test_the_worker_setup_hook_keeps_a_hook_already_there_and_quiets_the_report_logger(monkeypatch):
    """In-process check of the two halves Ray runs in every worker (no Ray started)."""
    import importlib

    from piaa_dist.orchestration import ray_logging

    chained = "piaa_dist.orchestration.ray_train.quiet_ray_logs"
    env = ray_logging.add_setup_hook({"worker_process_setup_hook": chained, "env_vars": {"A": "1"}})
    assert env["worker_process_setup_hook"] == "piaa_dist.orchestration.ray_logging.setup_worker"
    assert env["env_vars"]["A"] == "1"
    for key, value in env["env_vars"].items():
        monkeypatch.setenv(key, value)
    cleaner = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    report = logging.getLogger(importlib.import_module("ray.train.v2._internal.execution.context").__file__)
    monkeypatch.setattr(cleaner, "level", logging.NOTSET)
    monkeypatch.setattr(report, "level", logging.NOTSET)
    ray_logging.setup_worker()
    assert cleaner.level == logging.ERROR  # the chained hook ran
    assert not report.isEnabledFor(logging.INFO) and report.isEnabledFor(logging.WARNING)
