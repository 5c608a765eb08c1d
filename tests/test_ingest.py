"""Ingestion: packed shards, manifest and report; every quirk of the published files; determinism.

The dataset layout is versioned (``_CURRENT`` names ``versions/<id>/``); the helpers below find
the published version's folder the way a reader does.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from piaa_dist.cli import main as cli_main
from piaa_dist.data.ingest import MANIFEST, REPORT, _write_tar_with_tarfile, format_report, ingest, write_tar
from piaa_dist.data.layout import POINTER
from piaa_dist.data.readers import SKIP_REASONS, read_test_list
from piaa_dist.data.stream import parse_shard
from piaa_dist.errors import DataError

RATINGS = "FLICKR-AES_image_labeled_by_each_worker.csv"


def _csv_ratings(world: Path) -> list[tuple[str, str, int]]:
    with open(world / RATINGS, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [(r[0].strip(), r[1].strip(), int(r[2])) for r in rows]


def _test_ids(world: Path) -> set[str]:
    return {line.strip() for line in (world / "test_workers.csv").read_text().splitlines()[1:]}


def _version(root: Path) -> Path:
    """Folder of the published version of the dataset at ``root``."""
    return root / "versions" / json.loads((root / POINTER).read_text())["version"]


def _manifest(root: Path):
    return pq.read_table(_version(root) / MANIFEST)


def _report(root: Path) -> dict:
    return json.loads((_version(root) / REPORT).read_text())


def _shard_path(root: Path, shard: int) -> Path:
    return _version(root) / "shards" / f"{shard:06d}.tar"


def _ranges(root: Path, row: dict) -> list[bytes]:
    """The byte range of each part of a manifest row."""
    out = []
    for shard, off, length in zip(row["shards"], row["offsets"], row["lengths"]):
        out.append(_shard_path(root, shard).read_bytes()[off : off + length])
    return out


def _shard_samples(root: Path, manifest) -> list[dict]:
    out = []
    for row in manifest.to_pylist():
        for data in _ranges(root, row):
            out.extend(parse_shard(data, row["user"]))
    return out


def _assert_invariants(report: dict) -> None:
    for part in (report, report["ratings"], report["test_workers"]):
        assert part["read"] == part["ingested"] + sum(part["skipped"].values())
    assert set(report["skipped"]) == set(SKIP_REASONS)


# ---------------------------------------------------------------------------------------------
# the synthetic world


def test_synth_world_ingests_completely(tiny_world, tiny_dataset_url):
    root = Path(tiny_dataset_url)
    report = _report(root)
    _assert_invariants(report)
    ratings = _csv_ratings(tiny_world)
    assert report["source"] == "synth" and report["has_truth"]
    assert report["ratings"]["read"] == report["ratings"]["ingested"] == len(ratings)
    assert sum(report["skipped"].values()) == 0

    table = _manifest(root)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["source"] == "synth" and meta["version"] == "2" and meta["max_side"] == "256"
    assert [f.name for f in table.schema] == [
        "user", "user_key", "split", "n_ratings", "has_truth", "shards", "offsets", "lengths", "samples", "sha256"]
    assert str(table.schema.field("n_ratings").type) == "int64"
    assert str(table.schema.field("shards").type) == "list<element: int32>"
    rows = table.to_pylist()
    assert [r["user"] for r in rows] == sorted(r["user"] for r in rows)
    assert {r["user"] for r in rows if r["split"] == "test"} == _test_ids(tiny_world)
    for r in rows:
        assert r["has_truth"]
        assert sum(r["samples"]) == r["n_ratings"]
        for data, digest in zip(_ranges(root, r), r["sha256"]):
            assert hashlib.sha256(data).digest() == digest

    # Every rating arrives exactly once, with its score and the sidecar's truth.
    samples = _shard_samples(root, table)
    got = Counter((s["json"]["user"], s["json"]["image"], s["json"]["score"]) for s in samples)
    assert got == Counter(ratings)
    truth = {}
    with open(tiny_world / "latent_scores.csv", newline="") as f:
        for row in csv.DictReader(f):
            truth[(row["worker"], row["imagePair"])] = (float(row["latent"]), float(row["average_latent"]))
    for s in samples:
        m = s["json"]
        assert (m["latent"], m["average_latent"]) == pytest.approx(truth[(m["user"], m["image"])])
        assert "." not in s["__key__"] and s["__key__"].startswith(m["user"] + "_")
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.format == "JPEG" and max(im.size) <= 256


def test_shards_are_plain_webdataset(tiny_dataset_url):
    """The packed shards read with WebDataset's own pipeline (what any other consumer would use)."""
    import webdataset as wds

    root = Path(tiny_dataset_url)
    rows = _manifest(root).to_pylist()
    urls = sorted(str(p) for p in (_version(root) / "shards").iterdir())
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False).decode("pil")
    n = 0
    for sample in ds:
        assert sample["jpg"].mode == "RGB" and 1 <= sample["json"]["score"] <= 5
        n += 1
    assert n == sum(r["n_ratings"] for r in rows)


def test_tar_writer_matches_the_standard_library():
    """Our USTAR writer gives the bytes Python's tarfile gives, and tarfile reads them back."""
    import tarfile

    for n in (0, 1, 5):
        samples = [(f"AXYZ_{i:06d}", bytes(range(i % 256)) * (i + 3), b'{"score": 3}') for i in range(n)]
        data = write_tar(samples)
        assert data == _write_tar_with_tarfile(samples)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = tar.getmembers()
            assert [m.name for m in members] == [f"{k}.{e}" for k, _, _ in samples for e in ("jpg", "json")]
            assert all(m.mtime == members[0].mtime and m.uid == 0 and m.mode == 0o444 for m in members)
            for k, jpg, _ in samples:
                assert tar.extractfile(f"{k}.jpg").read() == jpg


def test_reingesting_gives_identical_shards(tiny_world, tiny_dataset_url, tmp_path):
    ingest("flickr-aes", tiny_world, str(tmp_path), workers=1, shard_size=7)
    ingest("flickr-aes", tiny_world, str(tmp_path / "again"), workers=3, shard_size=7)
    # Cut into several partitions (what N workers would each write): still the same bytes.
    ingest("flickr-aes", tiny_world, str(tmp_path / "parts"), workers=2, shard_size=7, partitions=3)
    # Without the encoded-image store (every shared image re-encoded): still the same bytes.
    ingest("flickr-aes", tiny_world, str(tmp_path / "nostore"), workers=2, shard_size=7, partitions=3,
           encode_store=False)
    a = _manifest(tmp_path).to_pylist()
    assert _report(tmp_path / "parts")["partitions"] == 3
    assert _report(tmp_path / "parts")["image_store"]["hits"] > 0
    assert _report(tmp_path / "nostore")["image_store"]["hits"] == 0
    for other in (tmp_path / "again", tmp_path / "parts", tmp_path / "nostore"):
        assert _manifest(other).to_pylist() == a
        assert (_version(other) / MANIFEST).read_bytes() == (_version(tmp_path) / MANIFEST).read_bytes()
        shards = sorted(p.name for p in (_version(tmp_path) / "shards").iterdir())
        assert shards == sorted(p.name for p in (_version(other) / "shards").iterdir())
        for name in shards:
            mine, theirs = _version(tmp_path) / "shards" / name, _version(other) / "shards" / name
            assert mine.read_bytes() == theirs.read_bytes()
    for r in a:
        assert len(r["shards"]) == -(-r["n_ratings"] // 7) and max(r["samples"]) <= 7
    # Shard size does not change the samples, only how they are cut.
    base = _manifest(Path(tiny_dataset_url)).to_pylist()
    assert [r["n_ratings"] for r in base] == [r["n_ratings"] for r in a]


def test_ingest_to_s3_matches_local(tiny_world, tiny_dataset_url, s3_endpoint, s3_bucket):
    import boto3

    report = ingest("flickr-aes", tiny_world, f"s3://{s3_bucket}/data", endpoint_url=s3_endpoint, workers=2)
    _assert_invariants(report)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    local = _manifest(Path(tiny_dataset_url)).to_pylist()
    vid = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"data/{POINTER}")["Body"].read())["version"]
    assert vid == report["dataset_version"]
    remote_bytes = s3.get_object(Bucket=s3_bucket, Key=f"data/versions/{vid}/{MANIFEST}")["Body"].read()
    remote = pq.read_table(io.BytesIO(remote_bytes)).to_pylist()
    assert remote == local  # same ranges and the same sha256: byte-identical shards
    shards = {f"data/versions/{vid}/shards/{i:06d}.tar" for r in local for i in r["shards"]}
    assert shards | {f"data/versions/{vid}/{MANIFEST}", f"data/versions/{vid}/{REPORT}", f"data/{POINTER}"} == keys
    assert report["objects"] == len(keys)


# ---------------------------------------------------------------------------------------------
# quirks and bad input (a hand-built FLICKR-AES folder)


def _jpeg(path: Path, size=(40, 30), color=(200, 100, 50)) -> None:
    Image.new("RGB", size, color).save(path, "JPEG", quality=90)


@pytest.fixture
def messy(tmp_path) -> Path:
    root = tmp_path / "flickr"
    (root / "images").mkdir(parents=True)
    for i in range(4):
        _jpeg(root / "images" / f"farm1_1_{i}_aa_b.jpg", color=(i * 50, 100, 50))
    _jpeg(root / "images" / "big_b.jpg", size=(600, 300))
    full = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(full, "JPEG")
    (root / "images" / "truncated_b.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (root / "images" / "not_an_image_b.jpg").write_bytes(b"hello")
    lines = [
        "worker, imagePair, score",                         # 1
        "AAAAAAAAAAAAA1, farm1_1_0_aa_b.jpg, 4",            # 2 ok
        "AAAAAAAAAAAAA1, farm1_1_1_aa_b.jpg, 5",            # 3 ok
        "AAAAAAAAAAAAA1, farm1_1_0_aa_b.jpg, 2",            # 4 duplicate (same worker+image)
        "AAAAAAAAAAAAA1, farm1_1_9_aa_b.jpg, 3",            # 5 missing image
        "AAAAAAAAAAAAA1, truncated_b.jpg, 3",               # 6 unreadable (truncated)
        "AAAAAAAAAAAAA2, not_an_image_b.jpg, 3",            # 7 unreadable (not a JPEG)
        "AAAAAAAAAAAAA2, farm1_1_2_aa_b.jpg, 6",            # 8 bad score (out of range)
        "AAAAAAAAAAAAA2, farm1_1_2_aa_b.jpg, x",            # 9 bad score (not a number)
        "AAAAAAAAAAAAA2, farm1_1_3_aa_b.jpg, 3.5",          # 10 bad score (not an integer)
        "",                                                 # 11 blank: not a record
        "AAAAAAAAAAAAA2, farm1_1_2_aa_b.jpg, 2.0",          # 12 ok ("2.0" is the integer 2)
        "AAAAAAAAAAAAA2, big_b.jpg, 1",                     # 13 ok (resized)
        ", farm1_1_3_aa_b.jpg, 3",                          # 14 malformed (no worker)
        "AAAAAAAAAAAAA3, farm1_1_3_aa_b.jpg,",              # 15 bad score (empty)
        "AAAAAAAAAAAAA3, farm1_1_3_aa_b.jpg, 1",            # 16 ok
    ]
    (root / RATINGS).write_text("\n".join(lines) + "\n")
    # The published test list: header ID; one unknown worker; one repeated.
    (root / "test_workers.csv").write_text("ID\nAAAAAAAAAAAAA2\nAZZZZZZZZZZZZZ\nAAAAAAAAAAAAA2\n")
    return root


def test_every_quirk_is_counted(messy, tmp_path):
    report = ingest("flickr-aes", messy, str(tmp_path / "out"), max_side=100)
    _assert_invariants(report)
    assert report["source"] == "flickr-aes" and not report["has_truth"]
    assert report["ratings"]["read"] == 14  # 15 lines after the header, one of them blank
    assert report["ratings"]["ingested"] == 5
    assert report["ratings"]["skipped"] == {
        "missing_image": 1, "unreadable_image": 2, "duplicate_row": 1, "bad_score": 4,
        "unknown_test_worker": 0, "malformed_row": 1, "outside_image_folder": 0, "too_many_pixels": 0,
    }
    assert report["test_workers"] == {
        "read": 3, "ingested": 1,
        "skipped": {r: {"unknown_test_worker": 1, "duplicate_row": 1}.get(r, 0) for r in SKIP_REASONS},
    }
    assert report["read"] == 17 and report["ingested"] == 6
    # Examples name the file and the line.
    ex = report["examples"]
    assert ex["duplicate_row"] == [f"{messy / RATINGS}:4: AAAAAAAAAAAAA1 rated farm1_1_0_aa_b.jpg again",
                                   f"{messy / 'test_workers.csv'}:4: test worker AAAAAAAAAAAAA2 listed again"]
    assert ex["missing_image"][0].startswith(f"{messy / RATINGS}:5: ")
    assert [e.split(": ")[0] for e in ex["unreadable_image"]] == [f"{messy / RATINGS}:6", f"{messy / RATINGS}:7"]
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in ex["bad_score"]] == ["8", "9", "10", "15"]
    assert ex["unknown_test_worker"] == [f"{messy / 'test_workers.csv'}:3: test worker AZZZZZZZZZZZZZ has no ratings"]

    rows = {r["user"]: r for r in _manifest(tmp_path / "out").to_pylist()}
    assert {u: (r["split"], r["n_ratings"]) for u, r in rows.items()} == {
        "AAAAAAAAAAAAA1": ("train", 2), "AAAAAAAAAAAAA2": ("test", 2), "AAAAAAAAAAAAA3": ("train", 1)}
    samples = _shard_samples(tmp_path / "out", _manifest(tmp_path / "out"))
    got = {(s["json"]["user"], s["json"]["image"]): s for s in samples}
    assert got[("AAAAAAAAAAAAA2", "farm1_1_2_aa_b.jpg")]["json"]["score"] == 2
    assert got[("AAAAAAAAAAAAA1", "farm1_1_0_aa_b.jpg")]["json"]["score"] == 4  # first row wins
    with Image.open(io.BytesIO(got[("AAAAAAAAAAAAA2", "big_b.jpg")]["jpg"])) as im:
        assert im.size == (100, 50)
    assert got[("AAAAAAAAAAAAA1", "farm1_1_0_aa_b.jpg")]["json"]["latent"] is None
    text = format_report(report)
    assert "skipped: bad score" in text and "unknown test worker" in text


def test_strict_names_the_first_bad_row(messy, tmp_path):
    with pytest.raises(DataError, match=rf"{RATINGS}:4: duplicate row: AAAAAAAAAAAAA1 rated farm1_1_0_aa_b.jpg again"):
        ingest("flickr-aes", messy, str(tmp_path / "out"), strict=True)
    assert not (tmp_path / "out" / POINTER).exists() and not list((tmp_path / "out").rglob(MANIFEST))
    # Image problems are found after the row checks; the first one is still named by row.
    lines = (messy / RATINGS).read_text().splitlines()
    keep = [lines[i] for i in (0, 1, 2, 4, 5, 11)]
    (messy / RATINGS).write_text("\n".join(keep) + "\n")
    (messy / "test_workers.csv").write_text("ID\nAAAAAAAAAAAAA2\n")
    with pytest.raises(DataError, match=rf"{RATINGS}:4: missing image: no image .*farm1_1_9_aa_b.jpg"):
        ingest("flickr-aes", messy, str(tmp_path / "out"), strict=True)


def test_strict_accepts_clean_input(tiny_world, tmp_path):
    report = ingest("flickr-aes", tiny_world, str(tmp_path), strict=True)
    assert sum(report["skipped"].values()) == 0


def test_test_list_formats(tmp_path):
    (tmp_path / "published.csv").write_text("ID\nA1\nA2\n")
    (tmp_path / "plain.txt").write_text("A1\n\n  A2  \n")
    (tmp_path / "bom.csv").write_text("\ufeffID\r\nA1\r\nA2\r\n")
    for name in ("published.csv", "plain.txt", "bom.csv"):
        entries, skips = read_test_list(tmp_path / name)
        assert [e.user for e in entries] == ["A1", "A2"] and not skips, name


def test_missing_inputs_are_clear_errors(tmp_path, messy):
    with pytest.raises(DataError, match="dataset folder does not exist"):
        ingest("flickr-aes", tmp_path / "nope", str(tmp_path / "out"))
    with pytest.raises(DataError, match="FLICKR-AES ratings file not found"):
        ingest("flickr-aes", tmp_path, str(tmp_path / "out"))
    (messy / RATINGS).write_text("user,img,rating\nA,b,3\n")
    with pytest.raises(DataError, match=r":1: header .* lacks worker/imagePair/score"):
        ingest("flickr-aes", messy, str(tmp_path / "out"))
    (messy / RATINGS).write_text("worker, imagePair, score\nA1, nothing_b.jpg, 3\n")
    with pytest.raises(DataError, match="no rating could be ingested"):
        ingest("flickr-aes", messy, str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# AADB


def test_aadb_batch_layout(tmp_path):
    root = tmp_path / "aadb"
    (root / "images").mkdir(parents=True)
    names = [f"farm{i}_{1000 + i}_{77 + i}_b.jpg" for i in range(12)]
    for i, n in enumerate(names):
        _jpeg(root / "images" / n, color=(10 * i, 20, 30))
    header = ["HITId", "AssignmentId", "WorkerId"]
    header += [f"Input.image_url{k}" for k in range(1, 11)]
    header += [f"Answer.overallScore{k}" for k in range(1, 11)]
    header += [f"Answer.colorHarmony{k}" for k in range(1, 11)] + ["Answer.comment"]

    def row(worker, imgs, scores, comment=""):
        urls = [f"http://farm1.staticflickr.com/123/{n}" if n else "" for n in imgs]
        urls += [""] * (10 - len(urls))
        sc = [str(s) for s in scores] + [""] * (10 - len(scores))
        return ["H", "A", worker] + urls + sc + ["0"] * 10 + [comment]

    rows = [
        row("W0000000000001", names[:10], [1, 2, 3, 4, 5, 1, 2, 3, 4, 5], comment="nice\nset"),  # spans 2 lines
        row("W0000000000002", names[2:12], [3] * 9 + ["0"]),    # slot 10: bad score
        row("W0000000000001", names[9:12] + ["missing_b.jpg"], [5, 4, 3, 2]),  # slot 1 duplicate, slot 4 missing
        row("", names[:1], [3]),                                 # no WorkerId
    ]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header] + rows)
    (root / "AllinAll.csv").write_text(buf.getvalue())
    (tmp_path / "test.txt").write_text("W0000000000002\n")

    report = ingest("aadb", root, str(tmp_path / "out"), test_workers=tmp_path / "test.txt")
    _assert_invariants(report)
    assert report["source"] == "aadb"
    assert report["ratings"]["read"] == 10 + 10 + 4 + 1
    assert report["ratings"]["ingested"] == 10 + 9 + 2
    s = report["ratings"]["skipped"]
    assert (s["bad_score"], s["duplicate_row"], s["missing_image"], s["malformed_row"]) == (1, 1, 1, 1)
    csv_path = root / "AllinAll.csv"
    # Rows are named by the line they start on: the first record spans lines 2-3.
    assert report["examples"]["bad_score"] == [f"{csv_path}:4: slot 10: score '0' is not an integer 1-5"]
    assert report["examples"]["duplicate_row"][0].startswith(f"{csv_path}:5: slot 1: W0000000000001 rated {names[9]}")
    rows_m = {r["user"]: r for r in _manifest(tmp_path / "out").to_pylist()}
    assert {u: (r["split"], r["n_ratings"]) for u, r in rows_m.items()} == {
        "W0000000000001": ("train", 12), "W0000000000002": ("test", 9)}
    samples = _shard_samples(tmp_path / "out", _manifest(tmp_path / "out"))
    got = {(x["json"]["user"], x["json"]["image"]): x["json"]["score"] for x in samples}
    assert got[("W0000000000001", names[4])] == 5 and got[("W0000000000001", names[10])] == 4
    with pytest.raises(DataError, match=r"AllinAll.csv:4: bad score: slot 10"):
        ingest("aadb", root, str(tmp_path / "strict"), strict=True)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_synth_and_ingest(tmp_path, capsys):
    world = tmp_path / "w"
    assert cli_main(["synth", "--out", str(world), "--users", "5", "--images", "40", "--ratings", "12", "15",
                     "--image-size", "24"]) == 0
    out = capsys.readouterr().out
    assert "oracle" in out and "average user" in out and "5 users (4 train, 1 test)" in out
    assert cli_main(["ingest", "--format", "flickr-aes", "--root", str(world), "--out", str(tmp_path / "d"),
                     "--max-side", "16", "--test-workers", str(world / "test_workers.csv")]) == 0
    out = capsys.readouterr().out
    assert "ingested" in out and "skipped: missing image" in out and str(_version(tmp_path / "d") / REPORT) in out
    assert (_version(tmp_path / "d") / REPORT).is_file()
    # A user error is one line and exit code 2, not a traceback.
    assert cli_main(["ingest", "--format", "aadb", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2


def test_cli_ingest_to_s3(tiny_world, s3_endpoint, s3_bucket, capsys):
    url = f"s3://{s3_bucket}/w"
    assert cli_main(["ingest", "--format", "flickr-aes", "--root", str(tiny_world), "--out", url,
                     "--s3-endpoint", s3_endpoint]) == 0
    out = capsys.readouterr().out
    assert f"{url}/versions/" in out and f"/{REPORT}" in out


def test_copy_of_world_without_sidecar_is_plain_flickr(tiny_world, tmp_path):
    root = tmp_path / "plain"
    shutil.copytree(tiny_world, root)
    (root / "latent_scores.csv").unlink()
    report = ingest("flickr-aes", root, str(tmp_path / "out"))
    assert report["source"] == "flickr-aes" and not report["has_truth"]


def test_large_photos_are_reduced_and_truncation_still_detected(tmp_path):
    """Full-size JPEGs decode at reduced scale (draft mode) yet a truncated one still fails."""
    import numpy as np

    from piaa_dist.data.images import process_image

    pixels = (np.random.default_rng(0).random((900, 1200, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=90)
    out = process_image(tmp_path / "big.jpg", 200, 90)
    with Image.open(io.BytesIO(out)) as im:
        assert im.size == (200, 150)
    assert process_image(tmp_path / "big.jpg", 200, 90) == out  # deterministic
    data = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(OSError, match="truncated"):
        process_image(tmp_path / "cut.jpg", 200, 90)
