"""Synthetic worlds at any scale: a shared pool of small images, up to millions of users with a
long tail of ratings each, written as a ratings log or in the FLICKR-AES layout.

The generative model is :mod:`piaa_dist.data.synth`'s (its functions are reused), so the
ceilings mean the same thing: a user's noise-free preference for an image with attributes
``a`` is ``z_u(a) = shared(a) + (g_u * archetype_k(u) + d_u) . a``, standardised by the
population sd of ``z`` over all users and images; ``latent = 3 + bias_u + scale_u * z`` on the
1-5 scale; the observed rating adds ``N(0, (noise_sd * scale_u)^2)`` and applies the user's own
jittered thresholds. What changes at scale:

* **Who rates what.** Each user rates a long-tailed number of images: a discretized
  log-normal (median ``ratings_median``, log-sd ``ratings_sigma``, clipped to
  ``[ratings_min, ratings_max]``): many users with a handful of ratings, a few with hundreds.
  The images are drawn uniformly, without repeats, from a pool of ``images`` shared by all.
* **Score scale.** A ratings log uses the scale ``score_range`` (e.g. 1-10): the 1-5 latent
  range ``[0.5, 5.5]`` is mapped affinely onto ``[lo - 0.5, hi + 0.5]`` and cut by ``K - 1``
  evenly spaced, per-user jittered thresholds (K = number of levels). With 1-5 this is exactly
  synth's model. The sidecar's latents are on the log's scale too (ranks, hence ceilings,
  do not depend on the scale).
* **Population quantities without the users x images matrix.** ``z_sd`` (over all users and
  images) and the average user's latent (the mean over *training* users, per image) are
  linear/quadratic in per-user sums, so one streaming pass over the users computes them
  exactly (:func:`population`); a second pass writes the ratings.

Streaming: users are generated in blocks of ``block_users`` (the unit of randomness: each
block has its own seeded streams, so a block can be regenerated alone) and each block is
written before the next is drawn. Memory is one block plus the image pool, whatever the
number of users; nothing per user is kept (ids, parameters and rows live only in their
block). Ceilings are computed per block (a user's ratings never span blocks) and accumulated.

Files written to ``OUT``:

* layout ``ratings``: ``ratings.csv`` (or ``ratings.parquet``) with columns ``user``,
  ``image``, ``score`` and, when there are test users, ``split`` (``train``/``test``);
  ``image`` is a path relative to ``images/`` (a two-level folder tree). Scores 1-10 unless
  ``score_range`` says otherwise (the scale is recorded in ``world.json``). Rows of a block's
  users are interleaved (a log is not grouped by user).
* layout ``flickr-aes``: exactly :func:`piaa_dist.data.synth.make_world`'s files
  (``FLICKR-AES_image_labeled_by_each_worker.csv`` with the leading spaces, ``images/`` flat,
  ``test_workers.csv``); scores 1-5.
* ``latent_scores.csv`` beside the ratings file, row-aligned with it: ``user,image,latent,
  average_latent`` (``worker,imagePair,...`` in the FLICKR-AES layout).
* ``image_attributes.csv``, ``world.json`` (spec, score scale, counts, the ratings-per-user
  distribution, ``z_sd``, ceilings).

This module uses numpy and PIL (and pyarrow only for Parquet output).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from piaa_dist.data.synth import (
    ARCHETYPES,
    ATTRIBUTES,
    RATINGS_FILE,
    SIDECAR_FILE,
    TEST_WORKERS_FILE,
    WorldSpec,
    archetype_weights,
    render_image,
    shared_score,
)
from piaa_dist.metrics import Ceilings, ceilings_by_group

log = logging.getLogger(__name__)

LAYOUTS = ("ratings", "flickr-aes")
FORMATS = ("csv", "parquet")
RATINGS_LOG = "ratings"  #: stem of the ratings-log file (``ratings.csv`` / ``ratings.parquet``)
ATTRIBUTES_FILE = "image_attributes.csv"
WORLD_FILE = "world.json"
IMAGES_DIR = "images"
FORMAT_TAG = "piaa-dist scale world v1"
MAX_USERS = MAX_IMAGES = 10**8
DEFAULT_MAX_RATINGS = 500

# Seed-sequence spawn keys: one independent stream per concern (and per block for users), so
# e.g. the image count never changes which users are test users.
_IMAGES, _IDS, _USERS, _RATINGS, _RENDER = range(5)
_ALNUM_UPPER = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", dtype=np.uint8)
_ALNUM_LOWER = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", dtype=np.uint8)
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)

_SYNTH = WorldSpec()  # the small world's generative parameters are the defaults here too


@dataclass(frozen=True)
class ScaleSpec:
    """Size, layout and generative parameters of a scale world.

    The taste parameters default to :class:`piaa_dist.data.synth.WorldSpec`'s, so the two
    generators describe the same population.
    """

    users: int = 10_000  #: total users (train + test)
    images: int = 5_000  #: size of the shared image pool
    seed: int = 0
    layout: str = "ratings"  #: "ratings" (a ratings log) or "flickr-aes"
    format: str = "csv"  #: ratings-log file format: "csv" or "parquet" (layout "ratings" only)
    score_range: tuple[int, int] | None = None  #: inclusive score scale; default 1-10 (flickr-aes: 1-5, fixed)
    test_fraction: float = 0.1  #: share of test users (0: no split column, every user trains)
    ratings_median: float = 8.0  #: median ratings per user (log-normal before rounding/clipping)
    ratings_sigma: float = 1.25  #: log-sd of ratings per user: the length of the tail
    ratings_min: int = 2
    ratings_max: int | None = None  #: default: 500, or the pool size if smaller
    image_size: int = 32  #: rendered side in pixels
    jpeg_quality: int = 90
    block_users: int = 1024  #: users per block: the unit of randomness and of writing
    archetype_strength: tuple[float, float] = _SYNTH.archetype_strength
    personal_sd: float = _SYNTH.personal_sd
    bias_sd: float = _SYNTH.bias_sd
    scale_range: tuple[float, float] = _SYNTH.scale_range
    threshold_sd: float = _SYNTH.threshold_sd  #: in units of the 1-5 scale
    noise_sd: float = _SYNTH.noise_sd

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.layout == "flickr-aes" and self.format != "csv":
            raise ValueError("the flickr-aes layout is CSV only (format=csv)")
        # Ids and names are bijections of the index in int64 arithmetic: exact below 10^8.
        if not 2 <= self.users <= MAX_USERS:
            raise ValueError(f"users must be in [2, {MAX_USERS:,}], got {self.users}")
        if not 2 <= self.images <= MAX_IMAGES:
            raise ValueError(f"images must be in [2, {MAX_IMAGES:,}], got {self.images}")
        if self.score_range is not None:
            lo, hi = self.score_range
            if self.layout == "flickr-aes" and (lo, hi) != (1, 5):
                raise ValueError(f"the flickr-aes layout rates 1-5; got score_range {self.score_range}")
            if not lo < hi:
                raise ValueError(f"score_range must be lo < hi, got {self.score_range}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.ratings_max is not None and self.ratings_max > self.images:
            raise ValueError(
                f"ratings_max {self.ratings_max} exceeds the image pool ({self.images}): "
                "a user rates each image at most once"
            )
        if not 1 <= self.ratings_min <= self.max_ratings:
            raise ValueError(f"ratings per user must be 1 <= min <= max, got {self.ratings_min}, {self.max_ratings}")
        if not (self.ratings_median > 0 and self.ratings_sigma >= 0):
            raise ValueError("ratings_median must be > 0 and ratings_sigma >= 0")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.block_users < 2:
            raise ValueError(f"block_users must be >= 2, got {self.block_users}")

    @property
    def max_ratings(self) -> int:
        """The most ratings a user has (``ratings_max``, or its default)."""
        return self.ratings_max if self.ratings_max is not None else min(DEFAULT_MAX_RATINGS, self.images)

    @property
    def scale(self) -> tuple[int, int]:
        """The inclusive score scale ``(lo, hi)`` of the ratings."""
        if self.score_range is not None:
            return (int(self.score_range[0]), int(self.score_range[1]))
        return (1, 5) if self.layout == "flickr-aes" else (1, 10)

    @property
    def levels(self) -> int:
        """Number of score levels K of the ratings scale."""
        return self.scale[1] - self.scale[0] + 1

    @property
    def blocks(self) -> int:
        """Number of user blocks."""
        return -(-self.users // self.block_users)


# ---------------------------------------------------------------------------------------------
# The image pool


@dataclass(frozen=True)
class ImagePool:
    """The shared images: names (paths relative to ``images/``), attributes, shared scores."""

    names: np.ndarray  #: [N] object array of str
    attrs: np.ndarray  #: [N, 8]
    shared: np.ndarray  #: [N] shared_score(attrs)


def _seed(spec: ScaleSpec, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(spec.seed, spawn_key=key)


def _affine(spec: ScaleSpec, modulus: int, purpose: int) -> tuple[int, int]:
    """A seeded bijection ``i -> (a*i + c) mod modulus`` (a coprime to the modulus)."""
    rng = np.random.default_rng(_seed(spec, _IDS, purpose))
    while True:
        a = int(rng.integers(1, modulus))
        if math.gcd(a, modulus) == 1:
            return a, int(rng.integers(0, modulus))


def _digits(values: np.ndarray, base: int, width: int) -> np.ndarray:
    """[n, width] base-``base`` digits of non-negative int64 values, most significant first."""
    out = np.empty((len(values), width), dtype=np.int64)
    v = values.astype(np.int64, copy=True)
    for j in range(width - 1, -1, -1):
        out[:, j] = v % base
        v //= base
    return out


def _strings(codes: np.ndarray) -> np.ndarray:
    """[n, width] uint8 character codes -> [n] object array of str."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    return codes.view(f"S{codes.shape[1]}").ravel().astype("U").astype(object)


def image_pool(spec: ScaleSpec) -> ImagePool:
    """The image pool of a world: unique names, attribute vectors and their shared scores."""
    n = spec.images
    rng = np.random.default_rng(_seed(spec, _IMAGES))
    attrs = rng.uniform(-1.0, 1.0, size=(n, len(ATTRIBUTES)))
    idx = np.arange(n, dtype=np.int64)
    if spec.layout == "flickr-aes":
        # farm{1-9}_{server}_{photo}_{secret}_b.jpg as in FLICKR-AES; the 10-digit photo id is a
        # bijection of the index, hence unique without a set of seen names.
        modulus = 9 * 10**9
        a, c = _affine(spec, modulus, _IMAGES)
        photo = 10**9 + (a * idx + c) % modulus  # a*idx < 9e9 * n: fits int64 for n < 1e9
        farm = rng.integers(1, 10, size=n)
        server = rng.integers(1000, 10000, size=n)
        secret = _strings(_HEX[rng.integers(0, 16, size=(n, 10))])
        names = np.array([f"farm{f}_{s}_{p}_{x}_b.jpg"
                          for f, s, p, x in zip(farm.tolist(), server.tolist(), photo.tolist(), secret)],
                         dtype=object)
    else:
        # A two-level tree (a log's images rarely sit in one folder): ab/abcdef1234.jpg.
        modulus = 16**10
        a, c = _affine(spec, 16**7, _IMAGES)
        h = (a * idx + c) % 16**7 * 16**3 + rng.integers(0, 16**3, size=n)  # unique: first 7 hex
        hexes = _strings(_HEX[_digits(h % modulus, 16, 10)])
        names = np.array([f"{x[:2]}/{x}.jpg" for x in hexes], dtype=object)
    return ImagePool(names=names, attrs=attrs, shared=shared_score(attrs))


# ---------------------------------------------------------------------------------------------
# Users, block by block


@dataclass(frozen=True)
class UserBlock:
    """The users ``[start, start + n)``: their ids and generative parameters."""

    start: int
    ids: np.ndarray  #: [n] object array of str
    is_test: np.ndarray  #: [n] bool
    archetype: np.ndarray  #: [n] index into ARCHETYPES
    weights: np.ndarray  #: [n, 8] taste weights g_u * archetype_k(u) + d_u
    bias: np.ndarray  #: [n]
    scale: np.ndarray  #: [n]
    thresholds: np.ndarray  #: [n, K-1] on the 1-5 latent scale, sorted
    n_ratings: np.ndarray  #: [n] int


_ARCH_W = np.stack([archetype_weights(k) for k in range(len(ARCHETYPES))])


def _user_ids(spec: ScaleSpec, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ids unique by construction: random characters + a seeded bijection of the index."""
    if spec.layout == "flickr-aes":  # A + 13 of [A-Z0-9], like AMT worker ids
        alphabet, prefix, n_random, n_index = _ALNUM_UPPER, b"A", 6, 7
    else:
        alphabet, prefix, n_random, n_index = _ALNUM_LOWER, b"u", 6, 6
    modulus = 36**n_index
    a, c = _affine(spec, modulus, _USERS)
    # a < 36^7 and users <= 10^8: a*users < 2^63 (int64), so the bijection is exact.
    index = (a * users.astype(np.int64) + c) % modulus
    codes = np.concatenate([
        np.full((len(users), 1), prefix[0], dtype=np.uint8),
        alphabet[rng.integers(0, 36, size=(len(users), n_random))],
        alphabet[_digits(index, 36, n_index)],
    ], axis=1)
    return _strings(codes)


def user_block(spec: ScaleSpec, b: int) -> UserBlock:
    """Users of block ``b``: a pure function of ``(spec, b)``."""
    start = b * spec.block_users
    n = min(spec.block_users, spec.users - start)
    if n <= 0:
        raise IndexError(f"block {b} is past the last user ({spec.users} users)")
    rng = np.random.default_rng(_seed(spec, _USERS, b))
    ids = _user_ids(spec, np.arange(start, start + n), rng)
    # An exact share of test users per block; the first block guarantees one of each split.
    n_test = round(n * spec.test_fraction)
    if b == 0 and spec.test_fraction > 0:
        n_test = min(max(n_test, 1), n - 1)
    is_test = np.zeros(n, dtype=bool)
    is_test[rng.permutation(n)[:n_test]] = True
    # Archetypes dealt round-robin within each split, as synth.sample_world does, so each
    # block holds every archetype in (near) equal numbers.
    archetype = np.zeros(n, dtype=np.int64)
    for split in (False, True):
        order = rng.permutation(np.flatnonzero(is_test == split))
        offset = int(rng.integers(0, len(ARCHETYPES)))
        archetype[order] = (np.arange(len(order)) + offset) % len(ARCHETYPES)
    gain = rng.uniform(*spec.archetype_strength, size=n)
    personal = rng.normal(0.0, spec.personal_sd, size=(n, len(ATTRIBUTES)))
    bias = rng.normal(0.0, spec.bias_sd, size=n)
    scale = rng.uniform(*spec.scale_range, size=n)
    k = spec.levels
    base = 0.5 + 5.0 * np.arange(1, k) / k  # 1.5, 2.5, 3.5, 4.5 for 5 levels (synth's)
    thresholds = np.sort(base + rng.normal(0.0, spec.threshold_sd, size=(n, k - 1)), axis=1)
    draws = np.exp(rng.normal(math.log(spec.ratings_median), spec.ratings_sigma, size=n))
    n_ratings = np.clip(np.rint(draws), spec.ratings_min, spec.max_ratings).astype(np.int64)
    return UserBlock(
        start=start, ids=ids, is_test=is_test, archetype=archetype,
        weights=gain[:, None] * _ARCH_W[archetype] + personal, bias=bias, scale=scale,
        thresholds=thresholds, n_ratings=n_ratings,
    )


# ---------------------------------------------------------------------------------------------
# Pass 1: population quantities from per-user sums


@dataclass(frozen=True)
class Population:
    """What the ratings depend on beyond one user: ``z_sd`` and the average user."""

    z_sd: float  #: population sd of z over all users x all images (synth.sample_world's)
    average_latent: np.ndarray  #: [N] mean latent of the training users, 1-5 scale
    users: int
    test_users: int
    ratings: int


def population(spec: ScaleSpec, pool: ImagePool) -> Population:
    """One streaming pass over the users (parameters only, no ratings).

    ``z = s_i + w_u . a_i``; over the users x images grid, ``E[z] = mean(s) + mean(w) . mean(a)``
    and ``E[z^2] = mean(s^2) + 2 mean(w) . mean(s a) + tr(mean(w w^T) mean(a a^T))``; the
    average training user's latent is ``3 + mean(bias) + (mean(scale) s_i + mean(scale w) . a_i)
    / z_sd``. Exact, in O(block) memory.
    """
    d = len(ATTRIBUTES)
    sum_w, sum_ww = np.zeros(d), np.zeros((d, d))
    t_bias = t_scale = 0.0
    t_sw = np.zeros(d)
    n_all = n_train = n_ratings = 0
    for b in range(spec.blocks):
        u = user_block(spec, b)
        sum_w += u.weights.sum(axis=0)
        sum_ww += u.weights.T @ u.weights
        train = ~u.is_test
        t_bias += float(u.bias[train].sum())
        t_scale += float(u.scale[train].sum())
        t_sw += (u.scale[train, None] * u.weights[train]).sum(axis=0)
        n_all += len(u.ids)
        n_train += int(train.sum())
        n_ratings += int(u.n_ratings.sum())
    a, s = pool.attrs, pool.shared
    w_mean, ww_mean = sum_w / n_all, sum_ww / n_all
    mean_z = s.mean() + w_mean @ a.mean(axis=0)
    mean_z2 = (s**2).mean() + 2.0 * w_mean @ (s[:, None] * a).mean(axis=0) + float(np.sum(ww_mean * (a.T @ a / len(a))))
    z_sd = math.sqrt(max(mean_z2 - mean_z**2, 0.0))
    if not z_sd > 0:
        raise ValueError("degenerate world: the preference z has no variance")
    average = 3.0 + t_bias / n_train + (t_scale / n_train * s + a @ (t_sw / n_train)) / z_sd
    return Population(z_sd=z_sd, average_latent=average, users=n_all, test_users=n_all - n_train,
                      ratings=n_ratings)


# ---------------------------------------------------------------------------------------------
# Pass 2: ratings, block by block


@dataclass(frozen=True)
class RatingsBlock:
    """One block's ratings, row-aligned with their truth. Latents are rounded to 6 decimals
    and on the ratings' scale (what the sidecar holds)."""

    users: UserBlock
    owner: np.ndarray  #: [R] index into users.ids
    image: np.ndarray  #: [R] index into the pool
    score: np.ndarray  #: [R] int, on spec.score_range
    latent: np.ndarray  #: [R]
    average_latent: np.ndarray  #: [R]


def _distinct_images(rng: np.random.Generator, n_ratings: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """For each user, ``n_ratings[u]`` distinct images drawn uniformly: ``(owner, image)``."""
    owner = np.repeat(np.arange(len(n_ratings)), n_ratings)
    image = rng.integers(0, n_images, size=len(owner))
    # Redraw repeats until none are left; cheap while a user rates a small share of the pool.
    # Users who rate over a quarter of it take a permutation instead (rejection would crawl).
    heavy = n_ratings * 4 > n_images
    light = ~heavy[owner]
    while True:
        key = owner * n_images + image
        order = np.argsort(key, kind="stable")
        repeat = np.zeros(len(key), dtype=bool)
        repeat[order[1:][key[order][1:] == key[order][:-1]]] = True
        repeat &= light
        if not repeat.any():
            break
        image[repeat] = rng.integers(0, n_images, size=int(repeat.sum()))
    for u in np.flatnonzero(heavy):
        image[owner == u] = rng.permutation(n_images)[: n_ratings[u]]
    return owner, image


def _to_scale(spec: ScaleSpec, latent15: np.ndarray) -> np.ndarray:
    """The 1-5 latent scale ([0.5, 5.5]) mapped onto the ratings' ([lo - 0.5, hi + 0.5])."""
    lo = spec.scale[0]
    return lo - 0.5 + (latent15 - 0.5) * (spec.levels / 5.0)


def ratings_block(spec: ScaleSpec, pool: ImagePool, pop: Population, b: int) -> RatingsBlock:
    """The ratings of block ``b``: a pure function of ``(spec, b)`` given the pool and population."""
    users = user_block(spec, b)
    rng = np.random.default_rng(_seed(spec, _RATINGS, b))
    owner, image = _distinct_images(rng, users.n_ratings, spec.images)
    z = pool.shared[image] + np.einsum("rd,rd->r", users.weights[owner], pool.attrs[image])
    latent15 = 3.0 + users.bias[owner] + users.scale[owner] * z / pop.z_sd
    noisy = latent15 + rng.normal(0.0, 1.0, size=len(owner)) * (spec.noise_sd * users.scale[owner])
    score = spec.scale[0] + (noisy[:, None] > users.thresholds[owner]).sum(axis=1)
    if spec.layout == "ratings":
        # A log is not grouped by user: interleave the block's rows.
        order = rng.permutation(len(owner))
        owner, image, score, latent15 = owner[order], image[order], score[order], latent15[order]
    return RatingsBlock(
        users=users, owner=owner, image=image, score=score,
        latent=np.round(_to_scale(spec, latent15), 6),
        average_latent=np.round(_to_scale(spec, pop.average_latent[image]), 6),
    )


def iter_blocks(spec: ScaleSpec, pool: ImagePool | None = None,
                pop: Population | None = None) -> Iterator[RatingsBlock]:
    """Every block's ratings, in user order (two passes: :func:`population`, then ratings)."""
    pool = pool if pool is not None else image_pool(spec)
    pop = pop if pop is not None else population(spec, pool)
    for b in range(spec.blocks):
        yield ratings_block(spec, pool, pop, b)


# ---------------------------------------------------------------------------------------------
# Ceilings, per block


class _Ceilings:
    """Per-split ceilings accumulated block by block (:func:`piaa_dist.metrics.ceilings_by_group`).

    Users never span blocks, so combining the blocks' ceilings equals computing them at once.
    """

    def __init__(self) -> None:
        self.by_split = {s: Ceilings(None, None, 0, 0) for s in ("all", "train", "test")}

    def add(self, block: RatingsBlock) -> None:
        test = block.users.is_test[block.owner]
        for split, mask in (("all", np.ones_like(test)), ("train", ~test), ("test", test)):
            if mask.any():
                part = ceilings_by_group(block.owner[mask], block.latent[mask],
                                         block.average_latent[mask], block.score[mask])
                self.by_split[split] = self.by_split[split].combine(part)

    def result(self) -> dict[str, dict[str, Any]]:
        return {split: c.to_dict() for split, c in self.by_split.items()}


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class ScaleSummary:
    """What :func:`write_scale_world` wrote."""

    out: str
    layout: str
    ratings_file: str
    sidecar_file: str
    users: int
    train_users: int
    test_users: int
    images: int
    ratings: int
    score_range: tuple[int, int]
    ratings_per_user: dict[str, Any] = field(default_factory=dict)
    ceilings: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class _CsvSink:
    """Ratings + sidecar as CSV text, one write per block."""

    def __init__(self, spec: ScaleSpec, out: Path, ratings_path: Path, sidecar_path: Path):
        self.spec = spec
        self.files = ExitStack()
        self.ratings = self.files.enter_context(_text_file(ratings_path))
        self.sidecar = self.files.enter_context(_text_file(sidecar_path))
        self.tests = None
        if spec.layout == "flickr-aes":
            # The real file's quirk: a space after every comma, in the header and the rows.
            self.ratings.write("worker, imagePair, score\n")
            self.sidecar.write("worker,imagePair,latent,average_latent\n")
            self.tests = self.files.enter_context(_text_file(out / TEST_WORKERS_FILE))
            self.tests.write("ID\n")
        else:
            self.ratings.write("user,image,score" + (",split\n" if spec.test_fraction > 0 else "\n"))
            self.sidecar.write("user,image,latent,average_latent\n")

    def write(self, blk: RatingsBlock, names: np.ndarray) -> None:
        users = blk.users.ids[blk.owner].tolist()
        images = names[blk.image].tolist()
        scores = blk.score.tolist()
        if self.tests is not None:
            rows = [f"{u}, {i}, {s}\n" for u, i, s in zip(users, images, scores)]
            self.tests.write("".join(f"{u}\n" for u in blk.users.ids[blk.users.is_test].tolist()))
        elif self.spec.test_fraction > 0:
            split = np.where(blk.users.is_test[blk.owner], "test", "train").tolist()
            rows = [f"{u},{i},{s},{t}\n" for u, i, s, t in zip(users, images, scores, split)]
        else:
            rows = [f"{u},{i},{s}\n" for u, i, s in zip(users, images, scores)]
        self.ratings.write("".join(rows))
        self.sidecar.write("".join(
            f"{u},{i},{lat:.6f},{avg:.6f}\n"
            for u, i, lat, avg in zip(users, images, blk.latent.tolist(), blk.average_latent.tolist())
        ))

    def close(self) -> None:
        self.files.close()


class _ParquetSink(_CsvSink):
    """Ratings as Parquet (row groups of at least ``group_rows``), the sidecar as CSV."""

    def __init__(self, spec: ScaleSpec, out: Path, ratings_path: Path, sidecar_path: Path,
                 group_rows: int = 1 << 17):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.spec = spec
        self.files = ExitStack()
        self.sidecar = self.files.enter_context(_text_file(sidecar_path))
        self.sidecar.write("user,image,latent,average_latent\n")
        self.tests = None
        fields = [("user", pa.string()), ("image", pa.string()), ("score", pa.int32())]
        if spec.test_fraction > 0:
            fields.append(("split", pa.string()))
        self.schema = pa.schema(fields)
        self.writer = pq.ParquetWriter(ratings_path, self.schema)
        self.group_rows = group_rows
        self.pending: list[Any] = []
        self.pending_rows = 0

    def write(self, blk: RatingsBlock, names: np.ndarray) -> None:
        pa = self.pa
        users = blk.users.ids[blk.owner]
        images = names[blk.image]
        cols = [pa.array(users, pa.string()), pa.array(images, pa.string()),
                pa.array(blk.score.astype(np.int32))]
        if self.spec.test_fraction > 0:
            cols.append(pa.array(np.where(blk.users.is_test[blk.owner], "test", "train").astype(object), pa.string()))
        self.pending.append(pa.Table.from_arrays(cols, schema=self.schema))
        self.pending_rows += len(blk.owner)
        if self.pending_rows >= self.group_rows:
            self._flush()
        self.sidecar.write("".join(
            f"{u},{i},{lat:.6f},{avg:.6f}\n"
            for u, i, lat, avg in zip(users.tolist(), images.tolist(), blk.latent.tolist(),
                                      blk.average_latent.tolist())
        ))

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(self.pa.concat_tables(self.pending), row_group_size=self.pending_rows)
            self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        try:
            self._flush()
            self.writer.close()
        finally:
            self.files.close()


def _text_file(path: Path) -> TextIO:
    return open(path, "w", newline="", encoding="utf-8")


def _encode_jpeg(img: Any, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def render_pool(spec: ScaleSpec, pool: ImagePool, out: str | Path, *, workers: int = 4,
                progress: Callable[[Iterable], Iterable] | None = None) -> None:
    """Render every image of the pool to ``out/images/<name>`` (deterministic per image)."""
    root = Path(out) / IMAGES_DIR
    for folder in sorted({str(Path(n).parent) for n in pool.names}):
        (root / folder).mkdir(parents=True, exist_ok=True)

    def render(i: int) -> None:
        rng = np.random.default_rng(_seed(spec, _RENDER, i))
        img = render_image(pool.attrs[i], rng, spec.image_size)
        (root / pool.names[i]).write_bytes(_encode_jpeg(img, spec.jpeg_quality))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        it = ex.map(render, range(len(pool.names)))
        for _ in progress(it) if progress else it:
            pass


def write_scale_world(
    out: str | Path,
    spec: ScaleSpec | None = None,
    *,
    images: bool = True,
    workers: int = 4,
    progress: Callable[[Iterable, int, str], Iterable] | None = None,
) -> ScaleSummary:
    """Generate a scale world into ``out`` (created; existing world files are overwritten).

    Args:
        out: destination folder.
        spec: sizes, layout and generative parameters (defaults: :class:`ScaleSpec`).
        images: render the image pool (False writes the ratings and truth only, e.g. to
            benchmark or to reuse a pool rendered before with the same seed and size).
        workers: threads rendering images.
        progress: optional ``progress(iterable, total, description)`` wrapper (e.g. tqdm).

    Returns:
        A :class:`ScaleSummary` (counts, the ratings-per-user distribution, ceilings, timings).
    """
    spec = spec or ScaleSpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wrap = progress or (lambda it, total, desc: it)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    pool = image_pool(spec)
    pop = population(spec, pool)
    seconds["population"] = time.perf_counter() - t0

    if spec.layout == "flickr-aes":
        ratings_path = out / RATINGS_FILE
    else:
        ratings_path = out / f"{RATINGS_LOG}.{spec.format}"
    sidecar_path = ratings_path.parent / SIDECAR_FILE
    sink = (_ParquetSink if spec.format == "parquet" else _CsvSink)(spec, out, ratings_path, sidecar_path)
    ceil = _Ceilings()
    per_user = np.zeros(spec.max_ratings + 1, dtype=np.int64)
    raters = np.zeros(spec.images, dtype=np.int64)
    n_ratings = 0
    t0 = time.perf_counter()
    try:
        for blk in wrap(iter_blocks(spec, pool, pop), spec.blocks, "ratings"):
            sink.write(blk, pool.names)
            ceil.add(blk)
            per_user += np.bincount(blk.users.n_ratings, minlength=len(per_user))
            raters += np.bincount(blk.image, minlength=spec.images)
            n_ratings += len(blk.owner)
    finally:
        sink.close()
    seconds["ratings"] = time.perf_counter() - t0

    with open(out / ATTRIBUTES_FILE, "w", newline="", encoding="utf-8") as f:
        f.write(("imagePair," if spec.layout == "flickr-aes" else "image,") + ",".join(ATTRIBUTES) + "\n")
        f.write("".join(name + "," + ",".join(f"{v:.6f}" for v in a) + "\n"
                        for name, a in zip(pool.names.tolist(), pool.attrs.tolist())))
    if images:
        t0 = time.perf_counter()
        render_pool(spec, pool, out, workers=workers,
                    progress=(lambda it: wrap(it, spec.images, "render")) if progress else None)
        seconds["images"] = time.perf_counter() - t0

    distribution = _distribution(per_user)
    summary = ScaleSummary(
        out=str(out), layout=spec.layout, ratings_file=ratings_path.name, sidecar_file=sidecar_path.name,
        users=pop.users, train_users=pop.users - pop.test_users, test_users=pop.test_users,
        images=spec.images, ratings=n_ratings, score_range=spec.scale,
        ratings_per_user=distribution, ceilings=ceil.result(), seconds=seconds,
    )
    world = {
        "format": FORMAT_TAG,
        "layout": spec.layout,
        "spec": asdict(spec),
        "files": {
            "ratings": ratings_path.name,
            "sidecar": sidecar_path.name,
            "images": IMAGES_DIR + "/" if images else None,
            "attributes": ATTRIBUTES_FILE,
            "test_users": TEST_WORKERS_FILE if spec.layout == "flickr-aes" else None,
        },
        "score_range": list(spec.scale),
        "counts": {"users": summary.users, "train_users": summary.train_users,
                   "test_users": summary.test_users, "images": spec.images, "ratings": n_ratings},
        "ratings_per_user": distribution,
        "raters_per_image": {"min": int(raters.min()), "max": int(raters.max()), "mean": float(raters.mean())},
        "taste": {
            "model": "piaa_dist.data.synth (shared + archetype + personal; per-user scale use; noise)",
            "z_sd": pop.z_sd,
            "latent": (f"noise-free score, on the ratings' scale {spec.scale[0]}-{spec.scale[1]}: "
                       "the 1-5 latent [0.5, 5.5] mapped affinely onto [lo - 0.5, hi + 0.5]"),
            "average_latent": "mean latent of the training users (per image)",
            "thresholds": "lo + #{user thresholds < latent + noise}; base thresholds evenly spaced",
        },
        "ceilings": summary.ceilings,
        "seconds": seconds,
    }
    (out / WORLD_FILE).write_text(json.dumps(world, indent=1) + "\n")
    log.info("wrote a %s scale world to %s: %d users (%d test), %d images, %d ratings",
             spec.layout, out, summary.users, summary.test_users, spec.images, n_ratings)
    return summary


def _distribution(per_user: np.ndarray) -> dict[str, Any]:
    """Summary of the ratings-per-user counts (a histogram over log-spaced bins)."""
    n = np.arange(len(per_user))
    users = int(per_user.sum())
    cum = np.cumsum(per_user)

    def quantile(q: float) -> int:
        return int(np.searchsorted(cum, q * users, side="left"))

    edges = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
    bins = {}
    for lo, hi in zip(edges, edges[1:] + [len(per_user) + 1]):
        count = int(per_user[lo:hi].sum())
        if count:
            bins[f"{lo}-{hi - 1}"] = count
    return {
        "min": int(n[per_user > 0].min()),
        "max": int(n[per_user > 0].max()),
        "mean": float((n * per_user).sum() / users),
        "median": quantile(0.5),
        "p90": quantile(0.9),
        "p99": quantile(0.99),
        "histogram": bins,
    }
