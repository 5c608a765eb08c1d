"""The typed evaluation result: versioned JSON that reads back equal, schema-1 files from the
code before the type (``tests/data/evaluate-v1*.json``, written by ``evaluate`` at commit
ad83ebb), and clear errors for anything else."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from piaa_dist.errors import UserError
from piaa_dist.metrics import Ceilings
from piaa_dist.results import (
    SCHEMA_VERSION,
    EvaluationResult,
    PairedDiff,
    ResultFormatError,
    ShotStats,
)

DATA = Path(__file__).resolve().parent / "data"


def _stats(mean: float, users: dict[str, float]) -> ShotStats:
    return ShotStats(srocc_mean=mean, srocc_std=0.01, plcc_mean=mean + 0.02, plcc_std=0.02,
                     per_user=users, per_user_plcc={u: v + 0.02 for u, v in users.items()},
                     n_users=len(users), degenerate=0)


def sample_result() -> EvaluationResult:
    """A small hand-made result with every feature: two methods, a shot count one user lacks,
    a one-user paired difference (no interval), ceilings with a left-out user, sources."""
    return EvaluationResult(
        methods={
            "blg-piaa": {10: _stats(0.41, {"u1": 0.4, "u2": 0.42}), 100: _stats(0.55, {"u1": 0.55})},
            "giaa-finetune": {10: _stats(0.33, {"u1": 0.3, "u2": 0.36}), 100: _stats(0.47, {"u1": 0.47})},
        },
        reference="blg-piaa",
        paired={"giaa-finetune": {10: PairedDiff(0.08, (-0.1, 0.26), 2, 2),
                                  100: PairedDiff(0.08, None, 1, 1)}},
        ceilings=Ceilings(oracle=0.83, average_user=0.37, users=2, constant_users=1),
        users=("u1", "u2", "u3"),
        skipped={10: ("u3",), 100: ("u2", "u3")},
        shots=(10, 100),
        repeats=3,
        seed=0,
        config={"eval": {"shots": (10, 100)}, "meta": {"inner_lr": 0.1}},
        seconds=1.5,
        model="models:/blg-piaa@champion",
        data="s3://piaa/world",
        giaa=None,
    )


def test_round_trip_is_exact_and_strict_json(tmp_path):
    r = sample_result()
    text = r.to_json()
    assert EvaluationResult.from_json(text) == r
    raw = json.loads(text)
    assert raw["schema_version"] == SCHEMA_VERSION == 2
    assert "NaN" not in text  # strict JSON: an interval that cannot be formed is null
    assert raw["paired"]["blg-piaa vs giaa-finetune"]["100"]["ci95"] is None
    assert EvaluationResult.load(r.save(tmp_path / "sub" / "e.json")) == r
    # the config is held in its JSON form, so a tuple in it does not break equality
    assert r.config["eval"]["shots"] == [10, 100]
    # sources are recorded on a copy
    s = r.with_sources(model="m", data="d", giaa="g")
    assert (s.model, s.data, s.giaa) == ("m", "d", "g") and s != r
    assert r.paired_with("giaa-finetune", 10).significant is False
    assert r.stats("blg-piaa", 100).per_user == {"u1": 0.55} and r.stats("nope", 10) is None


def test_reads_schema_1_files_written_before_the_type():
    v1 = json.loads((DATA / "evaluate-v1.json").read_text())
    assert "schema_version" not in v1 and isinstance(v1["users"], int)
    r = EvaluationResult.load(DATA / "evaluate-v1.json")
    assert r.users == ("U03", "U04", "U05") and len(r.users) == v1["users"]
    assert r.skipped == {5: (), 10: ("U03", "U04", "U05")}
    assert r.reference == "blg-piaa"
    assert set(r.methods) == set(v1["methods"])
    for name, by_k in v1["methods"].items():
        for k, cell in by_k.items():
            got = r.stats(name, int(k))
            assert got.srocc_mean == cell["srocc_mean"] and got.per_user == cell["per_user"]
            assert got.plcc_std == cell["plcc_std"] and got.degenerate == cell["degenerate"]
    d = v1["paired"]["blg-piaa vs giaa-finetune"]["5"]
    got = r.paired_with("giaa-finetune", 5)
    assert (got.diff_mean, list(got.ci95), got.n_users) == (d["diff_mean"], d["ci95"], d["n_users"])
    # schema 1 averaged every user (none left out): read as such
    assert r.ceilings == Ceilings(v1["ceilings"]["oracle"], v1["ceilings"]["average_user"], 3, 0)
    assert (r.model, r.data, r.giaa) == ("out/run/model", "out/ds", "trained by evaluate")
    assert r.config == v1["config"] and r.seconds == v1["seconds"]
    # and it is written back as schema 2, which reads back equal
    assert json.loads(r.to_json())["schema_version"] == 2
    assert EvaluationResult.from_json(r.to_json()) == r


def test_schema_1_interval_of_one_user_reads_as_none():
    raw = (DATA / "evaluate-v1-one-user.json").read_text()
    assert "NaN" in raw
    r = EvaluationResult.from_json(raw)
    for by_k in r.paired.values():
        for d in by_k.values():
            assert d.n_users == 1 and d.ci95 is None and not d.significant
    assert r.users == ("U01",)
    assert "NaN" not in r.to_json()


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(schema_version=3), r"schema_version: 3 is not one this piaa-dist reads"),
    (lambda d: d.update(extra=1), r"top level: unknown key\(s\) \['extra'\]"),
    (lambda d: d.pop("shots"), r"top level: missing key\(s\) \['shots'\]"),
    (lambda d: d["methods"]["blg-piaa"]["10"].pop("per_user"),
     r"methods\.blg-piaa\.10: missing key\(s\) \['per_user'\]"),
    (lambda d: d["methods"]["blg-piaa"]["10"].update(srocc_mean="high"),
     r"methods\.blg-piaa\.10\.srocc_mean: expected a number, got 'high'"),
    (lambda d: d["methods"]["blg-piaa"].update(ten=d["methods"]["blg-piaa"]["10"]),
     r"methods\.blg-piaa: expected a shot count, got 'ten'"),
    (lambda d: d["paired"].update({"giaa-finetune": {}}),
     r"paired\.giaa-finetune: expected a key 'REFERENCE vs OTHER'"),
    (lambda d: d.update(reference="other"), r"not the result's reference 'other'"),
    (lambda d: d["ceilings"].update(users=None), r"ceilings\.users: expected an integer, got None"),
])
def test_bad_results_are_clear_errors_naming_file_and_key(tmp_path, mutate, message):
    raw = sample_result().to_dict()
    mutate(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ResultFormatError, match=message) as err:
        EvaluationResult.load(path)
    assert str(err.value).startswith(f"{path}: evaluation result ")
    assert isinstance(err.value, UserError)  # the CLI prints it as one line


def test_not_a_result_at_all(tmp_path):
    with pytest.raises(ResultFormatError, match=r"x\.json: cannot read"):
        EvaluationResult.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(ResultFormatError, match=r"y\.json: not JSON"):
        EvaluationResult.load(tmp_path / "y.json")
    with pytest.raises(ResultFormatError, match="top level: expected an object, got list"):
        EvaluationResult.from_json("[1, 2]")
    # a schema-1 file whose user count cannot be rebuilt is refused, not guessed
    v1 = json.loads((DATA / "evaluate-v1.json").read_text())
    v1["users"] = 7
    with pytest.raises(ResultFormatError, match="says 7 users but per_user and skipped name 3"):
        EvaluationResult.from_dict(v1, "old.json")


def test_no_ceilings_and_no_reference_round_trip():
    r = sample_result()
    from dataclasses import replace

    bare = replace(r, reference=None, paired={}, ceilings=None)
    assert EvaluationResult.from_json(bare.to_json()) == bare
    empty = replace(r, ceilings=Ceilings(None, None, 0, 3))
    back = EvaluationResult.from_json(empty.to_json())
    assert back == empty and back.ceilings.oracle is None
    assert not math.isnan(back.seconds)
