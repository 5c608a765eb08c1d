"""The issue-3 experiment, end to end through the CLI: synth → ingest → train → evaluate.

* The fast test runs the mechanics on the tiny world: the same seed gives the same splits and
  the same numbers, the JSON has the promised shape, the ceilings are there and agree with the
  synthetic world's own computation, a saved GIAA baseline is picked up and gives the numbers
  a freshly trained one gives.
* The slow test is the result itself on the default synthetic world (``piaa-dist synth``
  defaults) with the CPU job config: ``blg-piaa`` beats ``giaa-finetune`` at 10 shots with the
  paired 95% CI above zero, and its 100-shot SROCC exceeds its 10-shot SROCC.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from piaa_dist.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "jobs" / "configs" / "tiny.yaml")
CPU = str(REPO / "jobs" / "configs" / "cpu.yaml")


def _train(data: str, config: str, out: Path, *overrides: str) -> Path:
    rc = main(["train", "--data", data, "--config", config, "--out", str(out), "--workers", "0",
               "--no-mlflow", *overrides])
    assert rc == 0
    return out / "model"


def _evaluate(data: str, model: Path, out_json: Path, *extra: str) -> dict:
    rc = main(["evaluate", "--data", data, "--model", str(model), "--json", str(out_json),
               "--no-mlflow", "--no-progress", *extra])
    assert rc == 0
    return json.loads(out_json.read_text())


def _numbers(result: dict) -> dict:
    """The parts of a result that must be reproducible (not timing, not provenance)."""
    return {k: result[k] for k in ("methods", "paired", "ceilings", "skipped", "shots", "repeats")}


def test_cli_mechanics_on_the_tiny_world(tiny_world, tiny_dataset_url, tmp_path, capsys):
    model = _train(tiny_dataset_url, TINY, tmp_path / "run")
    args = ["--shots", "4", "8", "--repeats", "2", "giaa.steps=20", "giaa.batch_size=16"]
    first = _evaluate(tiny_dataset_url, model, tmp_path / "a.json", *args,
                      "--giaa-out", str(tmp_path / "giaa"))
    table = capsys.readouterr().out
    second = _evaluate(tiny_dataset_url, model, tmp_path / "b.json", *args)
    # Same seed, same everything: identical splits, fine-tuning streams and numbers.
    assert _numbers(first) == _numbers(second)
    # The saved baseline (weights only, safetensors) reproduces the freshly trained one exactly.
    third = _evaluate(tiny_dataset_url, model, tmp_path / "c.json", *args,
                      "--giaa", str(tmp_path / "giaa"))
    assert third["giaa"] == str(tmp_path / "giaa")
    assert _numbers(third) == _numbers(first)
    # Another seed: other splits, other numbers.
    other = _evaluate(tiny_dataset_url, model, tmp_path / "d.json", *args, "--seed", "7")
    assert other["methods"]["blg-piaa"]["4"]["per_user"] != first["methods"]["blg-piaa"]["4"]["per_user"]

    # Shape of the JSON.
    assert set(first["methods"]) == {"blg-piaa", "meta-no-adapt", "giaa-finetune", "giaa-no-adapt", "giaa-ridge"}
    test_users = sorted(json.loads((tiny_world / "world.json").read_text())["users"],
                        key=lambda u: u["worker"])
    test_ids = {u["worker"] for u in test_users if u["split"] == "test"}
    for by_k in first["methods"].values():
        assert set(by_k) == {"4", "8"}
        for cell in by_k.values():
            assert {"srocc_mean", "srocc_std", "plcc_mean", "per_user"} <= set(cell)
            assert set(cell["per_user"]) == test_ids
    for k in ("4", "8"):
        d = first["paired"]["blg-piaa vs giaa-finetune"][k]
        assert d["n_users"] == len(test_ids) and len(d["ci95"]) == 2

    # Ceilings: present, and equal to the synthetic world's own (independent) computation.
    world_ceilings = json.loads((tiny_world / "world.json").read_text())["ceilings"]["test"]
    assert first["ceilings"]["oracle"] == pytest.approx(world_ceilings["oracle"], abs=1e-6)
    assert first["ceilings"]["average_user"] == pytest.approx(world_ceilings["average_user"], abs=1e-6)

    # The table names every method, both shot counts and the ceilings.
    for text in ("blg-piaa", "meta-no-adapt", "giaa-finetune", "4-shot", "8-shot", "oracle", "paired"):
        assert text in table


@pytest.mark.slow
def test_blg_piaa_beats_giaa_finetune_on_the_default_synthetic_world(tmp_path):
    """The issue-3 result, exactly as claimed: default ``piaa-dist synth`` world, the CPU job
    config (in one process instead of 2 Ray workers: the same math), 10 repeats."""
    world, data = tmp_path / "world", str(tmp_path / "ds")
    assert main(["synth", "--out", str(world)]) == 0
    assert main(["ingest", "--format", "flickr-aes", "--root", str(world), "--out", data]) == 0
    model = _train(data, CPU, tmp_path / "run")
    result = _evaluate(data, model, tmp_path / "eval.json", "--shots", "10", "100", "--repeats", "10")

    blg = result["methods"]["blg-piaa"]
    paired = result["paired"]["blg-piaa vs giaa-finetune"]["10"]
    assert paired["n_users"] == 16
    # blg-piaa beats the fine-tuned generic prior at 10 shots: the whole paired 95% CI is above 0
    assert paired["ci95"][0] > 0, paired
    # and learns more from 100 ratings than from 10
    assert blg["100"]["srocc_mean"] > blg["10"]["srocc_mean"]
    # sanity: nothing beats the oracle, and the ceilings are the world's
    ceilings = json.loads((world / "world.json").read_text())["ceilings"]["test"]
    assert result["ceilings"]["oracle"] == pytest.approx(ceilings["oracle"], abs=1e-6)
    for by_k in result["methods"].values():
        for cell in by_k.values():
            assert cell["srocc_mean"] < result["ceilings"]["oracle"]
