"""Versioned datasets (issue 11.1): atomic publication, readers pinned to their version,
failed and concurrent re-ingests, explicit version removal, and ``piaa-dist verify``.

Everything runs on the real components: a local folder and moto's S3 server over HTTP; the
endpoint that dies in the middle of an ingest is the ``faulty_proxy`` of conftest.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from piaa_dist.cli import main as cli_main
from piaa_dist.data.ingest import ingest
from piaa_dist.data.stream import Dataset
from piaa_dist.errors import DataError, StorageError

RATINGS = "FLICKR-AES_image_labeled_by_each_worker.csv"


def _scores(world: Path) -> dict[tuple[str, str], int]:
    with open(world / RATINGS, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return {(r[0].strip(), r[1].strip()): int(r[2]) for r in rows}


@pytest.fixture(scope="module")
def changed_world(tiny_world, tmp_path_factory) -> Path:
    """The tiny world with every score changed (s -> 6 - s, and 3 -> 4): a re-ingest's input."""
    out = tmp_path_factory.mktemp("changed") / "world"
    shutil.copytree(tiny_world, out)
    with open(tiny_world / RATINGS, newline="") as f:
        rows = list(csv.reader(f))
    for r in rows[1:]:
        s = int(r[2])
        r[2] = f" {4 if s == 3 else 6 - s}"
    with open(out / RATINGS, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return out


def _which(ds: Dataset, old: dict, new: dict) -> set[str]:
    """Load every user; say whether each rating matches the old or the new input."""
    seen = set()
    for u in ds.users("all"):
        r = ds.load_user(u)
        for img, s in zip(r.images, r.scores):
            got = int(s)
            if got == old[(u, img)] and got != new[(u, img)]:
                seen.add("old")
            elif got == new[(u, img)] and got != old[(u, img)]:
                seen.add("new")
            else:
                seen.add("neither")
    return seen


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path):
    """(dataset URL, endpoint) on a folder or on the local S3 server."""
    if request.param == "local":
        return str(tmp_path / "data"), None
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/data", endpoint


def _verify(url: str, endpoint: str | None, capsys) -> tuple[int, str]:
    argv = ["verify", url] + (["--s3-endpoint", endpoint] if endpoint else [])
    code = cli_main(argv)
    return code, capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# publication


def test_a_reader_keeps_its_version_while_a_new_one_is_published(tiny_world, changed_world, target, capsys):
    url, endpoint = target
    old, new = _scores(tiny_world), _scores(changed_world)
    ingest("flickr-aes", tiny_world, url, endpoint_url=endpoint, shard_size=40)
    reader = Dataset.open(url, endpoint_url=endpoint, cache_users=0)
    ingest("flickr-aes", changed_world, url, endpoint_url=endpoint, shard_size=40)
    # The reader opened before the re-ingest still reads its own version, completely.
    assert _which(reader, old, new) == {"old"}
    # A reader opened now sees the new version.
    fresh = Dataset.open(url, endpoint_url=endpoint, cache_users=0)
    assert fresh.version_id != reader.version_id
    assert _which(fresh, old, new) == {"new"}
    code, out = _verify(url, endpoint, capsys)
    assert code == 0 and f"version {fresh.version_id}" in out


def test_an_ingest_that_dies_midway_leaves_the_published_version_intact(
        tiny_world, changed_world, s3_endpoint, s3_bucket, faulty_proxy, monkeypatch, capsys):
    """The S3 endpoint goes away after a few shard uploads of a re-ingest, then comes back."""
    url = f"s3://{s3_bucket}/data"
    old, new = _scores(tiny_world), _scores(changed_world)
    ingest("flickr-aes", tiny_world, url, endpoint_url=s3_endpoint, shard_size=40)
    # Keep the failure quick: few attempts, little retry time.
    monkeypatch.setenv("PIAA_S3_ATTEMPTS", "2")
    monkeypatch.setenv("PIAA_S3_RETRY_SECONDS", "2")
    faulty_proxy.fail_puts_after = 3
    with pytest.raises(StorageError, match=f"s3://{s3_bucket}/data/"):
        ingest("flickr-aes", changed_world, url, endpoint_url=faulty_proxy.url, shard_size=40, workers=1)
    assert faulty_proxy.down and faulty_proxy.puts > 3
    # The dataset as readers see it is the previous version, whole.
    ds = Dataset.open(url, endpoint_url=s3_endpoint, cache_users=0)
    assert _which(ds, old, new) == {"old"}
    code, out = _verify(url, s3_endpoint, capsys)
    assert code == 0, out
    # The endpoint comes back: re-running the same ingest completes and publishes.
    faulty_proxy.down, faulty_proxy.fail_puts_after = False, None
    report = ingest("flickr-aes", changed_world, url, endpoint_url=faulty_proxy.url, shard_size=40)
    ds = Dataset.open(url, endpoint_url=s3_endpoint, cache_users=0)
    assert ds.version_id == report["dataset_version"] and _which(ds, old, new) == {"new"}
    assert _verify(url, s3_endpoint, capsys)[0] == 0


def test_a_failing_reingest_on_a_folder_publishes_nothing(tiny_world, changed_world, tmp_path):
    """A strict re-ingest that fails on an image after writing shards leaves the old version."""
    url = str(tmp_path / "data")
    old, new = _scores(tiny_world), _scores(changed_world)
    ingest("flickr-aes", tiny_world, url, shard_size=40)
    broken = tmp_path / "broken"
    shutil.copytree(changed_world, broken)
    # The last user's first image becomes unreadable: earlier users' shards are written first.
    last = max(u for u, _ in new)
    image = next(img for (u, img) in new if u == last)
    (broken / "images" / image).write_bytes(b"not an image")
    with pytest.raises(DataError, match="unreadable image.*--strict"):
        ingest("flickr-aes", broken, url, shard_size=40, strict=True, workers=1)
    partial = [p for p in (tmp_path / "data" / "versions").iterdir() if list(p.rglob("*.tar"))]
    assert len(partial) == 2  # the failed ingest did write shards, under its own version
    assert _which(Dataset.open(url, cache_users=0), old, new) == {"old"}


def test_concurrent_ingests_publish_one_complete_version(tiny_world, changed_world, target, capsys):
    url, endpoint = target
    old, new = _scores(tiny_world), _scores(changed_world)
    errors: list[BaseException] = []

    def run(world: Path) -> None:
        try:
            ingest("flickr-aes", world, url, endpoint_url=endpoint, shard_size=40, workers=1)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(w,)) for w in (tiny_world, changed_world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    seen = _which(Dataset.open(url, endpoint_url=endpoint, cache_users=0), old, new)
    assert seen in ({"old"}, {"new"})  # one complete version, never a mix
    assert _verify(url, endpoint, capsys)[0] == 0


# ---------------------------------------------------------------------------------------------
# versions are listed and removed only on request


def test_versions_are_listed_and_removed_only_explicitly(tiny_world, changed_world, target, capsys, caplog):
    url, endpoint = target
    ep = ["--s3-endpoint", endpoint] if endpoint else []
    first = ingest("flickr-aes", tiny_world, url, endpoint_url=endpoint)["dataset_version"]
    second = ingest("flickr-aes", changed_world, url, endpoint_url=endpoint)["dataset_version"]
    assert cli_main(["datasets", url, *ep]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
    assert lines == {first: "complete", second: "published"}
    # The published version cannot be removed.
    caplog.clear()
    assert cli_main(["datasets", url, "--remove", second, *ep]) == 2
    assert any("is the published version" in r.getMessage() for r in caplog.records)
    assert cli_main(["datasets", url, "--remove", first, *ep]) == 0
    assert f"removed {first}" in capsys.readouterr().out
    with pytest.raises(DataError, match=f"no complete version '{first}'"):
        Dataset.open(url, endpoint_url=endpoint, version=first)
    assert _verify(url, endpoint, capsys)[0] == 0


def test_prune_keeps_the_published_the_newest_and_young_incomplete_versions(tiny_world, tmp_path, capsys):
    url = str(tmp_path / "data")
    versions = [ingest("flickr-aes", tiny_world, url)["dataset_version"] for _ in range(3)]
    # A crashed ingest's leftovers: shards, no manifest.
    crashed = tmp_path / "data" / "versions" / "20200101T000000.000000Z-deadbeef"
    (crashed / "shards").mkdir(parents=True)
    (crashed / "shards" / "000000.tar").write_bytes(b"x")
    young = tmp_path / "data" / "versions" / "29990101T000000.000000Z-cafecafe"  # "in progress"
    (young / "shards").mkdir(parents=True)
    (young / "shards" / "000000.tar").write_bytes(b"x")
    assert cli_main(["datasets", url, "--prune", "--keep", "1"]) == 0
    out = capsys.readouterr().out
    remaining = sorted(p.name for p in (tmp_path / "data" / "versions").iterdir())
    assert remaining == sorted([versions[1], versions[2], young.name])
    assert f"removed {versions[0]}" in out and f"removed {crashed.name}" in out
    # Old versions are never removed silently: ingesting again keeps them all.
    ingest("flickr-aes", tiny_world, url)
    assert len(list((tmp_path / "data" / "versions").iterdir())) == 4


def test_a_version_folder_opens_directly_and_the_old_layout_is_refused(tiny_dataset_url, tmp_path):
    ds = Dataset.open(tiny_dataset_url)
    pinned = Dataset.open(str(Path(tiny_dataset_url) / "versions" / ds.version_id))
    assert pinned.users("all") == ds.users("all") and pinned.version_id == ds.version_id
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    table = pa.table({"user": ["A"], "split": ["train"]}).replace_schema_metadata({"version": "1"})
    pq.write_table(table, legacy / "manifest.parquet")
    with pytest.raises(DataError, match="layout version 1 .*re-ingest it"):
        Dataset.open(str(legacy))


# ---------------------------------------------------------------------------------------------
# verify


def test_verify_prints_one_line_and_names_the_first_inconsistency(tiny_world, tmp_path, capsys, caplog):
    url = str(tmp_path / "data")
    report = ingest("flickr-aes", tiny_world, url, shard_size=40)
    code, out = _verify(url, None, capsys)
    assert code == 0
    assert out.strip().splitlines() == [
        f"ok: {report['users']['train'] + report['users']['test']} users, {report['ratings']['ingested']} ratings, "
        f"{report['bytes']} bytes in {report['shards']} shards, version {report['dataset_version']} ({url})"]
    ds = Dataset.open(url)
    version = tmp_path / "data" / "versions" / ds.version_id
    users = ds.users("all")

    def fails(pattern: str) -> None:
        caplog.clear()
        assert cli_main(["verify", url]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "\n" not in errors[0]
        assert re.search(pattern, errors[0]), errors[0]

    # One flipped byte inside the second user's range: names the shard, the range and the user.
    part = ds.parts(users[1])[0]
    shard = version / "shards" / f"{part.shard:06d}.tar"
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[part.offset + 600] ^= 0xFF
    shard.write_bytes(bytes(bad))
    fails(rf"corrupt shard {shard} bytes {part.offset}-{part.offset + part.length - 1} \(user {users[1]}\): sha256")
    # A truncated shard.
    shard.write_bytes(good[: part.offset + part.length // 2])
    fails(rf"corrupt shard {shard}: has \d+ bytes; user {users[1]}'s range ends at")
    # A missing shard.
    shard.unlink()
    fails(rf"missing shard {shard} \(user {users[1]}\)")
    shard.write_bytes(good)
    # An object no user references.
    (version / "shards" / "999999.tar").write_bytes(b"stray")
    fails(r"999999.tar is in the version but no user of the manifest references it")
    (version / "shards" / "999999.tar").unlink()
    # A report that disagrees with the manifest.
    rep = json.loads((version / "ingest_report.json").read_text())
    rep["ratings"]["ingested"] += 1
    (version / "ingest_report.json").write_text(json.dumps(rep))
    fails(r"ingest_report.json says \d+ users and \d+ ratings; the manifest holds")
    # Nothing published at all.
    caplog.clear()
    assert cli_main(["verify", str(tmp_path / "nothing")]) == 2


def test_bad_manifests_are_one_line_errors(tiny_dataset_url, tmp_path):
    """A null in any column, a wrong type or inconsistent parts: the column and row are named."""
    ds = Dataset.open(tiny_dataset_url)
    src = Path(tiny_dataset_url) / "versions" / ds.version_id / "manifest.parquet"
    table = pq.read_table(src)
    meta = table.schema.metadata

    def write(t: pa.Table) -> str:
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        pq.write_table(t.replace_schema_metadata(meta), folder / "manifest.parquet")
        return str(folder)

    i = table.column_names.index("shards")
    nulls = pa.array([None] + table.column("shards").to_pylist()[1:], type=table.schema.field("shards").type)
    with pytest.raises(DataError, match=rf"manifest column 'shards' is null at row 0 \(user '{ds.users('all')[0]}'\)"):
        Dataset.open(write(table.set_column(i, "shards", nulls)))
    j = table.column_names.index("n_ratings")
    with pytest.raises(DataError, match="manifest column 'n_ratings' has type string"):
        Dataset.open(write(table.set_column(j, "n_ratings", pa.array(["x"] * table.num_rows))))
    more = pa.array([v + 1 for v in table.column("n_ratings").to_pylist()], pa.int64())
    with pytest.raises(DataError, match="says n_ratings .* but its parts hold"):
        Dataset.open(write(table.set_column(j, "n_ratings", more)))
    with pytest.raises(DataError, match="manifest lacks column"):
        Dataset.open(write(table.drop_columns(["sha256"])))
