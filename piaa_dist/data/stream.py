"""Reading an ingested dataset: users, their ratings, and the meta-training task stream.

Reproducibility contract: every random decision (which users form a meta-batch, how a user's
ratings split into support and query, every crop and flip) is a pure function of
``(seed, step, user)``: never of the rank, the world size, the order users were loaded in,
or what was cached. So a 1-worker and a 2-worker run see the same global meta-batch at every
step, and rank ``r`` of ``W`` takes ``batch[r::W]``.

Scale: :class:`Dataset` keeps the manifest columnar, so opening a million-user dataset
creates no Python object per user; a meta-batch is drawn from a seeded bijection evaluated
at ``meta_batch`` positions (:class:`SeededPermutation`), and a user is found by binary
search and read with one ranged GET, so no per-step cost grows with the number of users.
:class:`TaskStream` accepts dataset rows (``Dataset.user_indices``) instead of user IDs.

Users with few ratings: a task needs ``shots`` support and at least one query rating. A user
with ``n <= shots`` ratings gets the reference code's rule instead: support = 80% of the
ratings (at least 1, at most ``n - 1``), query = the rest (capped at ``query_size``). A user
with fewer than 2 ratings cannot form a task (:class:`DataError`). :class:`TaskStream` logs
the users that fall under the 80% rule once, when it is built.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from piaa_dist.data.decode import decode_batch, decode_pixels, normalize
from piaa_dist.data.layout import resolve
from piaa_dist.data.manifest import MANIFEST, Manifest, Part
from piaa_dist.data.tarfmt import TarFormatError, group_samples, parse_members
from piaa_dist.errors import DataError, StorageError
from piaa_dist.storage import ObjectNotFound, ShortObject, Store, open_store

log = logging.getLogger(__name__)

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


@dataclass
class _Pixels:
    """One user's entry in :meth:`Dataset.pixels`'s cache: decoded images and which are there."""

    data: torch.Tensor  # uint8 [n, 3, S, S]
    have: np.ndarray  # bool [n]

    @property
    def nbytes(self) -> int:
        return self.data.numel()


@dataclass(frozen=True)
class Task:
    """One user's task: support and query sets as ``(images [k,3,S,S], targets [k] = score/5)``."""

    user: str
    support: tuple[torch.Tensor, torch.Tensor]
    query: tuple[torch.Tensor, torch.Tensor]


#: Default bound of a :class:`Dataset`'s decoded-pixel cache, MiB (uint8 pixels: ~3 KB per
#: image at 32 px, ~150 KB at 224 px; the default holds ~85k images at 32 px, ~1.7k at 224 px).
DEFAULT_PIXEL_CACHE_MB = 256.0


# ---------------------------------------------------------------------------------------------
# Dataset


def parse_shard(data: bytes, url: str) -> list[dict[str, Any]]:
    """Samples of a WebDataset tar held in memory: ``[{"__key__", "jpg", "json"}, ...]``.

    Works on a whole shard and on one user's byte range of a packed shard.

    Raises:
        DataError: not tar members, or a sample lacks its ``.jpg``/``.json`` member (names ``url``).
    """
    try:
        samples = group_samples(parse_members(data))
    except TarFormatError as err:
        raise DataError(f"corrupt shard {url}: cannot parse as a tar: {err}") from None
    out = []
    for key, members in samples:
        if "jpg" not in members or "json" not in members:
            raise DataError(f"corrupt shard {url}: sample {key!r} lacks .jpg or .json")
        try:
            meta = json.loads(members["json"])
        except ValueError as err:
            raise DataError(f"corrupt shard {url}: sample {key!r} has bad JSON: {err}") from None
        if not isinstance(meta, dict):
            raise DataError(f"corrupt shard {url}: sample {key!r} has JSON that is not an object")
        out.append({"__key__": key, "jpg": members["jpg"], "json": meta})
    return out


def check_part(data: bytes, part: Part, url: str, user: str) -> list[dict[str, Any]]:
    """Verify one user's byte range (sha256, sample count, owner) and parse it.

    Raises:
        DataError: names the shard URL, the byte range and the user.
    """
    where = f"{url} bytes {part.offset}-{part.offset + part.length - 1} (user {user})"
    got = hashlib.sha256(data).digest()
    if got != part.sha256:
        raise DataError(f"corrupt shard {where}: sha256 {got.hex()[:16]}... does not match the manifest's "
                        f"{part.sha256.hex()[:16]}...")
    samples = parse_shard(data, where)
    if len(samples) != part.samples:
        raise DataError(f"corrupt shard {where}: {len(samples)} samples, manifest says {part.samples}")
    for smp in samples:
        if smp["json"].get("user") != user:
            raise DataError(f"corrupt shard {where}: sample {smp['__key__']} belongs to "
                            f"{smp['json'].get('user')!r}, not {user!r}")
    return samples


class Dataset:
    """One published version of an ingested dataset: its manifest, and users loaded on demand.

    The manifest stays columnar (:class:`piaa_dist.data.manifest.Manifest`): opening a
    million-user dataset costs no Python object per user, and looking a user up, drawing a
    meta-batch or loading a user costs the same whatever the number of users. A user is read
    with one ranged GET per part (one, unless the user spans shards), verified against the
    manifest's sha256 and parsed; users are LRU-cached.

    The version is resolved once, at :meth:`open`: a newer version published later does not
    change what this object reads (open again to see it).

    Thread-safe; picklable (the cache and the S3 client are not carried along; at scale, send
    the URL and open it on the other side instead).

    Attributes:
        url: the dataset URL as opened.
        version_id: the version read (a folder under ``versions/``).
        store: a store rooted at that version.
        source, max_side: from the manifest's metadata; ``version`` is the layout version.
    """

    def __init__(self, store: Store, manifest: Manifest, *, url: str | None = None, version_id: str = "",
                 cache_users: int = 4096, cache_pixels_mb: float = DEFAULT_PIXEL_CACHE_MB):
        self.store = store
        self.manifest = manifest
        self.url = url or store.url
        self.version_id = version_id
        meta = manifest.metadata
        self.source: str = meta.get("source", "")
        self.max_side: int = int(meta.get("max_side", "0") or 0)
        self.version: str = meta.get("version", "")
        self.shard_pattern: str = meta.get("shard_pattern", "shards/{:06d}.tar")
        self.cache_users = max(0, int(cache_users))
        self._cache: OrderedDict[str, UserRatings] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_pixels_bytes = max(0, int(cache_pixels_mb * 2**20))
        self._pixels: OrderedDict[tuple[str, int], _Pixels] = OrderedDict()
        self._pixel_bytes = 0
        #: Decoded-pixel cache counters: ``hits`` and ``misses`` (images), ``evicted`` (users).
        self.pixel_stats = {"hits": 0, "misses": 0, "evicted": 0}

    @classmethod
    def open(cls, url: str, endpoint_url: str | None = None, *, cache_users: int = 4096,
             version: str | None = None,
             cache_pixels_mb: float = DEFAULT_PIXEL_CACHE_MB) -> "Dataset":
        """Open the published version at ``url`` (or a given ``version``).

        Args:
            url: local folder or ``s3://bucket/prefix`` written by ``piaa-dist ingest`` (or a
                version folder ``.../versions/<id>``).
            endpoint_url: S3 endpoint (default ``$AWS_ENDPOINT_URL``).
            cache_users: users kept in memory (least recently used are evicted).
            version: a version ID to read instead of the published one.
            cache_pixels_mb: bound of the decoded-pixel cache (:meth:`pixels`; 0 = none).

        Raises:
            DataError: nothing published, an unknown version, the old layout, or a manifest
                that is not valid (names the URL, column and row).
            StorageError: the store cannot be read (after retries).
        """
        root = open_store(url, endpoint_url)
        vid, store = resolve(root, version)
        murl = store.url_of(MANIFEST)
        try:
            data = store.read_bytes(MANIFEST)
        except ObjectNotFound:
            raise DataError(f"{murl} not found: version {vid} of {root.url} is incomplete or was removed "
                            f"(list the versions with `piaa-dist datasets {root.url}`)") from None
        manifest = Manifest.from_bytes(data, murl)
        return cls(store, manifest, url=root.url, version_id=vid, cache_users=cache_users,
                   cache_pixels_mb=cache_pixels_mb)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        state["_lock"] = None
        state["_pixels"] = OrderedDict()
        state["_pixel_bytes"] = 0
        state["pixel_stats"] = {k: 0 for k in self.pixel_stats}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"Dataset({self.url!r}, version={self.version_id!r}, source={self.source!r}, "
                f"users={self.manifest.n})")

    # -- users ---------------------------------------------------------------------------------

    def users(self, split: str) -> list[str]:
        """Sorted users of a split (``"train"`` or ``"test"``); ``"all"`` for every user.

        A Python list: fine for thousands of users; at scale use :meth:`user_indices`.
        """
        return self.manifest.users_at(self.manifest.indices(split))

    def user_indices(self, split: str) -> np.ndarray:
        """Rows (int64, ascending = users in sorted order) of a split; no per-user objects."""
        return self.manifest.indices(split)

    def num_users(self, split: str = "all") -> int:
        """Number of users of a split."""
        return len(self.manifest.indices(split))

    def user_at(self, i: int) -> str:
        """The user of row ``i``."""
        return self.manifest.user_at(i)

    def index_of(self, user: str) -> int:
        """Row of a user.

        Raises:
            DataError: the user is not in the manifest.
        """
        i = self.manifest.index_of(user)
        if i < 0:
            raise DataError(f"user {user!r} is not in the manifest of {self.url} (version {self.version_id})")
        return i

    def n_ratings(self, user: str) -> int:
        """Number of ratings of a user (from the manifest; no shard is read)."""
        return int(self.manifest.n_ratings[self.index_of(user)])

    def n_ratings_at(self, idx: np.ndarray) -> np.ndarray:
        """Ratings per row, vectorized."""
        return self.manifest.n_ratings[np.asarray(idx, dtype=np.int64)]

    def split_of(self, user: str) -> str:
        """``"train"`` or ``"test"``."""
        return "test" if self.manifest.is_test[self.index_of(user)] else "train"

    def has_truth(self, user: str) -> bool:
        """Whether the user's samples carry the synthetic truth (latent scores)."""
        return bool(self.manifest.has_truth[self.index_of(user)])

    def parts(self, user: str) -> list[Part]:
        """Where the user's samples are: one :class:`Part` per shard it occupies."""
        return self.manifest.parts(self.index_of(user))

    def shard_url(self, shard: int) -> str:
        """Full URL of shard ``shard``."""
        return self.store.url_of(self.shard_pattern.format(int(shard)))

    def shard_urls(self, user: str) -> list[str]:
        """Full URLs of the shards holding a user's samples (shared with other users)."""
        return [self.shard_url(p.shard) for p in self.parts(user)]

    # -- loading -------------------------------------------------------------------------------

    def load_user(self, user: str) -> UserRatings:
        """Fetch (one ranged GET per part), verify (sha256) and parse a user; cached (LRU).

        Raises:
            DataError: a shard is missing, or the user's byte range fails its checksum, is cut
                short or does not parse (names the shard URL, the range and the user), or the
                user is unknown.
            StorageError: a shard cannot be read after retries.
        """
        with self._lock:
            hit = self._cache.get(user)
            if hit is not None:
                self._cache.move_to_end(user)
                return hit
        ratings = self._fetch(user, self.index_of(user))
        if self.cache_users:
            with self._lock:
                self._cache[user] = ratings
                self._cache.move_to_end(user)
                while len(self._cache) > self.cache_users:
                    self._cache.popitem(last=False)
        return ratings

    def pixels(self, user: str, size: int, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Some of a user's images decoded and resized to ``size`` without augmentation: uint8
        ``[len(indices), 3, size, size]`` (:func:`piaa_dist.data.decode.decode_pixels`).

        Cached per image (users in LRU order, at most ``cache_pixels_mb`` of pixels; a user
        larger than that is decoded and not kept): an image met again, in a later meta-batch,
        is not decoded again, and only the images asked for are ever decoded.
        ``decode.normalize`` of the result equals decoding those images, bit for bit.
        """
        idx = np.asarray(indices, dtype=np.int64)
        key = (user, int(size))
        with self._lock:
            entry = self._pixels.get(key)
            if entry is not None:
                self._pixels.move_to_end(key)
        if entry is None:
            ratings = self.load_user(user)
            nbytes = len(ratings) * 3 * int(size) ** 2
            if nbytes > self.cache_pixels_bytes:
                with self._lock:
                    self.pixel_stats["misses"] += len(idx)
                return decode_pixels([ratings.jpegs[i] for i in idx], size)
            fresh = _Pixels(torch.empty((len(ratings), 3, size, size), dtype=torch.uint8),
                            np.zeros(len(ratings), dtype=bool))
            with self._lock:
                entry = self._pixels.get(key)  # another thread may have made it meanwhile
                if entry is None:
                    entry = self._pixels[key] = fresh
                    self._pixel_bytes += fresh.nbytes
                    # The newest entry fits on its own, so this never evicts it.
                    while self._pixel_bytes > self.cache_pixels_bytes:
                        _, old = self._pixels.popitem(last=False)
                        self._pixel_bytes -= old.nbytes
                        self.pixel_stats["evicted"] += 1
        missing = np.unique(idx[~entry.have[idx]])
        if len(missing):
            jpegs = self.load_user(user).jpegs  # (the encoded-user cache: no second fetch)
            decoded = decode_pixels([jpegs[i] for i in missing], size)
            with self._lock:
                entry.data[torch.from_numpy(missing)] = decoded
                entry.have[missing] = True
        with self._lock:
            self.pixel_stats["misses"] += len(missing)
            self.pixel_stats["hits"] += len(idx) - len(missing)
            return entry.data[torch.from_numpy(idx)]

    def read_part(self, part: Part, user: str) -> list[dict[str, Any]]:
        """Read, verify and parse one part of a user (one ranged GET)."""
        rel = self.shard_pattern.format(part.shard)
        url = self.store.url_of(rel)
        try:
            data = self.store.read_range(rel, part.offset, part.length)
        except ObjectNotFound:
            raise DataError(f"missing shard {url} (user {user}, listed in {self.store.url_of(MANIFEST)})") from None
        except ShortObject as err:
            raise DataError(f"corrupt shard {url} (user {user}): {err}") from None
        except StorageError as err:
            raise StorageError(f"cannot fetch shard {url} (user {user}): {err}") from None
        return check_part(data, part, url, user)

    def _fetch(self, user: str, row: int) -> UserRatings:
        images: list[str] = []
        jpegs: list[bytes] = []
        scores: list[float] = []
        latent: list[float | None] = []
        avg: list[float | None] = []
        for part in self.manifest.parts(row):
            for smp in self.read_part(part, user):
                meta = smp["json"]
                try:
                    images.append(str(meta["image"]))
                    scores.append(float(meta["score"]))
                except (KeyError, TypeError, ValueError):
                    raise DataError(f"corrupt shard {self.shard_url(part.shard)} (user {user}): sample "
                                    f"{smp['__key__']} lacks an image name or a numeric score") from None
                jpegs.append(smp["jpg"])
                latent.append(meta.get("latent"))
                avg.append(meta.get("average_latent"))
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


_M64 = 0xFFFFFFFFFFFFFFFF
_FEISTEL_ROUNDS = 6


def _mix64(z: int) -> int:
    """splitmix64's finalizer: a fast, well-mixing bijection on 64-bit integers."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class SeededPermutation:
    """A seeded bijection on ``[0, n)`` evaluated one position at a time, in O(1).

    A balanced Feistel network on the smallest even number of bits covering ``n`` is a
    permutation of ``[0, 2^bits)``; cycle-walking (apply it again until the value falls below
    ``n``) restricts it to ``[0, n)``, still a bijection. ``2^bits < 4n``, so a position takes
    fewer than 4 walks on average. This replaces ``rng.permutation(n)``, whose cost at every
    step grew with the number of users (11.6 ms at a million users).
    """

    def __init__(self, n: int, *key: int):
        if n < 1:
            raise ValueError(f"need n >= 1, got {n}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        self._half = bits // 2
        self._mask = (1 << self._half) - 1
        self._keys = [int(k) for k in np.random.SeedSequence(_entropy(*key)).generate_state(_FEISTEL_ROUNDS, np.uint64)]

    def _round_trip(self, x: int) -> int:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix64(right ^ k) & self._mask)
        return (left << self._half) | right

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self._round_trip(int(i))
        while x >= self.n:
            x = self._round_trip(x)
        return x


def sample_meta_batch(users: Sequence[Any], step: int, meta_batch: int, seed: int) -> list[Any]:
    """The global meta-batch of users at ``step``: epochs of a seeded permutation.

    Users are visited in a fresh seeded permutation each epoch (``len(users) // meta_batch``
    steps; the remainder of a permutation is dropped, different users each epoch), so every
    user is seen at most once per epoch and equally often over epochs. The result depends
    only on ``(users, step, meta_batch, seed)``, and its cost does not grow with
    ``len(users)`` (:class:`SeededPermutation`). ``users`` may be user IDs or dataset rows.

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
    perm = SeededPermutation(len(users), seed, epoch, _PURPOSE_BATCH)
    return [users[perm[j]] for j in range(i * meta_batch, (i + 1) * meta_batch)]


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


def split_validation_indices(indices: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`split_validation_users` on dataset rows (``Dataset.user_indices``) instead of IDs.

    Rows in ascending order are users in sorted order, so this holds out exactly the users
    :func:`split_validation_users` holds out, without a Python object per user.
    """
    pool = np.unique(np.asarray(indices, dtype=np.int64))
    n = max(0, min(int(n), len(pool)))
    chosen = np.zeros(len(pool), bool)
    chosen[_rng(seed, _PURPOSE_VALIDATION).permutation(len(pool))[:n]] = True
    return pool[~chosen], pool[chosen]


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
    pixels: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> Task:
    """Cut one task from a user's ratings: a seeded support/query split, decoded.

    Support images are augmented (resize, random crop, flip) when ``augment``; query images
    never are (as the reference code). Targets are ``score / 5``.

    Args:
        pixels: ``indices -> uint8 images`` of this user decoded without augmentation at
            ``image_size`` (e.g. :meth:`Dataset.pixels`, cached): un-augmented images come from
            it instead of being decoded here (the same bits either way).

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
    if augment or pixels is None:
        xs = decode_batch([ratings.jpegs[i] for i in sup], image_size, augment, gen)
    else:
        xs = normalize(pixels(sup))
    if pixels is None:
        xq = decode_batch([ratings.jpegs[i] for i in qry], image_size, False)
    else:
        xq = normalize(pixels(qry))
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
        users: the users to sample from: IDs, or dataset rows (``Dataset.user_indices``; no
            Python object per user). Order does not matter: they are sorted.
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
        cache_pixels: cut un-augmented images from the dataset's decoded-pixel cache
            (:meth:`Dataset.pixels`) instead of decoding them at every visit.
    """

    def __init__(
        self,
        dataset: Dataset,
        users: Sequence[str] | np.ndarray,
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
        cache_pixels: bool = True,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if isinstance(users, np.ndarray) and users.dtype.kind in "iu":
            rows = users.astype(np.int64)
            if len(rows) > 1 and not (rows[1:] > rows[:-1]).all():
                rows = np.unique(rows)  # (Dataset.user_indices is sorted already: no sort)
            if len(rows) and (rows[0] < 0 or rows[-1] >= dataset.manifest.n):
                raise ValueError(f"user rows must be in [0, {dataset.manifest.n}), got {rows[0]}..{rows[-1]}")
        else:
            # IDs -> rows; ascending rows are users in sorted order, so the order is the same.
            rows = np.unique(np.array([dataset.index_of(u) for u in set(users)], dtype=np.int64))
        self.rows = rows
        if len(rows) < meta_batch:
            raise DataError(f"{dataset.url}: meta_batch {meta_batch} needs at least {meta_batch} users, "
                            f"got {len(rows)}")
        if meta_batch % world_size:
            log.warning("meta_batch %d is not a multiple of world_size %d: ranks get unequal task counts",
                        meta_batch, world_size)
        self.dataset = dataset
        self.rank, self.world_size = rank, world_size
        self.meta_batch, self.shots, self.query_size = meta_batch, shots, query_size
        self.image_size, self.augment, self.seed = image_size, augment, seed
        self.start_step, self.num_steps, self.prefetch = start_step, num_steps, max(0, prefetch)
        self.cache_pixels = bool(cache_pixels)
        n = dataset.n_ratings_at(rows)
        few, too_few = rows[n <= shots], rows[n < 2]
        if len(too_few):
            raise DataError(f"{dataset.url}: user(s) {', '.join(dataset.manifest.users_at(too_few[:5]))} have "
                            "fewer than 2 ratings: no task can be cut from them")
        if len(few):
            log.warning("%d user(s) have <= %d ratings, so their support set is 80%% of their ratings "
                        "(e.g. %s)", len(few), shots, ", ".join(dataset.manifest.users_at(few[:3])))

    @property
    def users(self) -> list[str]:
        """The users sampled from, sorted (a list: for small uses)."""
        return self.dataset.manifest.users_at(self.rows)

    def global_batch(self, step: int) -> list[str]:
        """All users of the meta-batch at ``step`` (every rank agrees); O(meta_batch)."""
        rows = sample_meta_batch(self.rows, step, self.meta_batch, self.seed)
        return [self.dataset.user_at(r) for r in rows]

    def rank_users(self, step: int) -> list[str]:
        """This rank's slice of the meta-batch at ``step``."""
        return self.global_batch(step)[self.rank :: self.world_size]

    def tasks(self, step: int) -> list[Task]:
        """This rank's decoded tasks at ``step`` (pure in ``(seed, step, user)``).

        Un-augmented images (every query image; support images too without augmentation) come
        from the dataset's decoded-pixel cache (:meth:`Dataset.pixels`) when ``cache_pixels``.
        """
        return [
            make_task(
                self.dataset.load_user(u),
                shots=self.shots,
                query_size=self.query_size,
                seed=self.seed,
                step=step,
                image_size=self.image_size,
                augment=self.augment,
                pixels=(functools.partial(self.dataset.pixels, u, self.image_size)
                        if self.cache_pixels else None),
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
