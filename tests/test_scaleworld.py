"""Scale worlds (issue 12 item 6): deterministic, long-tailed, truth aligned with the ratings,
ceilings computable from the sidecar, the same generative model as the small world, and
generated in memory bounded by a block of users, not by the number of users."""

from __future__ import annotations

import csv
import itertools
import json
import re
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from piaa_dist.data import scaleworld, synth
from piaa_dist.data.scaleworld import (
    ScaleSpec,
    image_pool,
    iter_blocks,
    population,
    ratings_block,
    user_block,
    write_scale_world,
)

SMALL = ScaleSpec(users=1000, images=1500, seed=3, block_users=256)


@pytest.fixture(scope="module")
def log_world(tmp_path_factory) -> Path:
    """1,000 users as a CSV ratings log, images rendered at 16 px."""
    out = tmp_path_factory.mktemp("scale-log")
    write_scale_world(out, ScaleSpec(**{**SMALL.__dict__, "image_size": 16}), workers=2)
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _world(out: Path) -> dict:
    return json.loads((out / scaleworld.WORLD_FILE).read_text())


def test_worlds_are_deterministic_under_the_seed(tmp_path):
    spec = ScaleSpec(users=300, images=120, seed=5, block_users=64, image_size=16)
    write_scale_world(tmp_path / "a", spec, workers=1)
    write_scale_world(tmp_path / "b", spec, workers=3)  # thread count must not matter
    write_scale_world(tmp_path / "c", ScaleSpec(**{**spec.__dict__, "seed": 6}), images=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 120 + 4
    for rel in files:
        a, b = (tmp_path / "a" / rel).read_bytes(), (tmp_path / "b" / rel).read_bytes()
        if rel.name == scaleworld.WORLD_FILE:  # holds timings
            a, b = (json.loads(x) for x in (a, b))
            a.pop("seconds"), b.pop("seconds")
        assert a == b, rel
    for name in ("ratings.csv", "latent_scores.csv"):
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_a_block_is_a_pure_function_of_the_spec_and_its_index():
    """What makes the generator streamable (and parallelisable): block b regenerated alone is
    the block the full pass produced."""
    pool = image_pool(SMALL)
    pop = population(SMALL, pool)
    blocks = list(iter_blocks(SMALL, pool, pop))
    assert len(blocks) == SMALL.blocks == 4
    again = ratings_block(SMALL, pool, pop, 2)
    for name in ("owner", "image", "score", "latent", "average_latent"):
        assert np.array_equal(getattr(blocks[2], name), getattr(again, name)), name
    assert list(blocks[2].users.ids) == list(user_block(SMALL, 2).ids)
    # Users are unique across blocks; each user rates distinct images.
    ids = [u for blk in blocks for u in blk.users.ids]
    assert len(ids) == len(set(ids)) == SMALL.users
    for blk in blocks:
        pairs = blk.owner.astype(np.int64) * SMALL.images + blk.image
        assert len(np.unique(pairs)) == len(pairs)


def test_ratings_per_user_have_a_long_tail(log_world):
    per_user = Counter(r["user"] for r in _read_csv(log_world / "ratings.csv"))
    n = np.array(sorted(per_user.values()))
    assert len(n) == SMALL.users
    assert n.min() >= SMALL.ratings_min and n.max() <= SMALL.max_ratings == 500
    assert (n <= 10).mean() >= 0.5  # many users with few ratings...
    assert (n >= 100).sum() >= 10 and (n >= 200).sum() >= 2  # ...and a few with hundreds
    assert n.mean() > 1.5 * np.median(n)  # skewed: the tail pulls the mean up
    dist = _world(log_world)["ratings_per_user"]
    assert dist["min"] == n.min() and dist["max"] == n.max() and dist["median"] == int(np.median(n))
    assert sum(dist["histogram"].values()) == SMALL.users


def test_ratings_log_layout_and_aligned_sidecar(log_world):
    with open(log_world / "ratings.csv", newline="") as f:
        assert f.readline() == "user,image,score,split\n"
    rows = _read_csv(log_world / "ratings.csv")
    truth = _read_csv(log_world / synth.SIDECAR_FILE)
    assert list(truth[0]) == ["user", "image", "latent", "average_latent"]
    # Row-aligned: row i of the sidecar is the truth of row i of the log.
    assert [(r["user"], r["image"]) for r in rows] == [(t["user"], t["image"]) for t in truth]
    pairs = [(r["user"], r["image"]) for r in rows]
    assert len(pairs) == len(set(pairs))
    world = _world(log_world)
    lo, hi = world["score_range"]
    assert (lo, hi) == (1, 10)
    scores = Counter(int(r["score"]) for r in rows)
    assert set(scores) <= set(range(lo, hi + 1)) and len(scores) >= 8  # the scale is used
    # A user's split is one value; about the requested share of users is test.
    split: dict[str, set] = {}
    for r in rows:
        split.setdefault(r["user"], set()).add(r["split"])
    assert all(len(v) == 1 for v in split.values())
    n_test = sum(v == {"test"} for v in split.values())
    assert n_test == world["counts"]["test_users"] and 0.08 <= n_test / SMALL.users <= 0.12
    # average_latent depends on the image only; rows interleave users (a log is not grouped).
    avg: dict[str, set] = {}
    for t in truth:
        avg.setdefault(t["image"], set()).add(t["average_latent"])
    assert all(len(v) == 1 for v in avg.values())
    changes = sum(a["user"] != b["user"] for a, b in itertools.pairwise(rows))
    assert changes > len(rows) / 2
    # Images: a folder tree under images/, every rated image exists and is small.
    images = {r["image"] for r in rows}
    assert all(re.fullmatch(r"[0-9a-f]{2}/[0-9a-f]{10}\.jpg", i) for i in images)
    files = {p.relative_to(log_world / "images").as_posix() for p in (log_world / "images").rglob("*.jpg")}
    assert images <= files and len(files) == SMALL.images
    with Image.open(log_world / "images" / min(images)) as im:
        assert im.size == (16, 16) and im.format == "JPEG"


def test_ceilings_can_be_computed_from_the_sidecar(log_world):
    rows = _read_csv(log_world / "ratings.csv")
    truth = _read_csv(log_world / synth.SIDECAR_FILE)
    users = np.array([r["user"] for r in rows])
    is_test = np.array([r["split"] == "test" for r in rows])
    observed = np.array([float(r["score"]) for r in rows])
    latent = np.array([float(t["latent"]) for t in truth])
    average = np.array([float(t["average_latent"]) for t in truth])
    written = _world(log_world)["ceilings"]
    for split, m in (("all", np.ones_like(is_test)), ("train", ~is_test), ("test", is_test)):
        c = synth.ceilings(latent[m], average[m], observed[m], users[m])
        assert c["users"] == written[split]["users"]
        assert c["constant_users"] == written[split]["constant_users"]
        assert c["oracle"] == pytest.approx(written[split]["oracle"], abs=1e-9)
        assert c["average_user"] == pytest.approx(written[split]["average_user"], abs=1e-9)
    # The world's design holds at scale: personal taste matters (as in the small world).
    assert written["all"]["oracle"] > 0.75 and written["all"]["oracle"] - written["all"]["average_user"] > 0.35


def test_flickr_aes_layout_at_scale(tmp_path):
    spec = ScaleSpec(users=400, images=600, seed=1, layout="flickr-aes", block_users=128)
    summary = write_scale_world(tmp_path, spec, images=False)
    with open(tmp_path / synth.RATINGS_FILE, newline="") as f:
        rows = list(csv.reader(f))
    # make_world's exact layout: the published header and a space after every comma.
    assert rows[0] == ["worker", " imagePair", " score"]
    body = rows[1:]
    assert all(r[1].startswith(" ") and r[2].startswith(" ") for r in body)
    assert all(re.fullmatch(r"A[A-Z0-9]{13}", r[0]) for r in body)
    assert all(re.fullmatch(r"farm[1-9]_\d{4}_\d{10}_[0-9a-f]{10}_b\.jpg", r[1].strip()) for r in body)
    assert {int(r[2]) for r in body} <= {1, 2, 3, 4, 5}
    with open(tmp_path / synth.TEST_WORKERS_FILE, newline="") as f:
        lines = f.read().splitlines()
    assert lines[0] == "ID" and len(lines) - 1 == summary.test_users
    assert set(lines[1:]) <= {r[0] for r in body}
    # The small world's own readers compute the same ceilings from these files.
    expected = synth.world_ceilings(tmp_path)
    for split in ("all", "train", "test"):
        for key in ("oracle", "average_user"):
            assert expected[split][key] == pytest.approx(summary.ceilings[split][key], abs=1e-9)
        assert expected[split]["users"] == summary.ceilings[split]["users"]


def test_parquet_log_with_its_own_scale_and_no_split(tmp_path):
    spec = ScaleSpec(users=500, images=400, seed=2, format="parquet", score_range=(0, 100),
                     test_fraction=0.0, block_users=100)
    write_scale_world(tmp_path, spec, images=False)
    table = pq.read_table(tmp_path / "ratings.parquet")
    assert table.column_names == ["user", "image", "score"]  # no test users: no split column
    truth = _read_csv(tmp_path / synth.SIDECAR_FILE)
    assert table.column("user").to_pylist() == [t["user"] for t in truth]
    assert table.column("image").to_pylist() == [t["image"] for t in truth]
    scores = np.array(table.column("score").to_pylist())
    assert scores.min() >= 0 and scores.max() <= 100 and len(np.unique(scores)) > 50
    latent = np.array([float(t["latent"]) for t in truth])
    assert -0.5 <= np.percentile(latent, 1) and np.percentile(latent, 99) <= 100.5  # the log's scale
    world = _world(tmp_path)
    assert world["score_range"] == [0, 100] and world["counts"]["test_users"] == 0
    assert world["ceilings"]["test"]["users"] == 0 and world["ceilings"]["test"]["oracle"] is None


def test_population_is_synths_definition_computed_by_streaming():
    """z_sd and the average user from per-user sums equal sample_world's brute-force
    definitions over the full users x images matrix."""
    spec = ScaleSpec(users=300, images=250, seed=4, block_users=64, test_fraction=0.2)
    pool = image_pool(spec)
    pop = population(spec, pool)
    blocks = [user_block(spec, b) for b in range(spec.blocks)]
    weights = np.concatenate([u.weights for u in blocks])
    bias = np.concatenate([u.bias for u in blocks])
    scale = np.concatenate([u.scale for u in blocks])
    is_test = np.concatenate([u.is_test for u in blocks])
    z = pool.shared[None, :] + weights @ pool.attrs.T  # [U, M], as in synth.sample_world
    assert pop.z_sd == pytest.approx(float(z.std()), rel=1e-10)
    latent = 3.0 + bias[:, None] + scale[:, None] * z / z.std()
    assert np.allclose(pop.average_latent, latent[~is_test].mean(axis=0), atol=1e-10)
    assert pop.test_users == int(is_test.sum())
    assert abs(pop.test_users - 0.2 * spec.users) <= spec.blocks / 2  # the share, rounded per block
    # Archetypes are balanced within every block and split, as sample_world deals them.
    for u in blocks:
        for split in (False, True):
            counts = np.bincount(u.archetype[u.is_test == split], minlength=4)
            assert counts.max() - counts.min() <= 1


def _peak_bytes(users: int, tmp: Path) -> int:
    spec = ScaleSpec(users=users, images=300, seed=0, block_users=128, ratings_max=300)
    tracemalloc.start()
    try:
        write_scale_world(tmp, spec, images=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_a_block_not_by_the_number_of_users(tmp_path):
    """Peak traced memory (numpy arrays and Python objects) stays flat when the users grow 8x:
    rows are streamed block by block and nothing per user is kept."""
    _peak_bytes(200, tmp_path / "warm-up")  # one-time allocations (imports, caches) out of the way
    small = _peak_bytes(500, tmp_path / "small")
    large = _peak_bytes(4000, tmp_path / "large")
    ratings = (tmp_path / "large" / "ratings.csv").read_text().count("\n") - 1
    assert ratings > 50_000
    assert large < 1.5 * small, (small, large)
    assert large < 60 * ratings  # far less than the rows would take if they were all held


@pytest.mark.parametrize("kwargs, match", [
    ({"users": 1}, "users must be in"),
    ({"images": 10, "ratings_max": 20}, "exceeds the image pool"),
    ({"ratings_min": 20, "images": 10}, "1 <= min <= max"),
    ({"layout": "flickr-aes", "score_range": (1, 10)}, "rates 1-5"),
    ({"layout": "flickr-aes", "format": "parquet"}, "CSV only"),
    ({"score_range": (5, 5)}, "lo < hi"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"layout": "tsv"}, "layout"),
])
def test_bad_specs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScaleSpec(**kwargs)


def test_cli_writes_a_scale_world_and_rejects_bad_options(tmp_path, capsys):
    from piaa_dist.cli import main

    assert main(["synth", "--out", str(tmp_path / "w"), "--scale", "--users", "300", "--images", "200",
                 "--score-range", "1", "7", "--format", "parquet", "--no-images"]) == 0
    out = capsys.readouterr().out
    assert "300 users" in out and "ratings per user" in out and "oracle" in out
    assert (tmp_path / "w" / "ratings.parquet").is_file() and not (tmp_path / "w" / "images").exists()
    assert _world(tmp_path / "w")["score_range"] == [1, 7]
    assert main(["synth", "--out", str(tmp_path / "x"), "--scale", "--users", "1"]) == 2
    assert main(["synth", "--out", str(tmp_path / "x"), "--format", "parquet"]) == 2  # needs --scale
    assert not (tmp_path / "x").exists()


def test_a_flickr_aes_scale_world_ingests_with_its_truth(tmp_path):
    """Today's FLICKR-AES reader takes a scale world as it is, sidecar included."""
    from piaa_dist.cli import main
    from piaa_dist.data.ingest import REPORT

    world = tmp_path / "world"
    summary = write_scale_world(world, ScaleSpec(users=60, images=80, seed=7, layout="flickr-aes",
                                                 image_size=16, block_users=32), workers=2)
    assert main(["ingest", "--format", "flickr-aes", "--root", str(world), "--out", str(tmp_path / "ds"),
                 "--max-side", "16"]) == 0
    # the report of the version the ingest published (layout: URL/_CURRENT -> versions/<id>/)
    from piaa_dist.data.layout import resolve
    from piaa_dist.storage import open_store

    _, version = resolve(open_store(str(tmp_path / "ds")))
    report = json.loads(version.read_bytes(REPORT))
    assert report["source"] == "synth" and report["has_truth"]
    assert report["ratings"]["read"] == report["ratings"]["ingested"] == summary.ratings
