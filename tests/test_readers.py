"""Readers beyond the published FLICKR-AES/AADB files (issue 12.1) and bad input (issue 11.3/11.4).

* ratings logs (CSV and Parquet; a product's own score scale; a split column, a test list or a
  seeded fraction; a truth sidecar; images in a folder tree or under an ``s3://`` prefix);
* PARA's layout and every quirk the reader handles;
* image paths that lead outside the image folder are refused and counted, never read;
* images above the pixel limit are skipped under their own reason, before decoding;
* bad input (not UTF-8, user IDs that collide or are too long, a missing bucket) is one clear
  error raised before any image is decoded.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from piaa_dist.cli import main as cli_main
from piaa_dist.data.ingest import ingest
from piaa_dist.data.layout import POINTER
from piaa_dist.data.readers import SKIP_REASONS, read_source
from piaa_dist.data.stream import Dataset
from piaa_dist.errors import DataError, StorageError, UserError


def _jpeg(path: Path, size=(40, 30), color=(200, 100, 50)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG", quality=90)


def _invariants(report: dict) -> None:
    for part in (report, report["ratings"], report["test_workers"]):
        assert part["read"] == part["ingested"] + sum(part["skipped"].values())
    assert set(report["skipped"]) == set(SKIP_REASONS)


def _samples(url: str, endpoint: str | None = None) -> dict[tuple[str, str], dict]:
    """(user, image) -> the sample's JSON, for every sample of the published version."""
    ds = Dataset.open(url, endpoint_url=endpoint)
    out = {}
    for u in ds.users("all"):
        for part in ds.parts(u):
            for s in ds.read_part(part, u):
                out[(u, s["json"]["image"])] = s["json"]
    return out


def _version(root: Path) -> Path:
    return root / "versions" / json.loads((root / POINTER).read_text())["version"]


# ---------------------------------------------------------------------------------------------
# ratings logs


LOG_ROWS = [
    # user, image, score, split                   # line: outcome
    ("u1", "a/i0.jpg", "7", "train"),              # 2: ok, 7 on 0-10 -> 3.8
    ("u1", "a/i1.jpg", "10", "train"),             # 3: ok -> 5.0
    ("u1", "a/i1.jpg", "3", "train"),              # 4: duplicate row
    ("u1", "../secret.jpg", "5", "train"),         # 5: outside ('..'), a real image is there
    ("u1", "/etc/hostname", "5", "train"),         # 6: outside (absolute)
    ("u1", "link.jpg", "5", "train"),              # 7: outside (symlink leading out)
    ("u2", "b/i2.jpg", "0", "test"),               # 8: ok -> 1.0
    ("u2", "b/i3.jpg", "11", "test"),              # 9: bad score (above the range)
    ("u2", "b/i3.jpg", "-1", "test"),              # 10: bad score (below)
    ("u2", "b/i3.jpg", "nan", "test"),             # 11: bad score (not finite)
    ("u2", "b/missing.jpg", "5", "test"),          # 12: missing image
    ("u2", "b/i3.jpg", "5", "validation"),         # 13: malformed (split not train/test)
    ("", "a/i0.jpg", "5", ""),                     # 14: malformed (no user)
    ("u3", "a/i0.jpg", "5", ""),                   # 15: ok, no split given -> train
    ("u3", "b/i2.jpg", "2.5", ""),                 # 16: ok -> 2.0
    ("u3", "inside/i0.jpg", "5", ""),              # 17: ok (a symlink that stays inside)
    ("u2", "b/i3.jpg", "4", "test"),               # 18: ok
]


@pytest.fixture
def log_world(tmp_path) -> Path:
    root = tmp_path / "product"
    images = root / "images"
    for name in ("a/i0.jpg", "a/i1.jpg", "b/i2.jpg", "b/i3.jpg"):
        _jpeg(images / name, color=(len(name) * 20, 10, 10))
    _jpeg(root / "secret.jpg", color=(1, 2, 3))  # outside the image folder
    os.symlink(root / "secret.jpg", images / "link.jpg")
    os.symlink(images / "a", images / "inside")
    with open(root / "log.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("user", "image", "score", "split"), *LOG_ROWS])
    return root


def test_ratings_log_every_rule_is_counted(log_world, tmp_path):
    out = tmp_path / "out"
    report = ingest("ratings", None, str(out), ratings_file=log_world / "log.csv", images_dir=log_world / "images",
                    score_range=(0, 10))
    _invariants(report)
    assert report["source"] == "ratings" and report["ratings"]["read"] == len(LOG_ROWS)
    assert report["ratings"]["ingested"] == 7
    assert {k: v for k, v in report["ratings"]["skipped"].items() if v} == {
        "duplicate_row": 1, "outside_image_folder": 3, "bad_score": 3, "missing_image": 1, "malformed_row": 2}
    log = log_world / "log.csv"
    ex = report["examples"]
    assert [e.split(": ")[0] for e in ex["outside_image_folder"]] == [f"{log}:5", f"{log}:6", f"{log}:7"]
    assert ex["bad_score"][0] == f"{log}:9: score '11' is not a number in 0-10"
    assert ex["malformed_row"][0] == f"{log}:13: split 'validation' is not train or test"
    samples = _samples(str(out))
    assert {k: v["score"] for k, v in samples.items()} == {
        ("u1", "a/i0.jpg"): 3.8, ("u1", "a/i1.jpg"): 5.0, ("u2", "b/i2.jpg"): 1.0, ("u2", "b/i3.jpg"): 2.6,
        ("u3", "a/i0.jpg"): 3.0, ("u3", "b/i2.jpg"): 2.0, ("u3", "inside/i0.jpg"): 3.0}
    assert samples[("u1", "a/i0.jpg")]["raw_score"] == 7.0
    ds = Dataset.open(str(out))
    assert ds.users("test") == ["u2"] and ds.users("train") == ["u1", "u3"]
    # The refused image outside the folder was never read: no stored image has its colour.
    secret = Image.open(log_world / "secret.jpg").getpixel((0, 0))
    for u in ds.users("all"):
        for jpeg in ds.load_user(u).jpegs:
            assert Image.open(io.BytesIO(jpeg)).getpixel((0, 0)) != secret


def test_ratings_log_parquet_matches_csv(log_world, tmp_path):
    table = pa.table({"User": [r[0] for r in LOG_ROWS], "image": [r[1] for r in LOG_ROWS],
                      "score": [float(r[2]) if r[2] not in ("nan",) else None for r in LOG_ROWS],
                      "split": [r[3] or None for r in LOG_ROWS], "extra": list(range(len(LOG_ROWS)))})
    pq.write_table(table, log_world / "log.parquet")
    kw = dict(images_dir=log_world / "images", score_range=(0, 10))
    a = ingest("ratings", None, str(tmp_path / "csv"), ratings_file=log_world / "log.csv", **kw)
    b = ingest("ratings", None, str(tmp_path / "pq"), ratings_file=log_world / "log.parquet", **kw)
    assert a["ratings"]["ingested"] == b["ratings"]["ingested"] == 7
    # Parquet rows are numbered from 1 (no header line); a numeric cell is shown as the number.
    assert b["examples"]["bad_score"][0] == f"{log_world / 'log.parquet'}:8: score 11.0 is not a number in 0-10"
    ma = pq.read_table(_version(tmp_path / "csv") / "manifest.parquet").to_pylist()
    mb = pq.read_table(_version(tmp_path / "pq") / "manifest.parquet").to_pylist()
    assert ma == mb  # same users, ranges and checksums: the same bytes


def test_ratings_log_split_conflicts_and_flag_conflicts_are_errors(log_world, tmp_path):
    log = log_world / "log.csv"
    text = log.read_text()
    log.write_text(text + "u1,b/i3.jpg,5,test\n")
    with pytest.raises(DataError, match=rf"{log}:19: user u1 is in split 'test' here but 'train' at line 2"):
        ingest("ratings", None, str(tmp_path / "o"), ratings_file=log, images_dir=log_world / "images",
               score_range=(0, 10))
    log.write_text(text)
    with pytest.raises(DataError, match="has a split column; do not also give"):
        read_source("ratings", ratings_file=log, images_dir=log_world / "images", test_fraction=0.5)
    with pytest.raises(DataError, match="--format flickr-aes does not use --score-range"):
        read_source("flickr-aes", log_world, score_range=(0, 10))
    with pytest.raises(DataError, match="--format ratings needs --ratings"):
        read_source("ratings", images_dir=log_world / "images")


def _fraction_log(path: Path, users: list[str], order: int = 1) -> None:
    rows = [(u, "a/i0.jpg", "3") for u in users][::order]
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("user", "image", "score"), *rows])


def test_test_fraction_is_a_seeded_choice_by_user_id(log_world, tmp_path):
    users = [f"user-{i:03d}" for i in range(200)]
    images = log_world / "images"

    def test_users(order: int, seed: int, subset: list[str]) -> set[str]:
        log = tmp_path / f"log{order}{seed}{len(subset)}.csv"
        _fraction_log(log, subset, order)
        src = read_source("ratings", ratings_file=log, images_dir=images, test_fraction=0.25, split_seed=seed)
        return {u for u, t in zip(src.users, src.is_test) if t}

    chosen = test_users(1, 0, users)
    assert 30 <= len(chosen) <= 70
    assert test_users(-1, 0, users) == chosen  # file order does not matter
    assert test_users(1, 0, users[:100]) == {u for u in chosen if u in users[:100]}  # nor the other users
    assert test_users(1, 1, users) != chosen  # the seed does


def test_truth_sidecar_beside_a_ratings_log_marks_a_synthetic_world(log_world, tmp_path):
    rows = [("u1", "a/i0.jpg", "4"), ("u1", "a/i1.jpg", "2"), ("u2", "b/i2.jpg", "5")]
    with open(log_world / "log.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("user", "image", "score"), *rows])
    with open(log_world / "latent_scores.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([
            ("user", "image", "latent", "average_latent"), ("u1", "a/i0.jpg", "3.25", "3.0"),
            ("u1", "a/i1.jpg", "1.5", "2.0"), ("u2", "b/i2.jpg", "4.75", "3.5"), ("u9", "x.jpg", "1", "1")])
    report = ingest("ratings", None, str(tmp_path / "o"), ratings_file=log_world / "log.csv",
                    images_dir=log_world / "images")
    assert report["source"] == "synth" and report["has_truth"]
    ds = Dataset.open(str(tmp_path / "o"))
    r = ds.load_user("u1")
    assert r.latent.tolist() == [3.25, 1.5] and r.average_latent.tolist() == [3.0, 2.0]
    assert r.scores.tolist() == [4.0, 2.0]


def test_images_under_an_s3_prefix(log_world, tmp_path, s3_endpoint, s3_bucket):
    from piaa_dist.storage import open_store

    store = open_store(f"s3://{s3_bucket}/imgs", endpoint_url=s3_endpoint)
    for p in (log_world / "images").rglob("*.jpg"):
        if not p.is_symlink() and "inside" not in p.parts:
            store.write_bytes(p.relative_to(log_world / "images").as_posix(), p.read_bytes())
    rows = [r for r in LOG_ROWS if r[1] not in ("link.jpg", "inside/i0.jpg")]
    with open(log_world / "log.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("user", "image", "score", "split"), *rows])
    kw = dict(ratings_file=log_world / "log.csv", score_range=(0, 10))
    local = ingest("ratings", None, str(tmp_path / "local"), images_dir=log_world / "images", **kw)
    remote = ingest("ratings", None, f"s3://{s3_bucket}/data", images_dir=f"s3://{s3_bucket}/imgs",
                    endpoint_url=s3_endpoint, **kw)
    assert local["ratings"]["skipped"] == remote["ratings"]["skipped"]
    assert remote["ratings"]["skipped"]["missing_image"] == 1  # the 404 of b/missing.jpg
    assert remote["ratings"]["skipped"]["outside_image_folder"] == 2  # '..' and absolute: never requested
    assert _samples(str(tmp_path / "local")) == _samples(f"s3://{s3_bucket}/data", s3_endpoint)


# ---------------------------------------------------------------------------------------------
# PARA


PARA_HEADER = ["sessionId", "imageName", "userId", "aestheticScore", "qualityScore", "compositionScore",
               "colorScore", "dofScore", "contentScore", "lightScore", "contentPreference", "willingnessToShare"]


@pytest.fixture
def para(tmp_path) -> Path:
    root = tmp_path / "PARA"
    for session, name in (("session1", "iaa_pub1_.jpg"), ("session1", "iaa_pub2_.jpg"),
                          ("session2", "iaa_pub71_.jpg"), ("session2", "iaa_pub72_.jpg")):
        _jpeg(root / "imgs" / session / name, color=(len(name) * 9, 40, 40))
    _jpeg(root / "imgs" / "iaa_pub90_.jpg")  # flattened: no session folder
    rows = [
        ["session1", "iaa_pub1_.jpg", "A001", "3.5"],    # 2: ok (half step)
        ["session1", "iaa_pub2_.jpg", "A001", "4"],      # 3: ok
        ["session2", "iaa_pub71_.jpg", "A001", "5.0"],   # 4: ok
        ["session1", "iaa_pub1_.jpg", "A001", "2"],      # 5: duplicate (same session image)
        ["session2", "iaa_pub72_.jpg", "A002", ""],      # 6: bad score (empty)
        ["session2", "iaa_pub72_.jpg", "A002", "5.5"],   # 7: bad score (above 5)
        ["session2", "iaa_pub72_.jpg", "A002", "1.5"],   # 8: ok
        ["session3", "iaa_pub90_.jpg", "A002", "2.5"],   # 9: ok, found flattened in imgs/
        ["", "iaa_pub1_.jpg", "A002", "3"],              # 10: missing image (no session)
        ["session1", "iaa_pub9_.jpg", "A002", "3"],      # 11: missing image
        ["session1", "iaa_pub1_.jpg", "", "3"],          # 12: malformed (no userId)
        ["session2", "iaa_pub71_.jpg", "A003", "1"],     # 13: ok
        ["session1", "iaa_pub2_.jpg", "A003", "2"],      # 14: ok
    ]
    ann = root / "annotation"
    ann.mkdir(parents=True)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows(
        [[f" {h}" for h in PARA_HEADER]] + [r + ["3", "3", "3", "3", "3", "3", "1", "2"] for r in rows])
    (ann / "PARA-Images.csv").write_bytes(("\ufeff" + buf.getvalue()).encode("utf-8"))
    (root / "userset").mkdir()
    (root / "userset" / "TestUserIDs_Fold1.txt").write_text("A003\nA404\n")
    (root / "userset" / "TestUserIDs_Fold2.txt").write_text("A002\n")
    return root


def test_para_every_quirk_is_counted(para, tmp_path):
    report = ingest("para", para, str(tmp_path / "out"), fold=1)
    _invariants(report)
    assert report["source"] == "para" and report["ratings"]["read"] == 13
    assert report["ratings"]["ingested"] == 7
    assert {k: v for k, v in report["ratings"]["skipped"].items() if v} == {
        "duplicate_row": 1, "bad_score": 2, "missing_image": 2, "malformed_row": 1}
    assert report["test_workers"]["read"] == 2 and report["test_workers"]["skipped"]["unknown_test_worker"] == 1
    ann = para / "annotation" / "PARA-Images.csv"
    assert report["examples"]["duplicate_row"] == [f"{ann}:5: A001 rated session1/iaa_pub1_.jpg again"]
    assert report["examples"]["bad_score"][0] == f"{ann}:6: aestheticScore '' is not a number in 1-5"
    ds = Dataset.open(str(tmp_path / "out"))
    assert ds.users("test") == ["A003"] and ds.users("train") == ["A001", "A002"]
    samples = _samples(str(tmp_path / "out"))
    assert samples[("A001", "session1/iaa_pub1_.jpg")]["score"] == 3.5
    assert samples[("A002", "session3/iaa_pub90_.jpg")]["score"] == 2.5
    assert "raw_score" not in samples[("A001", "session1/iaa_pub1_.jpg")]  # PARA's own scale is 1-5
    # Another fold picks other test users; a fold that is not shipped is a clear error.
    assert Dataset.open(str(tmp_path / "out")).users("test") == ["A003"]
    ingest("para", para, str(tmp_path / "f2"), fold=2)
    assert Dataset.open(str(tmp_path / "f2")).users("test") == ["A002"]
    with pytest.raises(DataError, match=r"PARA user split not found: .*TestUserIDs_Fold5.txt"):
        ingest("para", para, str(tmp_path / "f5"), fold=5)


# ---------------------------------------------------------------------------------------------
# pixel limit


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels but holds almost no data (97 KB in the issue)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))


def test_images_above_the_pixel_limit_are_skipped_before_decoding(tmp_path):
    root = tmp_path / "flickr"
    _jpeg(root / "images" / "ok_b.jpg")
    _jpeg(root / "images" / "wide_b.jpg", size=(60, 40))
    _png_header_only(root / "images" / "bomb_b.png", 10000, 10000)
    (root / "FLICKR-AES_image_labeled_by_each_worker.csv").write_text(
        "worker, imagePair, score\nA1, ok_b.jpg, 3\nA1, bomb_b.png, 4\nA1, wide_b.jpg, 5\n")
    report = ingest("flickr-aes", root, str(tmp_path / "out"))
    _invariants(report)
    assert report["ratings"]["skipped"]["too_many_pixels"] == 1 and report["max_pixels"] == 40_000_000
    assert report["examples"]["too_many_pixels"][0].endswith(
        "bomb_b.png: 10000x10000 = 100000000 pixels is above the limit of 40000000")
    assert report["peak_rss_mb"] > 0
    report = ingest("flickr-aes", root, str(tmp_path / "out2"), max_pixels=2000)
    assert report["ratings"]["skipped"]["too_many_pixels"] == 2 and report["ratings"]["ingested"] == 1
    with pytest.raises(DataError, match=r":3: image above pixel limit: .*bomb_b.png.*\(--strict\)"):
        ingest("flickr-aes", root, str(tmp_path / "out3"), strict=True)


# ---------------------------------------------------------------------------------------------
# bad input: one clear error, before any image is decoded


@pytest.fixture
def flickr(tmp_path) -> Path:
    root = tmp_path / "flickr"
    for i in range(3):
        _jpeg(root / "images" / f"i{i}_b.jpg", color=(i * 60, 0, 0))
    (root / "images" / "broken_b.jpg").write_bytes(b"not an image")
    return root


def _ratings(root: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path = root / "FLICKR-AES_image_labeled_by_each_worker.csv"
    path.write_bytes(("worker, imagePair, score\n" + "\n".join(lines) + "\n").encode(encoding))
    return path


def _cli_error(argv: list[str], caplog) -> str:
    caplog.clear()
    assert cli_main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    return errors[0]


def test_a_ratings_file_that_is_not_utf8_names_the_line(flickr, tmp_path, caplog):
    path = _ratings(flickr, ["A1, i0_b.jpg, 3", "Ämélie, i1_b.jpg, 4"], encoding="latin-1")
    msg = _cli_error(["ingest", "--format", "flickr-aes", "--root", str(flickr), "--out", str(tmp_path / "o")], caplog)
    assert msg.startswith(f"{path}:3: not UTF-8 text (byte 0xc4 at offset ")
    log = tmp_path / "log.csv"
    log.write_bytes("user,image,score\nu1,a.jpg,3\nu2,\xe9t\xe9.jpg,4\n".encode("cp1252"))
    msg = _cli_error(["ingest", "--format", "ratings", "--ratings", str(log), "--images", str(flickr / "images"),
                      "--out", str(tmp_path / "o")], caplog)
    assert msg.startswith(f"{log}:3: not UTF-8 text")


def test_user_ids_that_collide_after_sanitising_fail_before_image_work(flickr, tmp_path):
    # strict + a broken image: an ingest that decoded images first would fail on the image.
    path = _ratings(flickr, ["A.B, broken_b.jpg, 3", "A.B, i0_b.jpg, 3", "A_B, i1_b.jpg, 4", "A/B, i2_b.jpg, 5"])
    with pytest.raises(DataError, match=rf"{path}:5: user ID 'A/B' and 'A.B' \(line 2\) both become the sample key"):
        ingest("flickr-aes", flickr, str(tmp_path / "o"), strict=True)


def test_user_ids_that_are_too_long_fail_before_image_work(flickr, tmp_path):
    long = "W" * 120
    path = _ratings(flickr, ["A1, broken_b.jpg, 3", f"{long}, i0_b.jpg, 3"])
    with pytest.raises(DataError, match=rf"{path}:3: user ID 'W+'... is 120 characters; sample keys allow at most 88"):
        ingest("flickr-aes", flickr, str(tmp_path / "o"), strict=True)


def test_paths_leading_out_of_the_image_folder_are_refused_not_read(flickr, tmp_path):
    _jpeg(flickr / "outside_b.jpg", color=(0, 255, 0))
    os.symlink(flickr / "outside_b.jpg", flickr / "images" / "link_b.jpg")
    _ratings(flickr, ["A1, i0_b.jpg, 3", "A1, ../outside_b.jpg, 4", "A1, link_b.jpg, 5",
                      f"A1, {flickr / 'outside_b.jpg'}, 2", "A1, i1_b.jpg, 1"])
    report = ingest("flickr-aes", flickr, str(tmp_path / "o"))
    assert report["ratings"]["skipped"]["outside_image_folder"] == 3 and report["ratings"]["ingested"] == 2
    assert Dataset.open(str(tmp_path / "o")).load_user("A1").images == ["i0_b.jpg", "i1_b.jpg"]
    with pytest.raises(DataError, match=r":3: image outside its folder: refused image path '../outside_b.jpg'"):
        ingest("flickr-aes", flickr, str(tmp_path / "o2"), strict=True)


def test_a_missing_bucket_is_found_before_any_image(flickr, tmp_path, s3_endpoint, caplog):
    _ratings(flickr, ["A1, broken_b.jpg, 3", "A1, i0_b.jpg, 3"])
    with pytest.raises(StorageError, match="no such bucket: s3://no-such-bucket-xyz"):
        ingest("flickr-aes", flickr, "s3://no-such-bucket-xyz/data", endpoint_url=s3_endpoint, strict=True)
    msg = _cli_error(["ingest", "--format", "flickr-aes", "--root", str(flickr), "--out",
                      "s3://no-such-bucket-xyz/data", "--s3-endpoint", s3_endpoint], caplog)
    assert "create it first" in msg


def test_reader_registry_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown format 'nope'"):
        read_source("nope", tmp_path)
    with pytest.raises(UserError, match="dataset folder does not exist"):
        read_source("para", tmp_path / "missing")
