"""Personalize takes ratings as people have them, refuses what it must not read, and never
loses the ranking to one bad image.

* the ratings CSV: headerless two-column files, scores on the person's own scale
  (``score_range``; predictions come back on that scale), image paths under the images folder,
  beside the CSV or absolute, paths leading outside both refused and counted;
* bad files are one-line ``UserError`` s naming the file and line (not UTF-8, a huge field),
  and a Hypothesis fuzz of the reader (random bytes, mutations of a valid file) allows only
  success or a ``UserError``;
* an image that does not decode is skipped, counted and named; every other image is ranked,
  through the CLI as well (exit 0, ranking written).
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from piaa_dist.errors import DataError, UserError
from piaa_dist.personalize import MIN_RATINGS, personalize, read_ratings, write_ranking

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _user_rows(world: Path, which: int = 1) -> list[tuple[str, str]]:
    """``(image name, score)`` of one test user of the tiny world, in file order."""
    from piaa_dist.data.synth import RATINGS_FILE

    user = (world / "test_workers.csv").read_text().split()[which]
    return [(r[1].strip(), r[2].strip()) for r in csv.reader((world / RATINGS_FILE).open())
            if r and r[0].strip() == user]


def _write(path: Path, rows, header: str | None = "image,score") -> Path:
    lines = ([header] if header is not None else []) + [f"{a},{b}" for a, b in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def model_and_cfg():
    import torch

    from piaa_dist.config import load_config
    from piaa_dist.model import build_model

    cfg = load_config(TINY, ["eval.finetune_steps=3"])
    torch.manual_seed(0)
    return build_model(cfg.model), cfg


# ---------------------------------------------------------------------------------------------
# Ratings as people have them


def test_a_headerless_two_column_csv_is_read(tiny_world, tmp_path):
    rows = _user_rows(tiny_world)[:12]
    with_header = read_ratings(_write(tmp_path / "h.csv", rows), tiny_world / "images")
    headerless = read_ratings(_write(tmp_path / "n.csv", rows, header=None), tiny_world / "images")
    assert headerless.images == with_header.images and len(headerless.images) == 12
    assert np.array_equal(headerless.scores, with_header.scores)
    assert headerless.skipped == {}
    assert headerless.lines == list(range(1, 13))  # the first row is a rating, not a header


def test_a_first_row_that_is_neither_header_nor_rating_names_what_is_accepted(tiny_world, tmp_path):
    rows = _user_rows(tiny_world)[:12]
    with pytest.raises(DataError, match=r"cols\.csv: header \['photo'.*\(line 1\).*image/imagepair.*score/rating"):
        read_ratings(_write(tmp_path / "cols.csv", rows, header="photo,stars"), tiny_world / "images")


def test_scores_on_the_persons_scale_map_onto_the_model_and_predictions_come_back(
    tiny_world, tmp_path, model_and_cfg
):
    """A person who rates 1-10 is read with score_range=(1, 10): nothing skipped, the model
    sees the same 1-5 targets as for the equivalent 1-5 ratings, and the predictions come back
    on 1-10 (the same ranking, the scale mapped linearly)."""
    model, cfg = model_and_cfg
    rows = _user_rows(tiny_world)[:12]
    on_ten = [(name, f"{1 + (float(s) - 1) * 9 / 4:g}") for name, s in rows]  # 1..5 -> 1..10
    bad = [(rows[0][0], "11"), (rows[1][0], "0"), (rows[2][0], "nan")]
    images = tiny_world / "images"
    five = read_ratings(_write(tmp_path / "five.csv", rows), images)
    ten = read_ratings(_write(tmp_path / "ten.csv", on_ten + bad), images, score_range=(1, 10))
    assert ten.score_range == (1.0, 10.0)
    assert ten.skipped == {"bad score": 3}  # outside 1-10 (or not a number): counted
    np.testing.assert_allclose(ten.scores, five.scores, rtol=0, atol=1e-6)
    # without the range, a 1-10 file is mostly "bad score" skips
    with pytest.raises(DataError, match="usable ratings"):
        read_ratings(_write(tmp_path / "ten-plain.csv", [(n, "9") for n, _ in rows]), images)

    targets = [images / name for name, _ in _user_rows(tiny_world)[12:20]]
    r5 = personalize(model, cfg, five, targets, seed=0)
    r10 = personalize(model, cfg, ten, targets, seed=0)
    assert r10.score_range == (1.0, 10.0)
    assert [p for p, _ in r10] == [p for p, _ in r5]  # the same ranking
    p5 = np.array([s for _, s in r5])
    np.testing.assert_allclose([s for _, s in r10], 1 + (p5 - 1) * 9 / 4, rtol=1e-5)


def test_image_paths_resolve_under_images_then_beside_the_csv_then_as_absolute(tiny_world, tmp_path, caplog):
    rows = _user_rows(tiny_world)[:14]
    home = tmp_path / "me"
    photos = home / "photos"
    photos.mkdir(parents=True)
    (home / "more").mkdir()
    for name, _ in rows:
        (photos / name).write_bytes((tiny_world / "images" / name).read_bytes())
    # four images live beside the CSV (one in a sub-folder), not in --images
    for name, _ in rows[10:13]:
        (photos / name).rename(home / name)
    (photos / rows[13][0]).rename(home / "more" / rows[13][0])
    listed = (
        [(name, s) for name, s in rows[:8]]                     # under --images
        + [(str(photos / rows[8][0]), rows[8][1])]              # absolute, inside --images
        + [(f"sub/../{rows[9][0]}", rows[9][1])]                # normalised, still inside
        + [(name, s) for name, s in rows[10:13]]                # beside the CSV
        + [(f"more/{rows[13][0]}", rows[13][1])]                # relative to the CSV's folder
        + [("gone.jpg", "3")]                                   # nowhere
    )
    (photos / "sub").mkdir()
    csv_path = _write(home / "ratings.csv", listed)
    with caplog.at_level(logging.WARNING, logger="piaa_dist.personalize"):
        got = read_ratings(csv_path, photos)
    assert len(got.images) == 14
    assert got.skipped == {"missing image": 1}
    assert got.images[10] == (home / rows[10][0]).resolve()
    # the skipped row's warning names the file, the line and every place it looked
    (warning,) = [r.getMessage() for r in caplog.records if "gone.jpg" in r.getMessage()]
    assert f"{csv_path}:16:" in warning and "missing image" in warning
    assert str(photos.resolve() / "gone.jpg") in warning and str(home.resolve() / "gone.jpg") in warning


def test_paths_leading_outside_the_folders_are_refused_and_counted_not_read(tiny_world, tmp_path):
    rows = _user_rows(tiny_world)[:13]
    home = tmp_path / "me"
    photos = home / "photos"
    photos.mkdir(parents=True)
    for name, _ in rows[:10]:
        (photos / name).write_bytes((tiny_world / "images" / name).read_bytes())
    secret_dir = tmp_path / "elsewhere"
    secret_dir.mkdir()
    outside = []
    for name, _ in rows[10:13]:
        (secret_dir / name).write_bytes((tiny_world / "images" / name).read_bytes())
        outside.append(secret_dir / name)
    (photos / "link.jpg").symlink_to(outside[2])          # a symlink leading out
    listed = rows[:10] + [
        (f"../../elsewhere/{rows[10][0]}", "4"),             # ../ out of both folders
        (str(outside[1]), "4"),                               # an absolute path elsewhere
        ("link.jpg", "4"),
    ]
    got = read_ratings(_write(home / "ratings.csv", listed), photos)
    assert got.skipped == {"outside image folders": 3}
    assert len(got.images) == 10
    assert not any(p.resolve().is_relative_to(secret_dir.resolve()) for p in got.images)


# ---------------------------------------------------------------------------------------------
# Bad files: one line naming the file and line


def test_a_ratings_file_that_is_not_utf8_names_the_file_and_line(tiny_world, tmp_path):
    rows = _user_rows(tiny_world)[:12]
    path = tmp_path / "latin1.csv"
    path.write_bytes(("image,score\n" + f"{rows[0][0]},3\n").encode() + "café.jpg,4\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv:3: not UTF-8 text") as err:
        read_ratings(path, tiny_world / "images")
    assert "\n" not in str(err.value)


def test_a_huge_field_names_the_file_and_line(tiny_world, tmp_path):
    rows = _user_rows(tiny_world)[:12]
    path = tmp_path / "huge.csv"
    path.write_text("image,score\n" + f"{rows[0][0]},3\n" + '"' + "x" * 200_000 + '",4\n')
    with pytest.raises(DataError, match=r"huge\.csv:3: a field longer than \d+ characters") as err:
        read_ratings(path, tiny_world / "images")
    assert "\n" not in str(err.value)


def test_a_missing_images_folder_is_named(tiny_world, tmp_path):
    path = _write(tmp_path / "r.csv", _user_rows(tiny_world)[:12])
    with pytest.raises(DataError, match="no-such-folder: no such image folder"):
        read_ratings(path, tmp_path / "no-such-folder")


@pytest.fixture(scope="module")
def fuzz_home(tiny_world, tmp_path_factory) -> Path:
    """A folder with a valid ratings CSV and its images (shared by every fuzz example)."""
    home = tmp_path_factory.mktemp("fuzz")
    (home / "images").mkdir()
    rows = _user_rows(tiny_world)[:14]
    for name, _ in rows:
        (home / "images" / name).write_bytes((tiny_world / "images" / name).read_bytes())
    # FLICKR-AES style: worker, imagePair, score (3 columns, spaces after the commas)
    (home / "valid.csv").write_text(
        "worker, imagePair, score\n" + "".join(f"A1, {n}, {s}\n" for n, s in rows)
    )
    return home


def _outcome(path: Path, images: Path) -> str:
    try:
        read_ratings(path, images)
    except UserError:
        return "user error"
    return "ok"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes_give_success_or_a_user_error(fuzz_home, data):
    path = fuzz_home / "random.csv"
    path.write_bytes(data)
    assert _outcome(path, fuzz_home / "images") in ("ok", "user error")


_MUTATION = st.tuples(
    st.sampled_from(["insert", "delete", "replace", "duplicate-line", "truncate", "swap-cells"]),
    st.floats(min_value=0, max_value=1, exclude_max=True),
    st.binary(min_size=1, max_size=8)
    | st.sampled_from([b",", b"\n", b'"', b"\r\n", b"\x00", b"../", b"/", b"\xff", b"nan", b"-1", b"1e309",
                       b"\xef\xbb\xbf", b" ", b"\t"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=6))
def test_fuzz_mutations_of_a_valid_file_give_success_or_a_user_error(fuzz_home, mutations):
    data = bytearray((fuzz_home / "valid.csv").read_bytes())
    for kind, where, chunk in mutations:
        i = int(where * (len(data) + 1))
        if kind == "insert":
            data[i:i] = chunk
        elif kind == "delete":
            del data[i:i + len(chunk)]
        elif kind == "replace":
            data[i:i + len(chunk)] = chunk
        elif kind == "duplicate-line":
            lines = bytes(data).split(b"\n")
            j = min(int(where * len(lines)), len(lines) - 1)
            lines.insert(j, lines[j])
            data = bytearray(b"\n".join(lines))
        elif kind == "truncate":
            del data[i:]
        else:
            lines = bytes(data).split(b"\n")
            j = min(int(where * len(lines)), len(lines) - 1)
            lines[j] = b",".join(reversed(lines[j].split(b",")))
            data = bytearray(b"\n".join(lines))
    path = fuzz_home / "mutated.csv"
    path.write_bytes(bytes(data))
    assert _outcome(path, fuzz_home / "images") in ("ok", "user error")


# ---------------------------------------------------------------------------------------------
# Images that do not decode


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 3])
    return dst


def test_an_image_to_score_that_does_not_decode_is_skipped_named_and_the_rest_ranked(
    tiny_world, tmp_path, model_and_cfg, caplog
):
    model, cfg = model_and_cfg
    rows = _user_rows(tiny_world)
    images = tiny_world / "images"
    ratings = read_ratings(_write(tmp_path / "r.csv", rows[:10]), images)
    good = [images / name for name, _ in rows[10:20]]
    broken = _truncated(good[3], tmp_path / "broken.jpg")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    with caplog.at_level(logging.WARNING, logger="piaa_dist.personalize"):
        ranked = personalize(model, cfg, ratings, good[:5] + [broken] + good[5:] + [not_an_image], seed=0)
    assert sorted(p for p, _ in ranked) == sorted(good)
    assert [p for p, _ in ranked.unreadable] == [broken, not_an_image]
    assert all(str(p) in caplog.text for p in (broken, not_an_image))
    # the others are ranked exactly as without the broken images
    assert list(ranked) == list(personalize(model, cfg, ratings, good, seed=0))
    out = write_ranking(ranked, tmp_path / "ranking.csv")
    assert len(out.read_text().splitlines()) == 1 + len(good)


def test_a_rated_image_that_does_not_decode_is_dropped_and_counted(tiny_world, tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    rows = _user_rows(tiny_world)
    home = tmp_path / "me"
    home.mkdir()
    for name, _ in rows[:11]:
        (home / name).write_bytes((tiny_world / "images" / name).read_bytes())
    _truncated(home / rows[4][0], home / rows[4][0])
    targets = [tiny_world / "images" / name for name, _ in rows[11:15]]
    ranked = personalize(model, cfg, read_ratings(_write(home / "r.csv", rows[:11]), home), targets)
    assert ranked.ratings_used == MIN_RATINGS and ranked.skipped == {"unreadable image": 1}
    # with only 10 ratings, one that does not decode leaves too few: an error before fine-tuning
    ratings = read_ratings(_write(home / "ten.csv", rows[:10]), home)
    with pytest.raises(DataError, match=rf"ten\.csv: 9 usable ratings.*{rows[4][0]}"):
        personalize(model, cfg, ratings, targets)


def test_cli_ranks_around_a_broken_image_and_reports_a_bad_csv_in_one_line(tiny_world, tmp_path, model_and_cfg):
    """Through ``piaa-dist personalize``: one truncated JPEG among the images to score leaves a
    written ranking of the others (exit 0); a ratings CSV that is not UTF-8 is one line, exit 2."""
    from piaa_dist.checkpoint import save_model

    model, cfg = model_and_cfg
    model_dir = save_model(tmp_path / "model", model, cfg, {"kind": "test"})
    rows = _user_rows(tiny_world)
    to_score = tmp_path / "new"
    to_score.mkdir()
    for name, _ in rows[10:16]:
        (to_score / name).write_bytes((tiny_world / "images" / name).read_bytes())
    _truncated(to_score / rows[12][0], to_score / rows[12][0])
    ratings = _write(tmp_path / "r.csv", rows[:10])
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(csv_path: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "piaa_dist.cli", "personalize", "--model", str(model_dir),
             "--ratings", str(csv_path), "--images", str(tiny_world / "images"),
             "--score", str(to_score), "--out", str(tmp_path / "ranking.csv")],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )

    ok = cli(ratings)
    assert ok.returncode == 0, ok.stderr
    ranking = (tmp_path / "ranking.csv").read_text().splitlines()
    assert len(ranking) == 1 + 5 and not any(rows[12][0] in line for line in ranking)
    assert rows[12][0] in ok.stderr  # named in the warning
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"image,score\n" + f"{rows[0][0]},3\n".encode() + b"caf\xe9.jpg,4\n")
    failed = cli(bad)
    assert failed.returncode == 2
    errors = [line for line in failed.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "bad.csv:3: not UTF-8" in errors[0], failed.stderr
    assert "Traceback" not in failed.stderr
