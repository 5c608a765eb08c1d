"""Ingestion and meta-testing on a real local Ray: the same bytes and the same numbers as in
one process, whatever the number of workers.

One Ray session (2 CPUs, no dashboard) serves the module: starting Ray, and each worker's
torch import, cost tens of seconds on a busy 2-core machine. The world is the shared tiny one
(10 users, ~290 ratings), cut into shards of 50 samples so that partitions have whole shards
to share out.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from piaa_dist.config import load_config, with_overrides
from piaa_dist.data.ingest import ingest
from piaa_dist.data.layout import POINTER, resolve
from piaa_dist.data.stream import Dataset
from piaa_dist.errors import DataError
from piaa_dist.evaluate import evaluate, evaluate_users, merge_outcomes
from piaa_dist.model import build_model
from piaa_dist.storage import open_store

TINY = "jobs/configs/tiny.yaml"
SHARD = 50  # samples per shard: ~6 shards in the tiny world


@pytest.fixture(scope="module")
def ray_session(s3_endpoint):
    # After the S3 fixture: Ray's workers inherit its credentials from this environment.
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


def _version_files(url: str, endpoint: str | None) -> dict[str, bytes]:
    """Every object of the published version but the report (which records timings and the
    version ID): relative path -> bytes."""
    _, vstore = resolve(open_store(url, endpoint))
    return {rel: vstore.read_bytes(rel) for rel in sorted(vstore.list("")) if rel != "ingest_report.json"}


def _most_at_once(tasks: list[dict]) -> int:
    """Most tasks running at the same moment, from each task's start time and wall seconds."""
    edges = sorted([(t["started"], 1) for t in tasks] + [(t["started"] + t["seconds"], -1) for t in tasks],
                   key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


@pytest.mark.parametrize("target", ["folder", "s3"])
def test_ingest_on_ray_is_byte_identical_to_in_process_whatever_the_workers(
        ray_session, tiny_world, tmp_path, target, request):
    from piaa_dist.orchestration.ray_ingest import ingest_distributed

    if target == "s3":
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")

        def url(name: str) -> str:
            return f"s3://{bucket}/{name}"
    else:
        endpoint = None

        def url(name: str) -> str:
            return str(tmp_path / name)

    # The reference: in process, without the encoded-image store (every image encoded per cache miss).
    ingest("flickr-aes", tiny_world, url("inproc"), endpoint_url=endpoint, shard_size=SHARD, workers=2,
           encode_store=False)
    expected = _version_files(url("inproc"), endpoint)
    assert sum(rel.startswith("shards/") for rel in expected) >= 4, "the world must span several shards"
    enc = tmp_path / "enc"
    for workers, store in ((1, True), (2, True), (2, False)):
        rep = ingest_distributed("flickr-aes", tiny_world, url(f"ray{workers}{store}"), workers=workers,
                                 endpoint_url=endpoint, shard_size=SHARD, encode_store=store,
                                 encode_store_dir=str(enc))
        got = _version_files(url(f"ray{workers}{store}"), endpoint)
        assert got.keys() == expected.keys()
        for rel in expected:
            assert got[rel] == expected[rel], f"{rel} differs with {workers} Ray worker(s)"
        ex = rep["execution"]
        assert ex["workers"] == workers and ex["partitions"] >= 2  # the work really was cut up
        # The session has 2 CPUs: 1 worker must still mean one task at a time.
        assert _most_at_once(ex["tasks"]) <= workers
        assert sum(t["samples"] for t in ex["tasks"]) == rep["samples"] == rep["ratings"]["ingested"]
        # And the result reads back as a dataset.
        assert Dataset.open(url(f"ray{workers}{store}"), endpoint).num_users() == 10
        # The store is shared by the tasks (each with its own in-memory cache): one worker running
        # the partitions one after the other encodes each distinct image once. It is removed after.
        assert rep["image_store"]["enabled"] is store
        if store and workers == 1:
            assert rep["image_decodes"] == rep["images"] and rep["image_store"]["hits"] > 0
        assert not enc.exists() or list(enc.iterdir()) == []


def test_cli_ingest_workers_are_ray_workers_and_zero_is_in_process(ray_session, tiny_world, tmp_path, capsys,
                                                                    caplog):
    """``piaa-dist ingest --workers N`` means N Ray workers, as for train and evaluate (it used
    to count threads); ``--workers 0`` ingests in this process; the bytes are the same."""
    from piaa_dist.cli import main as cli_main

    def run(name: str, *extra: str) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="piaa_dist"):
            assert cli_main(["ingest", "--format", "flickr-aes", "--root", str(tiny_world), "--out",
                             str(tmp_path / name), "--shard-size", str(SHARD), *extra]) == 0
        assert "published version" in capsys.readouterr().out
        return [r.getMessage() for r in caplog.records]

    on_ray = run("ray", "--workers", "2", "--threads", "1")
    assert any(re.search(r"in \d+ partitions on 2 Ray workers", m) for m in on_ray), on_ray
    local = run("local", "--workers", "0")
    assert not any("Ray worker" in m for m in local), local
    expected = _version_files(str(tmp_path / "local"), None)
    assert _version_files(str(tmp_path / "ray"), None) == expected


def test_bad_input_in_a_ray_task_is_the_workers_one_line_error_and_nothing_is_published(
        ray_session, tiny_world, tmp_path):
    from piaa_dist.orchestration.ray_ingest import ingest_distributed

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    victim = sorted((world / "images").iterdir())[7]
    victim.write_bytes(b"not a jpeg at all")  # found only when a worker decodes it
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        ingest_distributed("flickr-aes", world, str(out), workers=2, shard_size=SHARD, strict=True)
    msg = str(err.value)
    assert type(err.value) is DataError and "\n" not in msg and "Traceback" not in msg
    assert "FLICKR-AES_image_labeled_by_each_worker.csv:" in msg and victim.name in msg
    assert not (out / POINTER).exists()


@pytest.fixture(scope="module")
def eval_setup(tiny_dataset_url):
    cfg = with_overrides(load_config(TINY), {"eval.shots": [4, 10], "eval.repeats": 2})
    torch.manual_seed(0)
    meta = build_model(cfg.model)
    torch.manual_seed(1)
    giaa = build_model(cfg.model)
    models = {"blg-piaa": meta, "meta-no-adapt": meta, "giaa-finetune": giaa}
    dataset = Dataset.open(tiny_dataset_url)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each Ray worker runs (run.threads_per_worker)
    try:
        yield cfg, models, dataset, evaluate(cfg, dataset, models, users=dataset.users("all"))
    finally:
        torch.set_num_threads(threads)


def _numbers(result) -> dict:
    d = result.to_dict()
    d.pop("seconds")
    return d


def test_per_user_outcomes_merge_to_the_same_result_in_any_order(eval_setup):
    cfg, models, dataset, expected = eval_setup
    users = dataset.users("all")
    halves = [users[1::2], users[::2]]  # evaluated apart, in another order
    outcomes = [o for part in halves for o in evaluate_users(cfg, dataset, models, part, shots=[4, 10],
                                                             repeats=2, seed=cfg.run.seed)]
    merged = merge_outcomes(cfg, outcomes[::-1], methods=list(models), users=users, shots=[4, 10], repeats=2,
                            seed=cfg.run.seed)
    assert _numbers(merged) == _numbers(expected)
    assert merged.ceilings is not None and merged.ceilings == expected.ceilings


def test_evaluate_on_ray_gives_the_in_process_numbers(ray_session, eval_setup, capsys):
    from piaa_dist.orchestration.ray_evaluate import evaluate_distributed

    cfg, models, dataset, expected = eval_setup
    stats: list[dict] = []
    # One user per chunk: chunks finish out of order and the two workers share them.
    got = evaluate_distributed(cfg, dataset, models, workers=2, users=dataset.users("all"), chunk_users=1,
                               stats=stats, progress=True)
    assert _numbers(got) == _numbers(expected)
    # A progress bar over the test users, advanced as the workers' chunks come back.
    bar = capsys.readouterr().err
    assert "evaluate (2 Ray workers)" in bar and "10/10" in bar, bar
    assert len(stats) == 2 and sum(s["users"] for s in stats) == 10 and all(s["users"] for s in stats)
    assert len({s["pid"] for s in stats}) == 2 and os.getpid() not in {s["pid"] for s in stats}
    # workers = 0: in this process, no Ray worker.
    assert _numbers(evaluate_distributed(cfg, dataset, models, workers=0, users=dataset.users("all"))) \
        == _numbers(expected)


def test_more_workers_than_the_cluster_has_cpus_is_a_clear_error(ray_session, eval_setup, tiny_world,
                                                                 tmp_path):
    from piaa_dist.orchestration.ray_evaluate import evaluate_distributed
    from piaa_dist.orchestration.ray_ingest import ingest_distributed
    from piaa_dist.orchestration.ray_workers import NotEnoughCPUs

    cfg, models, dataset, _ = eval_setup
    with pytest.raises(NotEnoughCPUs, match="3 Ray worker.*need 3 CPUs.*has 2"):
        evaluate_distributed(cfg, dataset, models, workers=3, users=dataset.users("all"))
    with pytest.raises(NotEnoughCPUs, match="3 Ray worker"):
        ingest_distributed("flickr-aes", tiny_world, str(tmp_path / "x"), workers=3)
    assert not Path(tmp_path / "x" / POINTER).exists()


def test_cli_evaluate_workers_are_ray_workers_with_the_in_process_numbers(ray_session, eval_setup,
                                                                          tiny_dataset_url, tmp_path):
    """``piaa-dist evaluate --workers 2`` spreads the test users over Ray workers and gives the
    numbers of ``--workers 0`` (the fine-tuning choice travels to the workers in the config)."""
    import json

    from piaa_dist.checkpoint import save_model
    from piaa_dist.cli import main as cli_main

    cfg, models, _, _ = eval_setup
    folder = save_model(tmp_path / "model", models["blg-piaa"], cfg, {"kind": "test"})
    common = ["evaluate", "--model", str(folder), "--data", tiny_dataset_url, "--no-mlflow", "--no-progress",
              "--shots", "4", "--repeats", "2", "eval.methods=[blg-piaa,meta-no-adapt]"]
    numbers = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.json"
        assert cli_main(common[:1] + ["--workers", str(workers), "--json", str(out)] + common[1:]) == 0
        d = json.loads(out.read_text())
        d.pop("seconds")
        numbers[workers] = d
    assert numbers[2] == numbers[0]
    assert numbers[0]["methods"]["blg-piaa"]


def test_fine_tuning_search_on_ray_workers_chooses_as_in_process_and_the_group_then_evaluates(
        ray_session, eval_setup):
    """The per-method search's (validation user × method × k) items shared out over 1 and 2 Ray
    workers give the in-process choice and every score behind it; the same worker group then
    evaluates the test users with the chosen settings, with the in-process numbers."""
    from piaa_dist.evaluate import search_finetuning, search_items, search_plan, search_user, with_choice
    from piaa_dist.orchestration.ray_evaluate import evaluation_workers

    base, models0, dataset, _ = eval_setup
    cfg = with_overrides(base, {"eval.protocol": "per-method", "eval.search_repeats": 2,
                                "eval.search_params": ["head", "all"], "eval.search_ridge": [0.1, 10.0]})
    models = {"blg-piaa": models0["blg-piaa"], "giaa-finetune": models0["giaa-finetune"],
              "giaa-ridge": models0["giaa-finetune"]}
    users = dataset.users("train")[:3]
    shots, seed = [4, 10], 5
    expected = search_finetuning(cfg, dataset, models, users, shots=shots, seed=seed)
    assert expected.source == "search" and set(expected.chosen) == set(models)
    # The in-process choice is the plain per-user search averaged over users (the rule).
    per_user = [search_user(cfg, dataset.load_user(u), models, search_plan(cfg, models, shots), repeats=2,
                            seed=seed) for u in users]
    for m, by_k in expected.grid.items():
        for k, cands in by_k.items():
            for text, score in cands.items():
                assert score == float(np.mean([float(np.mean(p[m][k][text])) for p in per_user if k in p[m]]))
    n_items = len(search_items(search_plan(cfg, models, shots), users))
    test_users = dataset.users("test")
    chosen_cfg = with_choice(cfg, expected)
    assert chosen_cfg.eval.finetune  # the evaluation below really uses searched settings
    in_process = evaluate(chosen_cfg, dataset, models, users=test_users)
    for workers in (1, 2):
        stats: list[dict] = []
        with evaluation_workers(cfg, dataset, models, workers=workers) as group:
            got = group.search_finetuning(users, shots=shots, seed=seed)
            result = group.evaluate(with_choice(cfg, got), users=test_users, stats=stats)
        assert got.to_dict() == expected.to_dict(), workers
        assert _numbers(result) == _numbers(in_process), workers
        # one group did both: every worker that searched also evaluated, none started twice
        assert len(stats) == workers and sum(s["search_items"] for s in stats) == n_items
        assert sum(s["users"] for s in stats) == len(test_users)
        if workers == 2:
            assert all(s["search_items"] for s in stats), stats
