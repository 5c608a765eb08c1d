"""Meta-training on a real local Ray Train (V2) cluster, and the in-process path beside it.

One Ray session serves the whole module (starting Ray costs ~10 s): 2 CPUs, no dashboard.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from piaa_dist.config import load_config, with_overrides
from piaa_dist.orchestration.ray_train import run_distributed

TINY = "jobs/configs/tiny.yaml"


@pytest.fixture(scope="module")
def cfg():
    # 4 steps, a checkpoint every 2, a report every step; dropout stays on (the per-task RNG
    # seeds must make it rank-independent).
    return with_overrides(load_config(TINY), {"meta.meta_steps": 4, "run.checkpoint_every": 2})


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_close_states(a: dict, b: dict, **tol) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_close_states(a[k], b[k], **tol)
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            _assert_close_states(x, y, **tol)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, **tol)
    else:
        assert a == b


@pytest.fixture(scope="module")
def runs(ray_session, cfg, tiny_dataset_url, tmp_path_factory):
    """The same 4 meta-steps on Ray Train with 1 worker, and with 2 workers of which rank 1
    dies (``os._exit(1)``) at step 3, after the step-2 checkpoint. One restart costs less
    than a third run, so the fast suite checks both properties on these two runs.
    """
    d1 = tmp_path_factory.mktemp("ray1")
    one = run_distributed(cfg, tiny_dataset_url, d1, workers=1)
    d2 = tmp_path_factory.mktemp("ray2")
    marker = d2 / "killed"
    two = run_distributed(
        cfg, tiny_dataset_url, d2 / "out", workers=2,
        inject_failure={"step": 3, "rank": 1, "marker": str(marker)},
    )
    return {"one": (one, d1), "two": (two, d2 / "out"), "marker": marker}


def _by_step(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in rows}  # the last report of a step wins


def test_one_and_two_workers_agree(runs, cfg):
    (one, d1), (two, d2) = runs["one"], runs["two"]
    assert one.step == two.step == cfg.meta.meta_steps
    assert one.workers == 1 and two.workers == 2
    h1, h2 = _by_step(_steps(d1)), _by_step(_steps(d2))
    assert sorted(h1) == [1, 2, 3, 4]
    # Rank 1's death can swallow the step-2 report (see the next test); every other step
    # is reported.
    assert {1, 3, 4} <= set(h2) <= {1, 2, 3, 4}
    for step, r2 in h2.items():
        r1 = h1[step]
        # The all-reduced meta-gradient (its norm) and the global losses, step by step.
        assert r1["tasks"] == r2["tasks"] == cfg.meta.meta_batch
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-6)
        assert r2["query_loss"] == pytest.approx(r1["query_loss"], rel=1e-6)
    # Parameters, BatchNorm statistics and Adam's moments (running averages of every step's
    # meta-gradient) after 4 steps.
    _assert_close_states(one.state, two.state, rtol=1e-5, atol=1e-7)
    assert two.checkpoint and two.checkpoint.endswith("checkpoint_000004")


def test_a_killed_worker_resumes_from_its_checkpoint(runs, cfg):
    """Rank 1 died at step 3; the group restarted from the step-2 checkpoint and finished."""
    two, out = runs["two"]
    assert runs["marker"].read_text().startswith("rank 1 exited at step 3")
    assert two.step == cfg.meta.meta_steps
    rows = _steps(out)
    first = [r["step"] for r in rows if r["resumed_from"] == 0]
    after = [r["step"] for r in rows if r["resumed_from"] != 0]
    # Before the failure: step 1 and, unless its report died with the worker group, step 2.
    assert first in ([1], [1, 2])
    # After: the new worker group started at the step-2 checkpoint (one interval lost at
    # most, nothing redone from scratch) and ran steps 3 and 4.
    assert {r["resumed_from"] for r in rows if r["resumed_from"] != 0} == {2}
    assert after == [3, 4]


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(runs, cfg, tiny_dataset_url, tmp_path):
    """Resuming reproduces the uninterrupted 2-worker run bit for bit: the task stream is a
    function of (seed, step), and the checkpoint holds the optimizer and the step."""
    uninterrupted = run_distributed(cfg, tiny_dataset_url, tmp_path, workers=2)
    killed, _ = runs["two"]
    _assert_close_states(killed.state, uninterrupted.state, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# In-process (workers=0): no Ray, same loop, same checkpoints.


def test_in_process_stop_and_rerun_resumes(cfg, tiny_dataset_url, tmp_path):
    out = tmp_path / "run"
    first = run_distributed(with_overrides(cfg, {"meta.meta_steps": 2}), tiny_dataset_url, out, workers=0)
    assert first.step == 2 and first.checkpoint.endswith("checkpoint_000002")
    # The same command again with more steps continues from the stored checkpoint.
    resumed = run_distributed(cfg, tiny_dataset_url, out, workers=0)
    assert resumed.step == 4
    assert [r["step"] for r in _steps(out)] == [1, 2, 3, 4]
    fresh = run_distributed(cfg, tiny_dataset_url, tmp_path / "fresh", workers=0)
    _assert_close_states(resumed.state, fresh.state, rtol=0, atol=0)
    # Two checkpoints are kept, the newest is what a restart would use.
    kept = sorted(p.name for p in (out / "checkpoints" / "meta-train" / "local").iterdir())
    assert kept == ["LATEST", "checkpoint_000002", "checkpoint_000004"]


def test_in_process_checkpoints_on_s3(cfg, tiny_dataset_url, s3_endpoint, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="piaa-ckpt")
    result = run_distributed(
        cfg, tiny_dataset_url, tmp_path, workers=0,
        storage_path="s3://piaa-ckpt/runs", s3_endpoint=s3_endpoint,
    )
    assert result.checkpoint == "s3://piaa-ckpt/runs/meta-train/local/checkpoint_000004"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="piaa-ckpt")["Contents"]}
    assert "runs/meta-train/local/LATEST" in keys
    assert any(k.startswith("runs/meta-train/local/checkpoint_000004/") for k in keys)
    again = run_distributed(
        cfg, tiny_dataset_url, tmp_path / "again", workers=0,
        storage_path="s3://piaa-ckpt/runs", s3_endpoint=s3_endpoint,
    )
    # Already finished: the rerun loads the last checkpoint and does no more steps.
    assert again.step == 4
    _assert_close_states(again.state, result.state, rtol=0, atol=0)


def _tear(folder: Path) -> None:
    """Corrupt a checkpoint's tensors in place: it still parses, but no longer matches its hash."""
    path = folder / "training_state.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_in_process_resume_skips_a_torn_newest_checkpoint(cfg, tiny_dataset_url, tmp_path, caplog):
    """A torn newest checkpoint does not stop an in-process restart: it resumes from the intact
    older one, names the real folder it skipped, and ends exactly where an uninterrupted run does."""
    out = tmp_path / "run"
    first = run_distributed(cfg, tiny_dataset_url, out, workers=0)
    torn = out / "checkpoints" / "meta-train" / "local" / "checkpoint_000004"
    _tear(torn)
    with caplog.at_level(logging.WARNING):
        again = run_distributed(cfg, tiny_dataset_url, out, workers=0)
    assert again.step == 4
    _assert_close_states(again.state, first.state, rtol=0, atol=0)
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert skipped and str(torn) in skipped[0], skipped
    rows = _steps(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4]
    assert {(r["resumed_from"], r["skipped_checkpoints"]) for r in rows[4:]} == {(2, 1)}
    # the redone step-4 checkpoint replaced the torn one
    kept = sorted(p.name for p in torn.parent.iterdir())
    assert kept == ["LATEST", "checkpoint_000002", "checkpoint_000004"]


def test_in_process_resume_skips_a_torn_checkpoint_on_s3(cfg, tiny_dataset_url, s3_endpoint, s3_bucket,
                                                          tmp_path, caplog):
    """The same on S3, where loading goes through a temporary copy: the warning names the
    s3:// folder, not the copy."""
    import boto3

    storage = f"s3://{s3_bucket}/runs"
    short = with_overrides(cfg, {"meta.meta_steps": 2, "run.checkpoint_every": 1})
    run_distributed(short, tiny_dataset_url, tmp_path / "a", workers=0,
                    storage_path=storage, s3_endpoint=s3_endpoint)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    key = "runs/meta-train/local/checkpoint_000002/training_state.safetensors"
    data = bytearray(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))
    with caplog.at_level(logging.WARNING):
        again = run_distributed(short, tiny_dataset_url, tmp_path / "b", workers=0,
                                storage_path=storage, s3_endpoint=s3_endpoint)
    assert again.step == 2
    assert [(r["step"], r["resumed_from"]) for r in _steps(tmp_path / "b")] == [(2, 1)]
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert skipped and f"{storage}/meta-train/local/checkpoint_000002" in skipped[0], skipped
    assert "piaa-checkpoint-" not in skipped[0] and "/tmp/" not in skipped[0]


def test_in_process_empty_latest_does_not_restart_from_scratch(cfg, tiny_dataset_url, tmp_path):
    """An empty LATEST pointer (what a crash mid-write of the old truncate-then-write left) does
    not send the next run back to step 0: it resumes from the newest checkpoint that loads."""
    out = tmp_path / "run"
    run_distributed(with_overrides(cfg, {"meta.meta_steps": 2}), tiny_dataset_url, out, workers=0)
    latest = out / "checkpoints" / "meta-train" / "local" / "LATEST"
    latest.write_text("")
    resumed = run_distributed(cfg, tiny_dataset_url, out, workers=0)
    assert resumed.step == 4
    assert [r["step"] for r in _steps(out)] == [1, 2, 3, 4]
    assert latest.read_text() == "checkpoint_000004"


def test_ray_resume_skips_a_torn_registered_checkpoint(runs, cfg, tiny_dataset_url, tmp_path):
    """Ray's own registered (newest) checkpoint turns out torn when the run is started again: the
    new attempt resumes from the intact older one instead of failing, and ends bit-identical to
    the uninterrupted run."""
    import shutil

    one, d1 = runs["one"]
    out = tmp_path / "out"
    # The 1-worker run's storage, Ray's checkpoint manager snapshot included.
    shutil.copytree(d1 / "checkpoints", out / "checkpoints")
    _tear(out / "checkpoints" / "meta-train" / "checkpoint_000004")
    again = run_distributed(cfg, tiny_dataset_url, out, workers=1)
    assert again.step == 4
    rows = _steps(out)
    assert [r["step"] for r in rows] == [3, 4]
    assert {(r["resumed_from"], r["skipped_checkpoints"]) for r in rows} == {(2, 1)}
    _assert_close_states(again.state, one.state, rtol=0, atol=0)


@pytest.mark.slow
def test_ray_checkpoints_on_s3(ray_session, cfg, tiny_dataset_url, s3_endpoint, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="piaa-ray-ckpt")
    result = run_distributed(
        cfg, tiny_dataset_url, tmp_path, workers=1,
        storage_path="s3://piaa-ray-ckpt/runs", s3_endpoint=s3_endpoint,
    )
    assert result.step == 4
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="piaa-ray-ckpt")["Contents"]}
    assert any(k.startswith("runs/meta-train/checkpoint_000004/") for k in keys), sorted(keys)
