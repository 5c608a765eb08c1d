"""Personalization from a person's ratings: input checks, counted skips, a ranked output."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from piaa_dist.errors import DataError
from piaa_dist.personalize import MIN_RATINGS, list_images, personalize, read_ratings, write_ranking

REPO = Path(__file__).resolve().parents[1]


def _user_rows(world: Path, which: int = 1) -> tuple[str, list[tuple[str, str]]]:
    from piaa_dist.data.synth import RATINGS_FILE

    user = (world / "test_workers.csv").read_text().split()[which]
    rows = [(r[1].strip(), r[2].strip()) for r in csv.reader((world / RATINGS_FILE).open())
            if r and r[0].strip() == user]
    return user, rows


def _write(path: Path, header: str, rows: list[tuple[str, str]]) -> Path:
    path.write_text(header + "\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return path


def test_reads_flickr_style_header_and_counts_every_skipped_row(tiny_world, tmp_path):
    _, rows = _user_rows(tiny_world)
    bad = [("no_such_image.jpg", "3"), (rows[0][0], "7"), (rows[1][0], "x"), rows[2]]
    csv_path = _write(tmp_path / "r.csv", " imagePair, score", rows[:12] + bad)
    got = read_ratings(csv_path, tiny_world / "images")
    assert len(got.images) == 12
    assert got.skipped == {"missing image": 1, "bad score": 2, "duplicate image": 1}
    # read == used + skipped, nothing lost silently
    assert len(rows[:12] + bad) == len(got.images) + sum(got.skipped.values())


def test_too_few_ratings_is_a_clear_error_naming_the_file(tiny_world, tmp_path):
    _, rows = _user_rows(tiny_world)
    csv_path = _write(tmp_path / "few.csv", "image,score", rows[: MIN_RATINGS - 1])
    with pytest.raises(DataError, match=r"few\.csv: 9 usable ratings.*at least 10"):
        read_ratings(csv_path, tiny_world / "images")
    wrong = _write(tmp_path / "cols.csv", "photo,stars", rows[:12])
    with pytest.raises(DataError, match=r"cols\.csv: header"):
        read_ratings(wrong, tiny_world / "images")
    with pytest.raises(DataError, match="no such image file or folder"):
        list_images([tmp_path / "missing-folder"])


def test_personalize_ranks_and_adapts(tiny_world, tmp_path):
    from piaa_dist.config import load_config
    from piaa_dist.model import build_model

    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["eval.finetune_steps=5"])
    import torch

    torch.manual_seed(0)
    model = build_model(cfg.model)
    _, rows = _user_rows(tiny_world)
    ratings = read_ratings(_write(tmp_path / "r.csv", "image,score", rows[:10]), tiny_world / "images")
    targets = [tiny_world / "images" / name for name, _ in rows[10:20]]
    ranked = personalize(model, cfg, ratings, targets, seed=0)
    assert sorted(p for p, _ in ranked) == sorted(targets)
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and all(0.0 < s < 5.0 for s in scores)
    # adaptation changes the predictions (the fine-tuning budget is really spent)
    frozen = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["eval.finetune_steps=0"])
    unadapted = dict(personalize(model, frozen, ratings, targets, seed=0))
    assert not np.allclose([unadapted[p] for p, _ in ranked], scores)
    # deterministic under the seed
    assert personalize(model, cfg, ratings, targets, seed=0) == ranked
    out = write_ranking(ranked, tmp_path / "out" / "ranking.csv")
    assert out.read_text().splitlines()[1].startswith("1,")
