"""Personalization from a person's ratings: input checks, counted skips, a ranked output."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from piaa_dist.errors import DataError
from piaa_dist.personalize import (
    MIN_RATINGS,
    list_images,
    load_images,
    personalize,
    read_ratings,
    write_ranking,
)
from piaa_dist.protocol import finetune, finetune_budget, predict, score_targets

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    assert scores == sorted(scores, reverse=True)
    # the 1-5 scale of the ratings (the model's sigmoid output is score / 5): what the adapted
    # model predicts for these images, times 5
    budget = finetune_budget(cfg, model)
    tuned = finetune(model, (load_images(ratings.images, cfg.data.image_size),
                             score_targets(ratings.scores)), budget, seed=0)
    expected = predict(tuned, load_images(targets, cfg.data.image_size), budget.batch_size) * 5.0
    np.testing.assert_allclose([dict(ranked)[p] for p in targets], expected, rtol=1e-6)
    # adaptation changes the predictions (the fine-tuning budget is really spent)
    frozen = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["eval.finetune_steps=0"])
    unadapted = dict(personalize(model, frozen, ratings, targets, seed=0))
    assert not np.allclose([unadapted[p] for p, _ in ranked], scores)
    # deterministic under the seed, which defaults to 0 (what the CLI's --seed defaults to)
    assert personalize(model, cfg, ratings, targets, seed=0) == ranked
    assert personalize(model, cfg, ratings, targets) == ranked
    assert personalize(model, cfg, ratings, targets, seed=1) != ranked  # dropout: the seed matters
    out = write_ranking(ranked, tmp_path / "out" / "ranking.csv")
    assert out.read_text().splitlines()[1].startswith("1,")


# ---------------------------------------------------------------------------------------------
# What personalize adapts on, and what it returns


def _setup(tiny_world, tmp_path, *overrides, n_rated=12, n_scored=10):
    """tiny.yaml (no dropout, so that only the data decides the result), a fresh model, one
    test user's first ``n_rated`` ratings as a CSV and the next ``n_scored`` images to score."""
    import torch

    from piaa_dist.config import load_config
    from piaa_dist.model import build_model

    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml",
                      ["model.dropout=0", "eval.finetune_steps=5", "eval.finetune_lr=0.05", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    _, rows = _user_rows(tiny_world)
    rated, scored = rows[:n_rated], rows[n_rated:n_rated + n_scored]
    targets = [tiny_world / "images" / name for name, _ in scored]
    return cfg, model, rated, targets


def _watch_training_inputs(model, seen: list):
    """Record the batches the backbone sees in train mode (fine-tuning only)."""

    def hook(module, args):
        if module.training:
            seen.append(args[0].detach().clone())

    model.backbone.register_forward_pre_hook(hook)
    return model


@pytest.mark.parametrize("inner_params", ["all", "head"])
def test_personalize_adapts_on_every_usable_rating_and_nothing_else(tiny_world, tmp_path, inner_params):
    cfg, model, rated, targets = _setup(tiny_world, tmp_path, f"meta.inner_params={inner_params}")
    # two unusable rows (a missing image, a bad score): skipped and counted, never used
    csv_path = _write(tmp_path / "r.csv", "image,score", rated + [("gone.jpg", "3"), (rated[0][0], "9")])
    ratings = read_ratings(csv_path, tiny_world / "images")
    assert len(ratings.images) == len(rated) and sum(ratings.skipped.values()) == 2
    seen: list = []
    personalize(_watch_training_inputs(model, seen), cfg, ratings, targets, seed=1)
    rated_rows = load_images(ratings.images, cfg.data.image_size)
    index = {row.numpy().tobytes(): i for i, row in enumerate(rated_rows)}
    assert len(index) == len(rated)
    got = [index.get(row.numpy().tobytes(), -1) for batch in seen for row in batch]
    assert got, "nothing was fine-tuned"
    assert -1 not in got  # never an image to score, never anything unrated
    steps = 1 if inner_params == "head" else cfg.eval.finetune_steps  # head: backbone runs once
    assert sorted(got) == sorted(list(range(len(rated))) * steps)  # every rating, every step


def test_personalize_keeps_each_score_with_its_image(tiny_world, tmp_path):
    """Permutation test: shuffling the images to score, or the rows of the ratings file, moves
    every (image, score) pair along: each image keeps its score."""
    cfg, model, rated, targets = _setup(tiny_world, tmp_path)
    ratings = read_ratings(_write(tmp_path / "r.csv", "image,score", rated), tiny_world / "images")
    base = dict(personalize(model, cfg, ratings, targets, seed=2))
    assert sorted(base) == sorted(targets)
    spread = np.ptp(list(base.values()))
    assert spread > 1e-3  # the scores differ between images, so a swap would show
    rng = np.random.default_rng(0)
    for _ in range(2):
        order = rng.permutation(len(targets))
        shuffled = dict(personalize(model, cfg, ratings, [targets[i] for i in order], seed=2))
        for path in targets:
            assert shuffled[path] == pytest.approx(base[path], abs=1e-6 * max(1.0, spread)), path
    # shuffled rating rows: the same (image, rating) pairs, so the same adapted model (up to the
    # order of float sums); a rating paired with another image would move the scores
    rows = [rated[i] for i in rng.permutation(len(rated))]
    again = read_ratings(_write(tmp_path / "s.csv", "image,score", rows), tiny_world / "images")
    shuffled = dict(personalize(model, cfg, again, targets, seed=2))
    for path in targets:
        assert shuffled[path] == pytest.approx(base[path], abs=1e-4), path
    # ...whereas a rating moved to another image does move them
    moved = [(name, rated[(i + 1) % len(rated)][1]) for i, (name, _) in enumerate(rated)]
    assert [s for _, s in moved] != [s for _, s in rated]
    wrong = read_ratings(_write(tmp_path / "w.csv", "image,score", moved), tiny_world / "images")
    off = dict(personalize(model, cfg, wrong, targets, seed=2))
    assert max(abs(off[p] - base[p]) for p in targets) > 1e-3


def test_personalize_returns_the_ratings_scale(tiny_world, tmp_path):
    """A person who rates everything 4 gets predictions near 4 (the 1-5 scale of the ratings,
    not the model's 0-1 output), whatever the fresh model predicted before."""
    cfg, model, rated, targets = _setup(tiny_world, tmp_path, "eval.finetune_steps=40",
                                        "eval.finetune_optimizer=adam", "eval.finetune_lr=0.02",
                                        "eval.finetune_bn=running")
    fours = [(name, "4") for name, _ in rated]
    ratings = read_ratings(_write(tmp_path / "r.csv", "image,score", fours), tiny_world / "images")
    scores = [s for _, s in personalize(model, cfg, ratings, targets, seed=0)]
    assert all(3.5 < s < 4.5 for s in scores), scores


# ---------------------------------------------------------------------------------------------
# The pieces around the adaptation: the scale, the images, the ranking file


def test_the_persons_scale_maps_linearly_both_ways_and_1_to_5_exactly():
    from piaa_dist.personalize import MODEL_SCALE, from_model_scale, to_model_scale

    # 1-10 and 0-1 raters: the ends meet the ends, the middle the middle, and back again
    for lo, hi in ((1.0, 10.0), (0.0, 1.0), (-2.0, 2.0)):
        assert to_model_scale(lo, (lo, hi)) == pytest.approx(1.0)
        assert to_model_scale(hi, (lo, hi)) == pytest.approx(5.0)
        assert to_model_scale((lo + hi) / 2, (lo, hi)) == pytest.approx(3.0)
        model = np.array([1.0, 2.0, 3.0, 5.0, 0.2])
        back = from_model_scale(model, (lo, hi))
        np.testing.assert_allclose(back, lo + (model - 1.0) * (hi - lo) / 4.0)
        np.testing.assert_allclose([to_model_scale(float(b), (lo, hi)) for b in back], model)
    np.testing.assert_allclose(from_model_scale(np.array([1.0, 3.0, 5.0]), (1.0, 10.0)), [1.0, 5.5, 10.0])
    # the model's own scale passes through bit for bit (ratings reach the protocol unrounded)
    odd = np.array([0.1, 2.3333333333333335, 4.7])
    assert from_model_scale(odd, MODEL_SCALE).tobytes() == odd.tobytes()
    assert to_model_scale(0.1, MODEL_SCALE) == 0.1


def test_write_ranking_writes_every_row_in_the_given_order(tmp_path):
    ranked = [(tmp_path / "b.jpg", 4.123456), (tmp_path / "a.jpg", 2.5), (tmp_path / "c.jpg", 2.49996)]
    out = write_ranking(ranked, tmp_path / "new" / "deeper" / "ranking.csv")  # folders created
    assert out == tmp_path / "new" / "deeper" / "ranking.csv"
    # into a folder that exists, over a file that exists: replaced, not appended to
    assert write_ranking(ranked[:1], tmp_path / "new" / "deeper" / "ranking.csv") == out
    assert len(out.read_text().splitlines()) == 2
    out = write_ranking(ranked, out)
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["rank", "image", "predicted_score"],
                    ["1", str(tmp_path / "b.jpg"), "4.1235"],
                    ["2", str(tmp_path / "a.jpg"), "2.5000"],
                    ["3", str(tmp_path / "c.jpg"), "2.5000"]]


def test_list_images_expands_folders_to_their_sorted_images_and_names_what_is_missing(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.JPG", "a.png", "c.jpeg", "notes.txt", "d.webp", "e"):
        (folder / name).write_bytes(b"x")
    single = tmp_path / "single.bmp"
    single.write_bytes(b"x")
    got = list_images([folder, single])
    assert got == [folder / "a.png", folder / "b.JPG", folder / "c.jpeg", folder / "d.webp", single]
    assert list_images([str(single)]) == [single]
    with pytest.raises(DataError, match=r"missing\.jpg: no such image file or folder"):
        list_images([single, tmp_path / "missing.jpg"])
    empty, other = tmp_path / "empty", tmp_path / "other"
    for d in (empty, other):
        d.mkdir()
        (d / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"^no images to score in {re.escape(f'{empty}, {other}')}$"):
        list_images([empty, other])


def test_decode_images_keeps_the_good_ones_in_order_and_names_the_bad(tiny_world, tmp_path):
    from piaa_dist.data.decode import decode
    from piaa_dist.personalize import decode_images

    good = sorted((tiny_world / "images").iterdir())[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    images, kept, failed = decode_images([good[0], broken, good[1], good[2]], 32)
    assert kept == [0, 2, 3]
    expected = torch.stack([decode(p.read_bytes(), 32) for p in good])  # test-time decoding
    assert images.shape == (3, 3, 32, 32) and torch.equal(images, expected)
    assert [p for p, _ in failed] == [broken] and failed[0][1]
    assert decode_images([broken], 32)[0] is None
    assert torch.equal(load_images(good, 32), expected)
    with pytest.raises(DataError, match=rf"^{re.escape(str(broken))}: cannot decode image: \w+"):
        load_images([good[0], broken, tmp_path / "absent.jpg"], 32)
    with pytest.raises(DataError, match="^no images to decode$"):
        load_images([], 32)


def test_a_rated_image_that_does_not_decode_is_dropped_and_counted_and_a_device_changes_nothing(
        tiny_world, tmp_path):
    """A rated image that does not decode is left out of the adaptation and counted under
    "unreadable image" on top of the reader's own counts; an image to score that does not
    decode is named and the rest ranked; fine-tuning on an explicit CPU device is the same as
    leaving the model where it is; a file-less Ratings is named "ratings" in errors."""
    from piaa_dist.personalize import Ratings

    cfg, model, rated, targets = _setup(tiny_world, tmp_path)
    images = [tiny_world / "images" / name for name, _ in rated]
    scores = np.array([float(s) for _, s in rated], dtype=np.float32)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    clean = Ratings(images=images, scores=scores, skipped={"missing image": 2})
    with_broken = Ratings(images=images[:3] + [broken] + images[3:],
                          scores=np.concatenate([scores[:3], [5.0], scores[3:]]).astype(np.float32),
                          skipped={"missing image": 2})
    ranking = personalize(model, cfg, with_broken, targets + [broken], seed=3, device="cpu")
    assert ranking.skipped == {"missing image": 2, "unreadable image": 1}
    # counted on top of what the caller already counted under the same reason
    counted = Ratings(images=with_broken.images, scores=with_broken.scores, skipped={"unreadable image": 4})
    assert personalize(model, cfg, counted, targets, seed=3).skipped == {"unreadable image": 5}
    assert ranking.ratings_used == len(images)
    assert [p for p, _ in ranking.unreadable] == [broken]
    assert sorted(p for p, _ in ranking) == sorted(targets)
    # exactly the adaptation on the ratings without the broken one (its 5.0 is not used)
    assert list(ranking) == list(personalize(model, cfg, clean, targets, seed=3))
    assert list(personalize(model, cfg, clean, targets, seed=3, device=torch.device("cpu"))) == list(ranking)
    few = Ratings(images=images[:9] + [broken], scores=scores[:10], skipped={})
    with pytest.raises(DataError, match=r"^ratings: 9 usable ratings.*\{'unreadable image': 1\}.*broken\.jpg"):
        personalize(model, cfg, few, targets, seed=3)


def test_a_skipped_row_anywhere_is_counted_and_reading_goes_on_with_each_ratings_line(tiny_world, tmp_path):
    """A short row, a duplicate image or a blank line in the middle of the file does not end
    the reading: every later rating is used, each skipped row counted once, and each rating
    keeps the CSV line it came from (for messages), quoted multi-line records included."""
    _, rows = _user_rows(tiny_world)
    good = rows[:12]
    records = ["image,score"]  # each record's text, possibly spanning lines
    rating_records = []
    for i, (name, score) in enumerate(good):
        if i == 3:
            records.append("lonely-cell")  # a short row
        if i == 6:
            records.append(f"{good[0][0]},{good[0][1]}")  # a duplicate of the first image
            records.append("")  # a blank line: not a rating
        # one record spans two lines (a quoted newline in its score)
        records.append(f'"{name}","{score}\n"' if i == 9 else f"{name},{score}")
        rating_records.append(len(records) - 1)
    starts = [1]
    for text in records:
        starts.append(starts[-1] + text.count("\n") + 1)
    expected_lines = [starts[r] for r in rating_records]
    body = records
    csv_path = tmp_path / "mixed.csv"
    csv_path.write_text("\n".join(body) + "\n")
    got = read_ratings(csv_path, tiny_world / "images")
    assert [p.name for p in got.images] == [name for name, _ in good]
    assert got.skipped == {"short row": 1, "duplicate image": 1}
    assert got.lines == expected_lines


def test_too_few_ratings_with_nothing_skipped_says_none(tiny_world, tmp_path):
    _, rows = _user_rows(tiny_world)
    csv_path = _write(tmp_path / "few.csv", "image,score", rows[:4])
    with pytest.raises(DataError, match=r"few\.csv: 4 usable ratings, personalization needs at least 10 "
                                        r"\(skipped: none\)$"):
        read_ratings(csv_path, tiny_world / "images")


def test_nothing_to_score_is_a_clear_error(tiny_world, tmp_path):
    """No image to score, or none that decodes: a DataError saying so (naming the first image
    that does not decode and why), never an IndexError."""
    from piaa_dist.personalize import Ratings

    cfg, model, rated, _ = _setup(tiny_world, tmp_path)
    ratings = Ratings(images=[tiny_world / "images" / name for name, _ in rated],
                      scores=np.array([float(s) for _, s in rated], dtype=np.float32), skipped={})
    with pytest.raises(DataError, match=r"^no images to score$"):
        personalize(model, cfg, ratings, [], seed=0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"none of the 2 images to score decodes \(first: .*broken\.jpg: \w+Error"):
        personalize(model, cfg, ratings, [broken, broken], seed=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is not usable")
def test_asking_for_a_gpu_without_one_names_personalize(tiny_world, tmp_path):
    from piaa_dist.gpu import GpuUnavailable
    from piaa_dist.personalize import Ratings

    cfg, model, rated, targets = _setup(tiny_world, tmp_path)
    ratings = Ratings(images=[tiny_world / "images" / name for name, _ in rated],
                      scores=np.array([float(s) for _, s in rated], dtype=np.float32), skipped={})
    with pytest.raises(GpuUnavailable, match=r"^personalize: a GPU was requested"):
        personalize(model, cfg, ratings, targets, seed=0, device="cuda")


@pytest.mark.parametrize(("cells", "shown"), [(6, "'c5'\\]"), (7, "'c5', \\.\\.\\.\\]")])
def test_an_unusable_first_row_shows_its_first_six_cells_and_what_is_accepted(tiny_world, tmp_path, cells, shown):
    """The error shows the first row as read (six cells at most, "..." when it has more) and
    says what the first row must be."""
    _, rows = _user_rows(tiny_world)
    header = ",".join(f"c{i}" for i in range(cells))
    with pytest.raises(DataError, match=rf"wide\.csv: header \['c0', .*{shown} \(line 1\) needs an image column .*"
                                        r"a file without a header must start with an image,score row"):
        read_ratings(_write(tmp_path / "wide.csv", header, rows[:12]), tiny_world / "images")


def test_personalize_adapts_with_the_setting_evaluate_chose_for_the_registered_model(
        tiny_world, tiny_dataset_url, tmp_path, capsys):
    """``evaluate`` of a ``models:/`` reference records the setting the per-method search chose
    for ``blg-piaa`` with that version; ``personalize`` of the version then adapts with the
    setting of the closest shot count (exactly what the library call with that setting gives)
    and says so; a model folder, with nothing recorded, falls back to the shared budget and
    says that."""
    from piaa_dist.checkpoint import save_model
    from piaa_dist.cli import main
    from piaa_dist.config import load_config
    from piaa_dist.model import build_model
    from piaa_dist.orchestration import tracking, usecases

    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["eval.finetune_steps=1", "eval.finetune_lr=0.01"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    folder = save_model(tmp_path / "model", model, cfg, {"kind": "test"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = usecases.register(folder, name="blg-piaa", mlflow_uri=uri)
    ref = reg.uri
    result = usecases.evaluate(data=tiny_dataset_url, model=ref, shots=[4, 12], repeats=1, mlflow_uri=uri,
                               progress=False, overrides=["eval.methods=[blg-piaa]", "eval.protocol=per-method"])
    chosen = result.finetune.chosen["blg-piaa"]
    assert result.finetune.source == "search" and set(chosen) == {4, 12}
    tags = tracking.client(uri).get_model_version("blg-piaa", str(reg.version)).tags
    assert usecases.TAG_PERSONAL_SETTING in tags

    _, rows = _user_rows(tiny_world)
    csv_path = _write(tmp_path / "r.csv", "image,score", rows[:11])  # 11 ratings: closest to 12 shots
    targets = [tiny_world / "images" / name for name, _ in rows[11:21]]
    got = usecases.personalize(model=ref, ratings=csv_path, images=tiny_world / "images", score=targets,
                               mlflow_uri=uri, seed=4)
    ratings = read_ratings(csv_path, tiny_world / "images")
    expected = personalize(model, cfg, ratings, targets, seed=4, setting=chosen[12])
    assert got.ranked == tuple(expected.ranked)
    assert "blg-piaa at 12 shots" in got.finetune and f"models:/blg-piaa/{reg.version}" in got.finetune
    assert got.finetune.startswith(expected.finetune)
    # a folder carries no recorded setting: the shared budget, and the output says so
    plain = usecases.personalize(model=folder, ratings=csv_path, images=tiny_world / "images", score=targets,
                                 seed=4)
    assert plain.ranked == tuple(personalize(model, cfg, ratings, targets, seed=4).ranked)
    assert "shared eval.finetune_* budget" in plain.finetune
    assert [s for _, s in plain.ranked] != [s for _, s in got.ranked]  # the two budgets differ here
    # the command prints which setting it used
    assert main(["personalize", "--model", ref, "--ratings", str(csv_path), "--images", str(tiny_world / "images"),
                 "--score", *map(str, targets), "--out", str(tmp_path / "rank.csv"), "--mlflow-uri", uri,
                 "--seed", "4"]) == 0
    assert f"fine-tuning: {got.finetune}" in capsys.readouterr().out
