"""Dataset + task stream: S3 round trip, rank-independent meta-batches, bad shards, decoding."""

from __future__ import annotations

import csv
import io
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from piaa_dist.data.decode import IMAGENET_MEAN, IMAGENET_STD, augment_side, decode, decode_batch
from piaa_dist.data.ingest import ingest
from piaa_dist.data.stream import (
    Dataset,
    TaskStream,
    make_task,
    sample_meta_batch,
    split_indices,
    split_validation_users,
    task_sizes,
    user_tensors,
)
from piaa_dist.errors import DataError

KW = dict(meta_batch=4, shots=4, query_size=6, image_size=32, augment=True, seed=3)


def _csv_ratings(world: Path) -> Counter:
    with open(world / "FLICKR-AES_image_labeled_by_each_worker.csv", newline="") as f:
        return Counter((r[0].strip(), r[1].strip(), int(r[2])) for r in list(csv.reader(f))[1:])


@pytest.fixture(scope="module")
def local(tiny_dataset_url):
    return Dataset.open(tiny_dataset_url)


# ---------------------------------------------------------------------------------------------
# the S3 round trip


def test_synth_to_s3_to_stream_round_trip(tiny_world, tiny_s3_dataset_url, s3_endpoint):
    ds = Dataset.open(tiny_s3_dataset_url, endpoint_url=s3_endpoint)
    assert ds.source == "synth" and ds.version == "2" and ds.max_side == 256
    test_ids = set((tiny_world / "test_workers.csv").read_text().split()[1:])
    assert set(ds.users("test")) == test_ids
    assert len(ds.users("train")) == 8 and ds.users("all") == sorted(ds.users("train") + ds.users("test"))
    # Every rating arrives exactly once.
    got = Counter()
    for u in ds.users("all"):
        r = ds.load_user(u)
        assert len(r) == ds.n_ratings(u) == len(r.jpegs) == len(r.scores)
        assert r.scores.dtype == np.float32 and r.latent is not None and r.average_latent is not None
        got.update((u, img, int(s)) for img, s in zip(r.images, r.scores))
    assert got == _csv_ratings(tiny_world)
    users = ds.users("train")
    a = TaskStream(ds, users, rank=0, world_size=1, num_steps=2, **KW)
    for step, tasks in a:
        assert [t.user for t in tasks] == sample_meta_batch(users, step, 4, 3)
        for t in tasks:
            assert t.support[0].shape == (4, 3, 32, 32) and t.query[0].shape == (6, 3, 32, 32)


def test_s3_and_local_streams_are_identical(tiny_s3_dataset_url, s3_endpoint, local):
    remote = Dataset.open(tiny_s3_dataset_url, endpoint_url=s3_endpoint)
    users = local.users("train")
    a = TaskStream(local, users, rank=0, world_size=1, **KW).tasks(5)
    b = TaskStream(remote, users, rank=0, world_size=1, **KW).tasks(5)
    for x, y in zip(a, b):
        assert x.user == y.user
        assert torch.equal(x.support[0], y.support[0]) and torch.equal(x.query[1], y.query[1])


# ---------------------------------------------------------------------------------------------
# determinism and rank independence


def _flatten(tasks):
    return [(t.user, t.support[0], t.support[1], t.query[0], t.query[1]) for t in tasks]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(_flatten(a), _flatten(b)):
        assert x[0] == y[0]
        for p, q in zip(x[1:], y[1:]):
            assert torch.equal(p, q)


def test_one_and_two_ranks_see_the_same_global_batch(local):
    users = local.users("train")
    one = TaskStream(local, users, rank=0, world_size=1, num_steps=6, **KW)
    r0 = TaskStream(local, users, rank=0, world_size=2, num_steps=6, **KW)
    r1 = TaskStream(local, users, rank=1, world_size=2, num_steps=6, **KW)
    for (s, t1), (s0, ta), (s1, tb) in zip(one, r0, r1):
        assert s == s0 == s1
        assert {t.user for t in ta}.isdisjoint({t.user for t in tb})
        merged = [None] * len(t1)
        merged[0::2], merged[1::2] = ta, tb
        _assert_same(t1, merged)


def test_stream_is_reproducible_and_resumable(tiny_dataset_url):
    users = Dataset.open(tiny_dataset_url).users("train")
    # Fresh datasets (cold caches), user order shuffled, prefetch on/off: same tasks.
    full = list(TaskStream(Dataset.open(tiny_dataset_url), users, rank=0, world_size=1, num_steps=5, **KW))
    again = list(TaskStream(Dataset.open(tiny_dataset_url), users[::-1], rank=0, world_size=1, num_steps=5,
                            prefetch=0, **KW))
    resumed = list(TaskStream(Dataset.open(tiny_dataset_url), users, rank=0, world_size=1, start_step=3,
                              num_steps=2, **KW))
    assert [s for s, _ in full] == [0, 1, 2, 3, 4] and [s for s, _ in resumed] == [3, 4]
    for (_, a), (_, b) in zip(full, again):
        _assert_same(a, b)
    for (_, a), (_, b) in zip(full[3:], resumed):
        _assert_same(a, b)
    # A different seed changes the batches.
    other = TaskStream(Dataset.open(tiny_dataset_url), users, rank=0, world_size=1,
                       **{**KW, "seed": 4}).tasks(0)
    assert [t.user for t in other] != [t.user for t in full[0][1]] or not torch.equal(
        other[0].support[0], full[0][1][0].support[0])


def test_sample_meta_batch_covers_users_evenly():
    users = [f"U{i:02d}" for i in range(10)]
    seen = Counter()
    for step in range(2):  # 10 // 4 = 2 steps per epoch
        batch = sample_meta_batch(users, step, 4, seed=0)
        assert len(set(batch)) == 4
        seen.update(batch)
    assert len(seen) == 8 and max(seen.values()) == 1  # one epoch: nobody twice
    assert sample_meta_batch(users, 7, 4, seed=0) == sample_meta_batch(users, 7, 4, seed=0)
    with pytest.raises(ValueError, match="at least that many users"):
        sample_meta_batch(users[:3], 0, 4, seed=0)


def test_make_task_splits_and_targets(local):
    u = local.users("train")[0]
    r = local.load_user(u)
    t = make_task(r, shots=5, query_size=8, seed=1, step=2, image_size=24, augment=False)
    xs, ys = t.support
    xq, yq = t.query
    assert xs.shape == (5, 3, 24, 24) and xq.shape == (8, 3, 24, 24)
    assert xs.dtype == torch.float32 and ys.dtype == torch.float32
    # Targets are score / 5 and come from this user's scores; support and query are disjoint.
    allowed = set((r.scores / 5).round(4).tolist())
    assert set(ys.numpy().round(4).tolist()) <= allowed and set(yq.numpy().round(4).tolist()) <= allowed
    perm_rows = {decode(j, 24).numpy().tobytes(): i for i, j in enumerate(r.jpegs)}
    sup = {perm_rows[x.numpy().tobytes()] for x in xs}
    qry = {perm_rows[x.numpy().tobytes()] for x in xq}
    assert len(sup) == 5 and len(qry) == 8 and sup.isdisjoint(qry)
    for x, y in zip(xs, ys):
        assert float(y) == pytest.approx(r.scores[perm_rows[x.numpy().tobytes()]] / 5)
    # Another step gives another split.
    t2 = make_task(r, shots=5, query_size=8, seed=1, step=3, image_size=24, augment=False)
    assert not torch.equal(t2.support[0], xs)


def test_users_with_few_ratings_follow_the_80_percent_rule():
    assert task_sizes(100, 10, 20) == (10, 20)
    assert task_sizes(15, 10, 20) == (10, 5)
    assert task_sizes(10, 10, 20) == (8, 2)  # n <= shots: support = 80%
    assert task_sizes(2, 10, 20) == (1, 1)
    with pytest.raises(ValueError, match="at least 2 ratings"):
        task_sizes(1, 10, 20)


def test_validation_split_is_seeded_and_disjoint():
    users = [f"U{i}" for i in range(10)]
    rest, val = split_validation_users(users, 3, seed=0)
    assert len(val) == 3 and set(rest) | set(val) == set(users) and not set(rest) & set(val)
    assert split_validation_users(users[::-1], 3, seed=0) == (rest, val)
    assert split_validation_users(users, 3, seed=1) != (rest, val)


def test_eval_split_helpers(local):
    u = local.users("test")[0]
    r = local.load_user(u)
    tr, te = split_indices(len(r), 10, seed=0, user=u, repeat=0)
    assert len(tr) == 10 and len(te) == len(r) - 10 and not set(tr) & set(te)
    tr2, _ = split_indices(len(r), 10, seed=0, user=u, repeat=1)
    assert set(tr2) != set(tr)
    x, y = user_tensors(r, tr, image_size=16)
    assert x.shape == (10, 3, 16, 16) and torch.allclose(y, torch.from_numpy(r.scores[tr] / 5))
    with pytest.raises(DataError, match="test remainder"):
        split_indices(10, 10, seed=0, user=u, repeat=0)



def test_each_user_knows_its_split_and_whether_it_carries_truth(local):
    """``split_of`` and ``has_truth`` agree with the dataset's own lists (the synthetic world
    carries the truth sidecar for every user)."""
    test, train = local.users("test"), local.users("train")
    assert test and train
    assert [local.split_of(u) for u in test] == ["test"] * len(test)
    assert [local.split_of(u) for u in train] == ["train"] * len(train)
    assert all(local.has_truth(u) for u in test + train)
    assert local.load_user(test[0]).latent is not None

# ---------------------------------------------------------------------------------------------
# bad data


def test_missing_and_corrupt_shards_name_the_shard(tiny_world, s3_endpoint, s3_bucket):
    import boto3

    url = f"s3://{s3_bucket}/d"
    # Shards of at most 40 samples: every tiny-world user (24-32 ratings) gets a shard of its own.
    ingest("flickr-aes", tiny_world, url, endpoint_url=s3_endpoint, shard_size=40)
    ds = Dataset.open(url, endpoint_url=s3_endpoint, cache_users=0)
    users = ds.users("train")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    gone, bad = ds.shard_urls(users[0])[0], ds.shard_urls(users[1])[0]
    assert len({gone, bad, ds.shard_urls(users[2])[0]}) == 3
    s3.delete_object(Bucket=s3_bucket, Key=gone.split(f"s3://{s3_bucket}/", 1)[1])
    key = bad.split(f"s3://{s3_bucket}/", 1)[1]
    data = bytearray(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    data[700] ^= 0xFF  # one flipped byte inside the first image
    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))
    with pytest.raises(DataError, match=f"missing shard {gone}"):
        ds.load_user(users[0])
    with pytest.raises(DataError, match=rf"corrupt shard {bad} bytes \d+-\d+ \(user {users[1]}\): sha256"):
        ds.load_user(users[1])
    # The stream surfaces the same error for a batch that needs the user.
    step = next(s for s in range(50) if users[0] in sample_meta_batch(users, s, 4, 0)
                and users[1] not in sample_meta_batch(users, s, 4, 0))
    stream = TaskStream(ds, users, rank=0, world_size=1, **{**KW, "seed": 0})
    with pytest.raises(DataError, match="missing shard"):
        stream.tasks(step)
    ds.load_user(users[2])  # others are unaffected


def test_transient_s3_faults_while_streaming_are_retried(tiny_world, s3_endpoint, s3_bucket, faulty_proxy):
    url = f"s3://{s3_bucket}/d"
    ingest("flickr-aes", tiny_world, url, endpoint_url=s3_endpoint)
    faulty_proxy.match = ".tar"
    ds = Dataset.open(url, endpoint_url=faulty_proxy.url)
    ds.store.backoff = 0.01
    users = ds.users("train")
    expected = Dataset.open(url, endpoint_url=s3_endpoint).load_user(users[0])
    faulty_proxy.faults = ["503", "truncate", "503"]
    got = ds.load_user(users[0])
    assert got.images == expected.images and got.jpegs == expected.jpegs
    assert faulty_proxy.gets == 4 and faulty_proxy.faults == []


def test_no_manifest_is_a_clear_error(tmp_path, s3_endpoint, s3_bucket):
    with pytest.raises(DataError, match=r"no dataset at .*_CURRENT not found.*piaa-dist ingest"):
        Dataset.open(str(tmp_path))
    with pytest.raises(DataError, match=f"s3://{s3_bucket}/none/_CURRENT not found"):
        Dataset.open(f"s3://{s3_bucket}/none", endpoint_url=s3_endpoint)
    (tmp_path / "manifest.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        Dataset.open(str(tmp_path))


def test_unknown_user_and_pickling(local):
    with pytest.raises(DataError, match="'nobody' is not in the manifest"):
        local.load_user("nobody")
    clone = pickle.loads(pickle.dumps(local))
    u = local.users("train")[0]
    assert clone.load_user(u).images == local.load_user(u).images


def test_cache_is_bounded(tiny_dataset_url):
    ds = Dataset.open(tiny_dataset_url, cache_users=2)
    for u in ds.users("train")[:4]:
        ds.load_user(u)
    assert list(ds._cache) == ds.users("train")[2:4]


# ---------------------------------------------------------------------------------------------
# decoding


def _jpeg(size=(50, 40)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_decode_normalizes_and_resizes():
    white = io.BytesIO()
    Image.new("RGB", (30, 20), (255, 255, 255)).save(white, "PNG")
    x = decode(white.getvalue(), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    grey = io.BytesIO()
    Image.new("L", (8, 8), 128).save(grey, "JPEG")
    assert decode(grey.getvalue(), 8).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="cannot decode image"):
        decode(b"not a jpeg", 8)


def test_augmentation_is_driven_by_the_generator():
    jpeg = _jpeg()
    assert augment_side(224) == 256 and augment_side(32) == 37
    a = decode(jpeg, 32, True, torch.Generator().manual_seed(5))
    b = decode(jpeg, 32, True, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    outs = {decode(jpeg, 32, True, torch.Generator().manual_seed(s)).numpy().tobytes() for s in range(12)}
    assert len(outs) > 4  # crops and flips vary with the seed
    plain = decode(jpeg, 32, False)
    assert not any(plain.numpy().tobytes() == o for o in outs)
    batch = decode_batch([jpeg, jpeg], 32, True, torch.Generator().manual_seed(5))
    assert torch.equal(batch[0], a) and batch.shape == (2, 3, 32, 32)
    assert decode_batch([], 8).shape == (0, 3, 8, 8)


# ---------------------------------------------------------------------------------------------
# packed shards: one ranged GET per user (per shard part for users that span shards)


def test_a_user_is_read_with_one_ranged_get(tiny_world, s3_endpoint, s3_bucket, faulty_proxy):
    url = f"s3://{s3_bucket}/packed"
    ingest("flickr-aes", tiny_world, url, endpoint_url=s3_endpoint)  # default shard size: one shard
    expected = _csv_ratings(tiny_world)
    ds = Dataset.open(url, endpoint_url=faulty_proxy.url, cache_users=0)
    assert len({p.shard for u in ds.users("all") for p in ds.parts(u)}) == 1  # all users share a shard
    got = Counter()
    for u in ds.users("all"):
        faulty_proxy.requests.clear()
        r = ds.load_user(u)
        gets = [(path, rng) for method, path, rng in faulty_proxy.requests if method == "GET"]
        (part,) = ds.parts(u)
        assert gets == [(gets[0][0], f"bytes={part.offset}-{part.offset + part.length - 1}")], gets
        assert gets[0][0].endswith(".tar")
        got.update((u, img, int(s)) for img, s in zip(r.images, r.scores))
    assert got == expected


@pytest.mark.parametrize("where", ["local", "s3"])
def test_users_larger_than_a_shard_span_shards(tiny_world, tmp_path, where, request):
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        url = f"s3://{request.getfixturevalue('s3_bucket')}/span"
    else:
        endpoint, url = None, str(tmp_path / "span")
    ingest("flickr-aes", tiny_world, url, endpoint_url=endpoint, shard_size=10)
    ds = Dataset.open(url, endpoint_url=endpoint)
    with open(tiny_world / "FLICKR-AES_image_labeled_by_each_worker.csv", newline="") as f:
        order = [(r[0].strip(), r[1].strip()) for r in list(csv.reader(f))[1:]]
    for u in ds.users("all"):
        parts = ds.parts(u)
        assert len(parts) == -(-ds.n_ratings(u) // 10) and all(p.samples <= 10 for p in parts)
        assert len({p.shard for p in parts}) == len(parts)
        # The user's samples come back whole and in file order, across the shards.
        assert ds.load_user(u).images == [img for w, img in order if w == u]


# ---------------------------------------------------------------------------------------------
# sampling and lookups whose cost does not grow with the number of users


def test_seeded_permutation_is_a_bijection():
    from piaa_dist.data.stream import SeededPermutation

    for n in (1, 2, 3, 5, 16, 17, 100, 257, 1000):
        perm = SeededPermutation(n, 7, 0)
        assert sorted(perm[i] for i in range(n)) == list(range(n))
    a = [SeededPermutation(1000, 7, 0)[i] for i in range(50)]
    assert a != [SeededPermutation(1000, 7, 1)[i] for i in range(50)]  # epoch changes it
    assert a != [SeededPermutation(1000, 8, 0)[i] for i in range(50)]  # seed changes it
    assert a != list(range(50))


def test_meta_batches_of_a_huge_population_cost_only_the_batch():
    """No permutation of all users is built: 2^62 'users' (a range: nothing materialized)."""
    users = range(2**62)
    batch = sample_meta_batch(users, step=10**12, meta_batch=8, seed=3)
    assert len(set(batch)) == 8 and all(0 <= u < 2**62 for u in batch)
    assert batch == sample_meta_batch(users, step=10**12, meta_batch=8, seed=3)


def test_every_user_once_per_epoch_and_equally_often_over_epochs():
    users = [f"U{i:03d}" for i in range(60)]
    per_epoch = 60 // 7  # 8 steps; 4 users left out each epoch, different ones
    total = Counter()
    left_out = []
    for epoch in range(30):
        seen = Counter()
        for i in range(per_epoch):
            seen.update(sample_meta_batch(users, epoch * per_epoch + i, 7, seed=1))
        assert max(seen.values()) == 1 and len(seen) == 56
        left_out.append(frozenset(users) - frozenset(seen))
        total.update(seen)
    assert len(set(left_out)) > 20  # who is left out changes with the epoch
    assert min(total.values()) >= 20 and max(total.values()) <= 30


def test_rows_and_ids_give_the_same_stream(local):
    users = local.users("train")
    rows = local.user_indices("train")
    assert local.manifest.users_at(rows) == users and [local.index_of(u) for u in users] == rows.tolist()
    a = TaskStream(local, users, rank=0, world_size=1, **KW)
    b = TaskStream(local, rows, rank=0, world_size=1, **KW)
    for step in range(5):
        assert a.global_batch(step) == b.global_batch(step) == sample_meta_batch(users, step, 4, 3)
    _assert_same(a.tasks(2), b.tasks(2))


def test_validation_rows_match_validation_users(local):
    from piaa_dist.data.stream import split_validation_indices

    users = local.users("train")
    rest, val = split_validation_users(users, 3, seed=5)
    rrest, rval = split_validation_indices(local.user_indices("train"), 3, seed=5)
    assert local.manifest.users_at(rval) == val and local.manifest.users_at(rrest) == rest


def test_a_large_manifest_opens_and_finds_every_user(tmp_path):
    """A 20,000-user manifest: lookups, splits and meta-batches without per-user objects."""
    from piaa_dist.data.manifest import ManifestRows, Part, manifest_bytes

    n = 20_000
    names = sorted(f"user-{(i * 7919) % 100_003:06d}-{i}" for i in range(n))
    rows = ManifestRows()
    for i, u in enumerate(names):
        rows.add(u, "test" if i % 10 == 0 else "train", False,
                 [Part(i // 1000, (i % 1000) * 4096, 4096, 3 + i % 5, bytes(32))])
    (tmp_path / "manifest.parquet").write_bytes(manifest_bytes(rows.table(), {"source": "synth", "max_side": "64"}))
    ds = Dataset.open(str(tmp_path))
    assert ds.num_users() == n and ds.num_users("test") == n // 10
    for i in range(0, n, 997):
        assert ds.index_of(names[i]) == i and ds.user_at(i) == names[i] and ds.n_ratings(names[i]) == 3 + i % 5
    assert ds.manifest.index_of("nobody") == -1
    with pytest.raises(DataError, match="'nobody' is not in the manifest"):
        ds.n_ratings("nobody")
    stream = TaskStream(ds, ds.user_indices("train"), rank=1, world_size=2, **KW)
    batch = stream.global_batch(123_456)
    assert len(set(batch)) == 4 and all(ds.split_of(u) == "train" for u in batch)
    assert stream.rank_users(123_456) == batch[1::2]
