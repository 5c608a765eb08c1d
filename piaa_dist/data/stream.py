"""Reading an ingested dataset: users, their ratings, and the meta-training task stream.

Reproducibility contract: every random decision (which users form a meta-batch, how a user's
ratings split into support and query, every crop and flip) is a pure function of
``(seed, step, user)``: never of the rank, the world size, the order users were loaded in,
or what was cached. So a 1-worker and a 2-worker run see the same global meta-batch at every
step, and rank ``r`` of ``W`` takes ``batch[r::W]``.

Users with few ratings: a task needs ``shots`` support and at least one query rating. A user
with ``n <= shots`` ratings gets the reference code's rule instead: support = 80% of the
ratings (at least 1, at most ``n - 1``), query = the rest (capped at ``query_size``). A user
with fewer than 2 ratings cannot form a task (:class:`DataError`). :class:`TaskStream` logs
the users that fall under the 80% rule once, when it is built.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from piaa_dist.data.decode import decode_batch
from piaa_dist.errors import DataError, StorageError
from piaa_dist.storage import ObjectNotFound, Store, open_store

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
SUPPORTED_VERSIONS = {"1"}
REQUIRED_COLUMNS = ("user", "split", "n_ratings", "shards", "sha256", "shard_samples", "has_truth")

# Distinct streams of randomness derived from the same (seed, step, user).
_PURPOSE_BATCH = 1
_PURPOSE_SPLIT = 2
_PURPOSE_AUGMENT = 3
_PURPOSE_EVAL = 4
_PURPOSE_VALIDATION = 5


def user_seed(user: str) -> int:
    """A stable 64-bit integer for a user ID (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(user.encode("utf-8")).digest()[:8], "little")


def _entropy(*parts: int) -> list[int]:
    # SeedSequence wants non-negative integers; fold any int (e.g. a negative seed) to 64 bits.
    return [int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(_entropy(*parts)))


def _torch_generator(*parts: int) -> torch.Generator:
    state = np.random.SeedSequence(_entropy(*parts)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class UserRatings:
    """One user's ratings, images kept as JPEG bytes (decoded on demand).

    Attributes:
        user: worker ID.
        images: image names, in ingestion (file) order.
        jpegs: encoded images, aligned with ``images``.
        scores: float32 ratings 1..5.
        latent: the user's noise-free scores (synthetic worlds), else None.
        average_latent: the population-average user's noise-free scores, else None.
    """

    user: str
    images: list[str]
    jpegs: list[bytes]
    scores: np.ndarray
    latent: np.ndarray | None
    average_latent: np.ndarray | None

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class Task:
    """One user's task: support and query sets as ``(images [k,3,S,S], targets [k] = score/5)``."""

    user: str
    support: tuple[torch.Tensor, torch.Tensor]
    query: tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Dataset


def parse_shard(data: bytes, url: str) -> list[dict[str, Any]]:
    """Samples of a WebDataset tar held in memory: ``[{"__key__", "jpg", "json"}, ...]``.

    Raises:
        DataError: not a tar, or a sample lacks its ``.jpg``/``.json`` member (names ``url``).
    """
    import webdataset as wds

    try:
        # tar_file_expander reads the stream we hand it (tarfile_samples would reopen the URL).
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
        samples = list(wds.tariterators.group_by_keys(files))
    except Exception as err:  # tarfile.ReadError, ValueError on duplicate members, ...
        raise DataError(f"corrupt shard {url}: cannot parse as a tar: {err}") from None
    out = []
    for s in samples:
        if "jpg" not in s or "json" not in s:
            raise DataError(f"corrupt shard {url}: sample {s.get('__key__')!r} lacks .jpg or .json")
        try:
            meta = json.loads(s["json"])
        except ValueError as err:
            raise DataError(f"corrupt shard {url}: sample {s['__key__']!r} has bad JSON: {err}") from None
        out.append({"__key__": s["__key__"], "jpg": s["jpg"], "json": meta})
    return out


class Dataset:
    """An ingested dataset at a URL: its manifest, and users loaded on demand (LRU-cached).

    Thread-safe; picklable (the cache and the S3 client are not carried along).
    """

    def __init__(self, store: Store, table: Any, *, cache_users: int = 4096):
        self.store = store
        self.url = store.url
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        self.source: str = meta.get("source", "")
        self.max_side: int = int(meta.get("max_side", "0") or 0)
        self.version: str = meta.get("version", "")
        self._rows: dict[str, dict[str, Any]] = {row["user"]: row for row in table.to_pylist()}
        self.cache_users = max(0, int(cache_users))
        self._cache: OrderedDict[str, UserRatings] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, url: str, endpoint_url: str | None = None, *, cache_users: int = 4096) -> "Dataset":
        """Open the dataset at ``url`` (reads ``manifest.parquet``).

        Args:
            url: local folder or ``s3://bucket/prefix`` written by ``piaa-dist ingest``.
            endpoint_url: S3 endpoint (default ``$AWS_ENDPOINT_URL``).
            cache_users: users kept in memory (least recently used are evicted).

        Raises:
            DataError: no manifest, or a manifest this version cannot read (names the URL).
        """
        store = open_store(url, endpoint_url)
        murl = store.url_of(MANIFEST)
        try:
            data = store.read_bytes(MANIFEST)
        except ObjectNotFound:
            raise DataError(f"no dataset at {store.url}: {murl} not found (run `piaa-dist ingest` first)") from None
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as err:  # pyarrow.ArrowInvalid and friends
            raise DataError(f"{murl}: not a readable Parquet file: {err}") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"{murl}: manifest lacks column(s) {', '.join(missing)}")
        version = (table.schema.metadata or {}).get(b"version", b"").decode()
        if version not in SUPPORTED_VERSIONS:
            raise DataError(f"{murl}: manifest version {version!r} is not supported (expected 1)")
        return cls(store, table, cache_users=cache_users)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Dataset({self.url!r}, source={self.source!r}, users={len(self._rows)})"

    def users(self, split: str) -> list[str]:
        """Sorted users of a split (``"train"`` or ``"test"``); ``"all"`` for every user."""
        if split == "all":
            return sorted(self._rows)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        return sorted(u for u, row in self._rows.items() if row["split"] == split)

    def _row(self, user: str) -> dict[str, Any]:
        try:
            return self._rows[user]
        except KeyError:
            raise DataError(f"user {user!r} is not in the manifest of {self.url}") from None

    def n_ratings(self, user: str) -> int:
        """Number of ratings of a user (from the manifest; no shard is read)."""
        return int(self._row(user)["n_ratings"])

    def split_of(self, user: str) -> str:
        """``"train"`` or ``"test"``."""
        return str(self._row(user)["split"])

    def has_truth(self, user: str) -> bool:
        """Whether the user's samples carry the synthetic truth (latent scores)."""
        return bool(self._row(user)["has_truth"])

    def shard_urls(self, user: str) -> list[str]:
        """Full URLs of a user's shards."""
        return [self.store.url_of(rel) for rel in self._row(user)["shards"]]

    def load_user(self, user: str) -> UserRatings:
        """Fetch, verify (sha256) and parse a user's shards; cached (LRU).

        Raises:
            DataError: a shard is missing, fails its checksum or does not parse (names the
                shard URL), or the user is unknown.
            StorageError: a shard cannot be read after retries.
        """
        with self._lock:
            hit = self._cache.get(user)
            if hit is not None:
                self._cache.move_to_end(user)
                return hit
        ratings = self._fetch(user)
        if self.cache_users:
            with self._lock:
                self._cache[user] = ratings
                self._cache.move_to_end(user)
                while len(self._cache) > self.cache_users:
                    self._cache.popitem(last=False)
        return ratings

    def _fetch(self, user: str) -> UserRatings:
        row = self._row(user)
        images: list[str] = []
        jpegs: list[bytes] = []
        scores: list[float] = []
        latent: list[float | None] = []
        avg: list[float | None] = []
        for rel, digest, count in zip(row["shards"], row["sha256"], row["shard_samples"]):
            url = self.store.url_of(rel)
            try:
                data = self.store.read_bytes(rel)
            except ObjectNotFound:
                raise DataError(f"missing shard {url} (user {user}, listed in {self.store.url_of(MANIFEST)})") from None
            except StorageError as err:
                raise StorageError(f"cannot fetch shard {url} (user {user}): {err}") from None
            got = hashlib.sha256(data).hexdigest()
            if got != digest:
                raise DataError(f"corrupt shard {url}: sha256 {got[:16]}... does not match the manifest's {digest[:16]}...")
            samples = parse_shard(data, url)
            if len(samples) != count:
                raise DataError(f"corrupt shard {url}: {len(samples)} samples, manifest says {count}")
            for s in samples:
                meta = s["json"]
                if meta.get("user") != user:
                    raise DataError(f"corrupt shard {url}: sample {s['__key__']} belongs to {meta.get('user')!r}, not {user!r}")
                images.append(str(meta["image"]))
                jpegs.append(s["jpg"])
                scores.append(float(meta["score"]))
                latent.append(meta.get("latent"))
                avg.append(meta.get("average_latent"))
        if len(images) != int(row["n_ratings"]):
            raise DataError(f"user {user}: shards hold {len(images)} ratings, manifest says {row['n_ratings']}")
        has_latent = bool(latent) and all(v is not None for v in latent)
        has_avg = bool(avg) and all(v is not None for v in avg)
        return UserRatings(
            user=user,
            images=images,
            jpegs=jpegs,
            scores=np.asarray(scores, dtype=np.float32),
            latent=np.asarray(latent, dtype=np.float32) if has_latent else None,
            average_latent=np.asarray(avg, dtype=np.float32) if has_avg else None,
        )


# ---------------------------------------------------------------------------------------------
# Tasks


def sample_meta_batch(users: list[str], step: int, meta_batch: int, seed: int) -> list[str]:
    """The global meta-batch of users at ``step``: epochs of a seeded permutation.

    Users are visited in a fresh permutation each epoch (``len(users) // meta_batch`` steps;
    the remainder of a permutation is dropped), so every user is seen equally often. The
    result depends only on ``(users, step, meta_batch, seed)``.

    Raises:
        ValueError: fewer users than ``meta_batch``, or ``meta_batch < 1``.
    """
    if meta_batch < 1:
        raise ValueError(f"meta_batch must be >= 1, got {meta_batch}")
    if len(users) < meta_batch:
        raise ValueError(f"meta_batch {meta_batch} needs at least that many users, got {len(users)}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    per_epoch = len(users) // meta_batch
    epoch, i = divmod(step, per_epoch)
    perm = _rng(seed, epoch, _PURPOSE_BATCH).permutation(len(users))
    return [users[j] for j in perm[i * meta_batch : (i + 1) * meta_batch]]


def split_validation_users(users: Sequence[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """Hold ``n`` training users out for validation: ``(meta-training users, validation users)``.

    A seeded choice over the sorted users (pure in ``(users, n, seed)``); both lists are sorted.
    ``n <= 0`` holds out nobody; ``n >= len(users)`` holds out everybody (the caller decides
    whether that is an error).
    """
    pool = sorted(set(users))
    n = max(0, min(int(n), len(pool)))
    chosen = set(_rng(seed, _PURPOSE_VALIDATION).permutation(len(pool))[:n].tolist())
    val = [u for i, u in enumerate(pool) if i in chosen]
    rest = [u for i, u in enumerate(pool) if i not in chosen]
    return rest, val


def validation_users(users: Sequence[str], n: int, seed: int) -> list[str]:
    """The validation users of :func:`split_validation_users` (sorted)."""
    return split_validation_users(users, n, seed)[1]


def task_sizes(n: int, shots: int, query_size: int) -> tuple[int, int]:
    """``(support, query)`` sizes for a user with ``n`` ratings (see the module doc).

    Raises:
        ValueError: ``n < 2`` (no task possible) or non-positive sizes.
    """
    if shots < 1 or query_size < 1:
        raise ValueError(f"shots and query_size must be >= 1, got {shots}, {query_size}")
    if n < 2:
        raise ValueError(f"a task needs at least 2 ratings, got {n}")
    if n > shots:
        return shots, min(query_size, n - shots)
    k = min(n - 1, max(1, int(math.floor(0.8 * n))))
    return k, min(query_size, n - k)


def _targets(scores: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(scores, dtype=np.float32) / 5.0)


def make_task(
    ratings: UserRatings,
    *,
    shots: int,
    query_size: int,
    seed: int,
    step: int,
    image_size: int,
    augment: bool,
) -> Task:
    """Cut one task from a user's ratings: a seeded support/query split, decoded.

    Support images are augmented (resize, random crop, flip) when ``augment``; query images
    never are (as the reference code). Targets are ``score / 5``.

    Raises:
        DataError: the user has fewer than 2 ratings.
    """
    try:
        k, q = task_sizes(len(ratings), shots, query_size)
    except ValueError as err:
        raise DataError(f"user {ratings.user}: {err}") from None
    useed = user_seed(ratings.user)
    perm = _rng(seed, step, useed, _PURPOSE_SPLIT).permutation(len(ratings))
    sup, qry = perm[:k], perm[k : k + q]
    gen = _torch_generator(seed, step, useed, _PURPOSE_AUGMENT)
    xs = decode_batch([ratings.jpegs[i] for i in sup], image_size, augment, gen)
    xq = decode_batch([ratings.jpegs[i] for i in qry], image_size, False)
    return Task(
        user=ratings.user,
        support=(xs, _targets(ratings.scores[sup])),
        query=(xq, _targets(ratings.scores[qry])),
    )


def split_indices(n: int, shots: int, *, seed: int, user: str, repeat: int) -> tuple[np.ndarray, np.ndarray]:
    """The meta-testing split of a user: ``shots`` training indices and the rest for testing.

    A pure function of ``(seed, user, shots, repeat)``; repeats give independent splits.

    Raises:
        DataError: ``n <= shots`` (nothing left to test on).
    """
    if n <= shots:
        raise DataError(f"user {user}: {n} ratings cannot give {shots} training images plus a test remainder")
    perm = _rng(seed, user_seed(user), shots, repeat, _PURPOSE_EVAL).permutation(n)
    return np.sort(perm[:shots]), np.sort(perm[shots:])


def user_tensors(
    ratings: UserRatings,
    indices: Sequence[int] | np.ndarray,
    *,
    image_size: int,
    augment: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a subset of a user's ratings: ``(images [N,3,S,S], targets [N] = score/5)``."""
    idx = np.asarray(indices, dtype=np.int64)
    x = decode_batch([ratings.jpegs[i] for i in idx], image_size, augment, generator)
    return x, _targets(ratings.scores[idx])


class TaskStream:
    """The meta-training stream of one rank: ``(step, tasks of this rank)`` per step.

    Args:
        dataset: an opened :class:`Dataset`.
        users: the users to sample from (order does not matter: they are sorted).
        rank, world_size: this rank takes ``batch[rank::world_size]`` of every global batch.
        meta_batch: users per global meta-batch.
        shots, query_size: task sizes (see :func:`task_sizes`).
        image_size: decoded side ``S``.
        augment: augment support images.
        seed: the run's seed.
        start_step: first step yielded (resume).
        num_steps: steps to yield; ``None`` streams forever (the trainer stops).
        prefetch: steps fetched and decoded ahead, each in a background thread (0 = none).
            One is the default: it overlaps fetching and decoding with the trainer's compute
            (torch releases the GIL); more threads only contend for the GIL on small CPUs.
    """

    def __init__(
        self,
        dataset: Dataset,
        users: Sequence[str],
        *,
        rank: int,
        world_size: int,
        meta_batch: int,
        shots: int,
        query_size: int,
        image_size: int,
        augment: bool,
        seed: int,
        start_step: int = 0,
        num_steps: int | None = None,
        prefetch: int = 1,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.users = sorted(set(users))
        if len(self.users) < meta_batch:
            raise DataError(f"{dataset.url}: meta_batch {meta_batch} needs at least {meta_batch} users, "
                            f"got {len(self.users)}")
        if meta_batch % world_size:
            log.warning("meta_batch %d is not a multiple of world_size %d: ranks get unequal task counts",
                        meta_batch, world_size)
        self.dataset = dataset
        self.rank, self.world_size = rank, world_size
        self.meta_batch, self.shots, self.query_size = meta_batch, shots, query_size
        self.image_size, self.augment, self.seed = image_size, augment, seed
        self.start_step, self.num_steps, self.prefetch = start_step, num_steps, max(0, prefetch)
        few = [u for u in self.users if dataset.n_ratings(u) <= shots]
        too_few = [u for u in few if dataset.n_ratings(u) < 2]
        if too_few:
            raise DataError(f"{dataset.url}: user(s) {', '.join(too_few[:5])} have fewer than 2 ratings: "
                            "no task can be cut from them")
        if few:
            log.warning("%d user(s) have <= %d ratings, so their support set is 80%% of their ratings "
                        "(e.g. %s)", len(few), shots, ", ".join(few[:3]))

    def global_batch(self, step: int) -> list[str]:
        """All users of the meta-batch at ``step`` (every rank agrees)."""
        return sample_meta_batch(self.users, step, self.meta_batch, self.seed)

    def rank_users(self, step: int) -> list[str]:
        """This rank's slice of the meta-batch at ``step``."""
        return self.global_batch(step)[self.rank :: self.world_size]

    def tasks(self, step: int) -> list[Task]:
        """This rank's decoded tasks at ``step`` (pure in ``(seed, step, user)``)."""
        return [
            make_task(
                self.dataset.load_user(u),
                shots=self.shots,
                query_size=self.query_size,
                seed=self.seed,
                step=step,
                image_size=self.image_size,
                augment=self.augment,
            )
            for u in self.rank_users(step)
        ]

    def __iter__(self) -> Iterator[tuple[int, list[Task]]]:
        end = None if self.num_steps is None else self.start_step + self.num_steps
        step = self.start_step
        if self.prefetch == 0:
            while end is None or step < end:
                yield step, self.tasks(step)
                step += 1
            return
        pending: deque[tuple[int, Future[list[Task]]]] = deque()
        pool = ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="taskstream")
        try:
            while True:
                while len(pending) <= self.prefetch and (end is None or step < end):
                    pending.append((step, pool.submit(self.tasks, step)))
                    step += 1
                if not pending:
                    return
                s, fut = pending.popleft()
                yield s, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)
