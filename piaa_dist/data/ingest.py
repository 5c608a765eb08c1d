"""Ingestion: rating files and images to a new, atomically published dataset version.

Three stages, so the same code runs in one process or spread over workers (the
orchestration layer may run :func:`ingest_partition` in Ray tasks; this module never imports
Ray):

1. :func:`plan_ingest` (driver): check the output store (a missing bucket or missing
   credentials fail here), read the rating files (:mod:`piaa_dist.data.readers`), check every
   image *path* (outside the image folder, missing), validate user IDs (names that collide
   after sanitising, or are too long, fail here, naming the rows), and pack users into shards.
   No image is decoded; everything that can fail on the input fails before the expensive work.
2. :func:`ingest_partition` (a worker, any number of them): decode, re-encode and write the
   shards of one partition straight to the store, streaming (memory: a bounded window of
   images plus one upload part, whatever the dataset size); returns its manifest rows. Each
   distinct image is encoded once per ingest and machine: encoded images go to an on-disk store
   (:mod:`piaa_dist.data.encstore`) that all partitions of the ingest on that machine share.
3. :func:`publish` (driver): write the manifest and the report into the version, check that
   every shard the rows name is there, then switch the dataset's pointer (one atomic write).
   See :mod:`piaa_dist.data.layout` for what this guarantees readers.

Packing (issue 12): a shard holds about ``shard_size`` samples of whole users, contiguously,
in sorted user order; a user larger than a shard spans several. Packing is a pure function of
the sorted users and their candidate rating counts (known before any image is processed), and
a partition is a run of whole shards, so the bytes written are identical whatever the number
of partitions or workers. Images that fail at decode time leave gaps in their shard, never
moving another user.

Determinism: images are re-encoded with fixed settings, tar members carry fixed metadata
(:mod:`piaa_dist.data.tarfmt`), users are sorted and a user's samples keep file order, so
re-ingesting the same input gives byte-identical shards and manifest (the version ID lives
only in the folder name and the pointer).

Sample in a shard: key ``<user>_<i:06d>`` (``<user>`` is the ID with every character outside
``[A-Za-z0-9_-]`` replaced by ``_``; ``i`` the rating's index among the user's candidates);
members ``<key>.jpg`` (JPEG, longest side <= ``max_side``) and ``<key>.json`` =
``{"user", "image", "score", "latent", "average_latent"}`` (``score`` on 1-5: an int for
FLICKR-AES/AADB, a float for PARA and ratings logs, which also carry ``raw_score``, the
file's own value, when the scale is not 1-5).

Accounting: every record read is either ingested or skipped with a reason. Records are ratings
and test-list entries; the report keeps the two kinds apart and sums them:
``read == ingested + sum(skipped)`` holds for each kind and for the total.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import resource
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL
import pyarrow as pa

from piaa_dist.data.encstore import EncodedImageStore, entry_key, remove_store
from piaa_dist.data.images import (
    DEFAULT_MAX_PIXELS,
    ByteLRU,
    ImageSource,
    MissingImage,
    TooManyPixels,
    process_image,
)
from piaa_dist.data.layout import POINTER, REPORT, new_version_id, version_prefix, write_pointer
from piaa_dist.data.manifest import FORMAT_VERSION, MANIFEST, ManifestRows, Part, manifest_bytes, shard_name
from piaa_dist.data.readers import SKIP_LABELS, SKIP_REASONS, SkipLog, SourceRead, read_source
from piaa_dist.data.tarfmt import (
    MAX_NAME_BYTES,
    TAR_MTIME,  # noqa: F401 - re-exported for callers of the old module
    TAR_OWNER,  # noqa: F401
    end_of_archive,
    sample_bytes,
    write_tar,  # noqa: F401 - re-exported: the public tar writer lives in tarfmt
    write_tar_with_tarfile,
)
from piaa_dist.errors import DataError, StorageError
from piaa_dist.storage import Store, open_store

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_IMAGE_CACHE_MB", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_SIDE", "DEFAULT_QUALITY", "DEFAULT_SHARD_SIZE",
    "IngestPlan", "IngestSettings", "MANIFEST", "PartitionResult", "PartitionSpec", "REPORT", "format_report",
    "ingest", "ingest_dataset", "ingest_partition", "plan_ingest", "process_image", "publish", "safe_name",
    "write_tar",
]

DEFAULT_MAX_SIDE = 256
DEFAULT_QUALITY = 90
#: Target samples per shard. At the default 256 px a sample is ~20-30 KB, so ~200-300 MB per
#: shard: WebDataset's guidance of hundreds of MB, and few objects for many small users.
DEFAULT_SHARD_SIZE = 10_000
#: Re-encoded images kept per partition so an image rated by several users is decoded once:
#: at most this many MB, and never more images than one shard has samples (so the memory the
#: cache adds is bounded by one shard's batch, whatever the size of the dataset).
DEFAULT_IMAGE_CACHE_MB = 64
#: Reference implementation of the tar writer (tests compare the two).
_write_tar_with_tarfile = write_tar_with_tarfile

_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_name(user: str) -> str:
    """A user ID as used in sample keys (no dots, no slashes)."""
    return _SAFE.sub("_", user)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


@dataclass(frozen=True)
class IngestSettings:
    """How images are processed and shards cut (recorded in the manifest and report).

    Attributes:
        max_side: longest side of stored images.
        quality: JPEG quality of stored images.
        shard_size: target samples per shard (whole users; a larger user spans shards).
        max_pixels: images with more pixels are skipped (``too_many_pixels``), not decoded.
        image_cache_mb: re-encoded images kept per partition (shared by raters of an image),
            at most; the cache also never holds more than ``shard_size`` images, so what it
            adds to a worker's memory is bounded by one shard's batch.
        workers: threads per partition for image work and uploads.
        strict: fail on the first skip instead of counting it.
        encode_store: keep every re-encoded image in an on-disk store for the length of the
            ingest (:mod:`piaa_dist.data.encstore`), so each distinct image is encoded once per
            machine, not once per rater that the image cache has forgotten. Off, the output is
            the same bytes, only slower on large image pools.
        encode_store_dir: the folder the store's per-ingest subfolder ``piaa-encode-<version>``
            is made in (default: the system's temp folder, ``$TMPDIR``); the subfolder is
            removed when the ingest ends. It costs about the distinct images' encoded bytes.
    """

    max_side: int = DEFAULT_MAX_SIDE
    quality: int = DEFAULT_QUALITY
    shard_size: int = DEFAULT_SHARD_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB
    workers: int = 4
    strict: bool = False
    encode_store: bool = True
    encode_store_dir: str | None = None

    def __post_init__(self) -> None:
        if self.max_side < 8:
            raise DataError(f"max_side must be at least 8, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise DataError(f"JPEG quality must be 1-100, got {self.quality}")
        if self.shard_size < 1:
            raise DataError(f"shard_size must be at least 1, got {self.shard_size}")
        if self.max_pixels < 1:
            raise DataError(f"max_pixels must be at least 1, got {self.max_pixels}")
        if self.image_cache_mb < 0:
            raise DataError(f"image_cache_mb must be >= 0, got {self.image_cache_mb}")


@dataclass
class PartitionSpec:
    """Everything one partition needs, self-contained and picklable (ships to a worker).

    Samples are in write order: users in sorted order, a user's ratings in file order.
    """

    index: int
    out_url: str
    endpoint_url: str | None
    version: str
    settings: IngestSettings
    images: ImageSource
    ratings_file: str
    integer_scores: bool
    keep_raw: bool
    users: list[str]
    is_test: np.ndarray  #: per user
    user_start: np.ndarray  #: per user + 1: first sample of each user
    image_names: list[str]  #: distinct images of this partition
    image_refs: list[str]  #: what ImageSource.read takes, aligned with image_names
    image_gid: np.ndarray  #: dataset-wide image index of each distinct image
    s_image: np.ndarray  #: per sample: index into image_names
    s_score: np.ndarray
    s_raw: np.ndarray
    s_row: np.ndarray
    s_slot: np.ndarray
    s_shard: np.ndarray  #: per sample: the planned shard
    s_latent: np.ndarray | None
    s_avg: np.ndarray | None
    #: this ingest's encoded-image store folder (the same path on every machine), or None
    encode_store: str | None = None

    @property
    def n_samples(self) -> int:
        return len(self.s_score)


@dataclass
class PartitionResult:
    """What a partition returns to the driver (small: no image bytes)."""

    index: int
    rows: pa.Table
    skips: SkipLog
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    image_decodes: int = 0
    image_cache_hits: int = 0
    #: the encoded-image store's counters in this partition (EncodedImageStore.stats()), empty if off
    image_store: dict[str, int] = field(default_factory=dict)
    image_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    peak_rss_mb: float = 0.0
    seconds: float = 0.0


@dataclass
class IngestPlan:
    """The driver's plan: what to write where, before any image is decoded."""

    fmt: str
    source: str  #: recorded source ("synth" for a world with a truth sidecar)
    out_url: str
    endpoint_url: str | None
    version: str
    settings: IngestSettings
    src: SourceRead
    images: ImageSource
    skips: SkipLog  #: reader and plan-time skips
    users: list[str]  #: sorted users with at least one candidate
    user_uid: np.ndarray  #: their index in src.users
    user_start: np.ndarray  #: per user + 1, into the sample arrays below
    sample_idx: np.ndarray  #: per sample (write order): index into src's candidate arrays
    sample_shard: np.ndarray
    image_refs: dict[int, str]  #: located images (src image index -> ref)
    cut_points: np.ndarray  #: user positions where a partition may start (a fresh shard)
    n_shards: int
    #: the encoded-image store folder of this ingest (``piaa-encode-<version>``), or None when off
    encode_store: str | None = None
    started: float = field(default_factory=time.time)

    def partitions(self, n: int) -> list[PartitionSpec]:
        """The plan cut into at most ``n`` partitions of whole shards, balanced by samples.

        A pure function of the plan and ``n``; the output bytes do not depend on ``n``.
        """
        return [self.partition(i, a, b) for i, (a, b) in enumerate(self.partition_bounds(n))]

    def partition_bounds(self, n: int) -> list[tuple[int, int]]:
        """User ranges ``[u0, u1)`` of :meth:`partitions` (specs are built one at a time from
        them with :meth:`partition`, so a driver need not hold every spec at once)."""
        n = max(1, int(n))
        total = len(self.sample_idx)
        bounds = [0]
        for k in range(1, n):
            target = total * k / n
            # The first allowed cut at or after the target sample count.
            pos = int(np.searchsorted(self.user_start[self.cut_points], target, "left"))
            if pos < len(self.cut_points):
                cut = int(self.cut_points[pos])
                if cut > bounds[-1]:
                    bounds.append(cut)
        bounds.append(len(self.users))
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def partition(self, index: int, u0: int, u1: int) -> PartitionSpec:
        """The spec of users ``[u0, u1)`` (must start and end at shard boundaries)."""
        src = self.src
        a, b = int(self.user_start[u0]), int(self.user_start[u1])
        idx = self.sample_idx[a:b]
        gids, local = np.unique(src.iid[idx], return_inverse=True)
        return PartitionSpec(
            index=index,
            out_url=self.out_url,
            endpoint_url=self.endpoint_url,
            version=self.version,
            settings=self.settings,
            images=self.images,
            ratings_file=src.ratings_file,
            integer_scores=src.integer_scores,
            keep_raw=src.keep_raw,
            users=self.users[u0:u1],
            is_test=src.is_test[self.user_uid[u0:u1]],
            user_start=self.user_start[u0 : u1 + 1] - a,
            image_names=[src.images[g] for g in gids],
            image_refs=[self.image_refs[int(g)] for g in gids],
            image_gid=gids.astype(np.int64),
            s_image=local.astype(np.int32).reshape(-1),
            s_score=src.score[idx],
            s_raw=src.raw[idx],
            s_row=src.row[idx],
            s_slot=src.slot[idx],
            s_shard=self.sample_shard[a:b],
            s_latent=None if src.latent is None else src.latent[idx],
            s_avg=None if src.average_latent is None else src.average_latent[idx],
            encode_store=self.encode_store,
        )

    def remove_encode_store(self) -> None:
        """Delete this ingest's encoded-image store on this machine (if any; never fails).

        A Ray driver must also have it removed on every other node its tasks ran on.
        """
        if self.encode_store:
            remove_store(self.encode_store)


def _strict_error(skips: SkipLog) -> DataError:
    s = skips.first
    assert s is not None
    return DataError(f"{s.where()}: {SKIP_LABELS[s.reason]}: {s.detail} (--strict)")


def pack_shards(counts: np.ndarray, shard_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Assign each sample to a shard: users in order, whole users per shard where possible.

    A user joins the current shard if it fits, else starts a new one; a user larger than a
    shard fills whole shards and its remainder starts the next. Pure in ``(counts, shard_size)``.

    Returns:
        ``(sample_shard, cut_points, n_shards)``: the shard of every sample (users
        concatenated), the user positions that start a fresh shard, and the shard count.
    """
    total = int(counts.sum())
    sample_shard = np.empty(total, np.int32)
    cuts = []
    shard, fill, pos = 0, 0, 0
    for u, n in enumerate(counts.tolist()):
        if fill and fill + n > shard_size:
            shard, fill = shard + 1, 0
        if fill == 0:
            cuts.append(u)
        left = n
        while left:
            take = min(left, shard_size - fill)
            sample_shard[pos : pos + take] = shard
            pos += take
            left -= take
            fill += take
            if fill == shard_size:
                shard, fill = shard + 1, 0
    n_shards = shard + (1 if fill else 0)
    return sample_shard, np.array(cuts, dtype=np.int64), n_shards


def _check_user_ids(src: SourceRead, uids: np.ndarray, counts: np.ndarray) -> None:
    """Sample keys must be unique and fit a tar header: fail early, naming the rows."""
    seen: dict[str, int] = {}
    for uid, n in zip(uids.tolist(), counts.tolist()):
        user = src.users[uid]
        key = safe_name(user)
        width = max(6, len(str(max(0, n - 1))))
        if len(key) + 1 + width + len(".json") > MAX_NAME_BYTES:
            raise DataError(f"{src.ratings_file}:{int(src.user_first_row[uid])}: user ID {user[:40]!r}... is "
                            f"{len(user)} characters; sample keys allow at most "
                            f"{MAX_NAME_BYTES - 1 - width - len('.json')}")
        other = seen.get(key)
        if other is not None:
            ou = src.users[other]
            raise DataError(
                f"{src.ratings_file}:{int(src.user_first_row[uid])}: user ID {user!r} and {ou!r} (line "
                f"{int(src.user_first_row[other])}) both become the sample key {key!r} once characters outside "
                "[A-Za-z0-9_-] are replaced; rename one of them"
            )
        seen[key] = uid


def plan_ingest(
    fmt: str,
    root: str | Path | None,
    out_url: str,
    *,
    test_workers: str | Path | None = None,
    test_users: str | Path | None = None,
    test_fraction: float | None = None,
    split_seed: int = 0,
    fold: int | None = None,
    ratings_file: str | Path | None = None,
    images_dir: str | Path | None = None,
    score_range: tuple[float, float] | None = None,
    endpoint_url: str | None = None,
    settings: IngestSettings | None = None,
) -> IngestPlan:
    """Read, check and pack; no image is decoded and nothing is written but folders.

    Args: see :func:`ingest`.

    Raises:
        StorageError: the output (or an ``s3://`` image root) cannot be used: missing bucket,
            missing credentials, unreachable endpoint.
        DataError: unreadable input files, colliding or too long user IDs, with ``strict``
            the first skipped record (each names the file and row).
    """
    settings = settings or IngestSettings()
    store = open_store(out_url, endpoint_url)
    store.check()
    src = read_source(fmt, root, test_users=test_users or test_workers, test_fraction=test_fraction,
                      split_seed=split_seed, fold=fold, ratings_file=ratings_file, images_dir=images_dir,
                      score_range=score_range, endpoint_url=endpoint_url)
    images = ImageSource(src.images_dir, endpoint_url)
    images.check()
    skips = src.skips
    if settings.strict and skips.first is not None:
        raise _strict_error(skips)

    # Image paths: refuse those outside the folder, find missing ones (local folders), all
    # before decoding anything.
    used = np.unique(src.iid) if src.n else np.zeros(0, np.int32)
    status = np.zeros(len(src.images), np.int8)  # 0 ok, 1 outside, 2 missing
    refs: dict[int, str] = {}
    fallback = 0
    for iid in used.tolist():
        name = src.images[iid]
        state, ref = images.locate(name) if name else ("missing", None)
        if state == "missing" and src.image_fallback == "basename" and "/" in name:
            state, ref = images.locate(name.rsplit("/", 1)[1])
            fallback += state == "ok"
        if state == "ok":
            refs[iid] = ref
        else:
            status[iid] = 1 if state == "outside" else 2
    if fallback:
        log.info("%d image(s) found by file name only (a flattened image folder)", fallback)
    bad = status[src.iid] if src.n else np.zeros(0, np.int8)
    for code, reason in ((1, "outside_image_folder"), (2, "missing_image")):
        idx = np.flatnonzero(bad == code)
        if len(idx):
            def detail(i: int, idx: np.ndarray = idx, reason: str = reason) -> str:
                j = int(idx[i])
                where = f"slot {src.slot[j]}: " if src.slot[j] else ""
                name = src.images[src.iid[j]]
                if reason == "missing_image":
                    return f"{where}no image {images.display(name) if name else '(no image named)'}"
                return f"{where}refused image path {name!r} (outside {images.url})"
            skips.add_many(reason, src.ratings_file, src.row[idx], detail)
    if settings.strict and skips.first is not None:
        raise _strict_error(skips)
    keep = bad == 0

    # Users in sorted order, their candidates in file order.
    cand = np.flatnonzero(keep)
    per_user = np.bincount(src.uid[cand], minlength=len(src.users))
    uids = np.flatnonzero(per_user)
    order_names = sorted(uids.tolist(), key=src.users.__getitem__)
    user_uid = np.array(order_names, dtype=np.int64)
    rank = np.full(len(src.users), -1, np.int64)
    rank[user_uid] = np.arange(len(user_uid))
    sample_idx = cand[np.argsort(rank[src.uid[cand]], kind="stable")]
    counts = per_user[user_uid]
    _check_user_ids(src, user_uid, counts)
    user_start = np.zeros(len(user_uid) + 1, np.int64)
    np.cumsum(counts, out=user_start[1:])
    sample_shard, cuts, n_shards = pack_shards(counts, settings.shard_size)
    truth = src.latent is not None
    version = new_version_id()
    return IngestPlan(
        fmt=fmt, source="synth" if truth else fmt, out_url=store.url, endpoint_url=endpoint_url,
        version=version, settings=settings, src=src, images=images, skips=skips,
        users=[src.users[u] for u in order_names], user_uid=user_uid, user_start=user_start,
        sample_idx=sample_idx, sample_shard=sample_shard, image_refs=refs, cut_points=cuts, n_shards=n_shards,
        encode_store=_encode_store_path(settings, version),
    )


def _encode_store_path(settings: IngestSettings, version: str) -> str | None:
    """This ingest's store folder: a fresh subfolder per version, so no entry of another ingest
    (whose source files may since have changed) is ever read. The parent is checked now, before
    any image is decoded."""
    if not settings.encode_store:
        return None
    parent = Path(settings.encode_store_dir or tempfile.gettempdir()).expanduser()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"encoded-image store folder {parent}: cannot create it ({err.strerror or err}); "
                        "choose another with --encode-store-dir or turn the store off") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"encoded-image store folder {parent}: not writable; choose another with "
                        "--encode-store-dir or turn the store off")
    return str(parent / f"piaa-encode-{version}")


def _image_identity(images: ImageSource, ref: str) -> str | None:
    """What identifies a source image without reading it: a local file's real path, size and
    modification time (a file replaced during the ingest gets a new key); an S3 object's URL
    (the store lives for one ingest, over which the source is taken as fixed, as the plan does;
    an ETag would cost a HEAD request per image). ``None`` if the file cannot be stat'ed (the
    read then fails and is counted as usual)."""
    if images.is_s3:
        return "s3\0" + images.display(ref)
    try:
        st = os.stat(ref)
    except OSError:
        return None
    return f"file\0{ref}\0{st.st_size}\0{st.st_mtime_ns}"


def _sample_meta(spec: PartitionSpec, user: str, image: str, j: int) -> bytes:
    score: Any = int(spec.s_score[j]) if spec.integer_scores else float(spec.s_score[j])
    meta: dict[str, Any] = {"user": user, "image": image, "score": score, "latent": None, "average_latent": None}
    if spec.s_latent is not None and not np.isnan(spec.s_latent[j]):
        meta["latent"] = float(spec.s_latent[j])
        meta["average_latent"] = float(spec.s_avg[j])
    if spec.keep_raw:
        meta["raw_score"] = float(spec.s_raw[j])
    return json.dumps(meta, sort_keys=True).encode()


def ingest_partition(spec: PartitionSpec, progress: Callable[[int], None] | None = None) -> PartitionResult:
    """Decode, re-encode and write one partition's shards; return its manifest rows.

    Importable and picklable on both sides (the orchestration layer may run it in a Ray
    task). Memory is bounded by the look-ahead window of images, the image cache and one
    upload part, not by the partition's size.

    Args:
        spec: from :meth:`IngestPlan.partitions`.
        progress: called with the number of samples handled since the previous call.

    Raises:
        DataError: with ``strict``, the first image skipped (names the file and row).
        StorageError: the store cannot be written, or an S3 image root read (after retries).
    """
    t0 = time.perf_counter()
    s = spec.settings
    store = open_store(spec.out_url, spec.endpoint_url).sub(version_prefix(spec.version))
    # Encoded images of the whole ingest, on disk: an image is encoded once however many
    # raters and shards hold it (the cache below only spans one shard's batch). The key holds
    # every setting the bytes depend on, Pillow's version included.
    encoded = EncodedImageStore(spec.encode_store) if spec.encode_store else None
    params = f"max_side={s.max_side};quality={s.quality};max_pixels={s.max_pixels};pillow={PIL.__version__}"
    # At most one shard's batch of images (and image_cache_mb): with a byte bound alone the
    # cache kept filling as worlds grew (+25 MB of peak RSS from the default world to a 4x one).
    cache = ByteLRU(int(s.image_cache_mb * 1024 * 1024), max_items=s.shard_size)
    skips = SkipLog()
    rows = ManifestRows()
    decodes = [0]
    decodes_lock = threading.Lock()
    stored = np.zeros(len(spec.image_names), bool)  # distinct images written (not per sample: bounded)

    def store_key(k: int) -> str | None:
        ident = _image_identity(spec.images, spec.image_refs[k])
        return None if ident is None else entry_key("piaa-ingest-image/1", ident, params)

    def work(k: int, key: str | None) -> tuple[bytes | None, str, str]:
        try:
            data = process_image(spec.images.read(spec.image_refs[k]), s.max_side, s.quality, s.max_pixels)
        except TooManyPixels as err:
            return None, "too_many_pixels", str(err)
        except MissingImage as err:
            return None, "missing_image", str(err)
        except StorageError:
            raise  # the store, not the image: abort rather than count
        except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            return None, "unreadable_image", f"{type(err).__name__}: {err}"
        with decodes_lock:
            decodes[0] += 1
        if key is not None:
            encoded.put(key, data)
        cache.put(k, data)
        return data, "", ""

    pool = ThreadPoolExecutor(max_workers=max(1, s.workers), thread_name_prefix=f"ingest-{spec.index}")
    inflight: dict[int, Future] = {}
    window = max(8, 4 * max(1, s.workers))
    pending: deque[tuple[int, Any]] = deque()
    n = spec.n_samples
    next_j = 0

    def submit(j: int) -> Any:
        k = int(spec.s_image[j])
        hit = cache.get(k)
        if hit is not None:
            return (hit, "", "")
        fut = inflight.get(k)
        if fut is None:
            key = None
            if encoded is not None:
                # Looked up here, not in the pool: a hit is a page-cache read (~10 µs), less than
                # handing it to a thread and waiting on the future costs. On S3 sources too, as
                # the key needs no request.
                key = store_key(k)
                data = encoded.get(key) if key is not None else None
                if data is not None:
                    cache.put(k, data)
                    return (data, "", "")
            fut = inflight[k] = pool.submit(work, k, key)
        return fut

    writer = None
    writer_shard = -1
    n_shards = n_bytes = n_samples = 0
    done_since = 0
    try:
        for u, user in enumerate(spec.users):
            a, b = int(spec.user_start[u]), int(spec.user_start[u + 1])
            key = safe_name(user)
            parts: list[Part] = []
            truth = spec.s_latent is not None
            part_start = part_count = 0
            hasher = None
            for j in range(a, b):
                while next_j < n and next_j < j + window:
                    pending.append((next_j, submit(next_j)))
                    next_j += 1
                _, res = pending.popleft()
                if isinstance(res, Future):
                    k = int(spec.s_image[j])
                    if inflight.get(k) is res:
                        del inflight[k]
                    res = res.result()
                data, reason, detail = res
                done_since += 1
                if progress is not None and done_since >= 256:
                    progress(done_since)
                    done_since = 0
                if data is None:
                    where = f"slot {spec.s_slot[j]}: " if spec.s_slot[j] else ""
                    name = spec.image_names[spec.s_image[j]]
                    skips.add(reason, spec.ratings_file, int(spec.s_row[j]),
                              f"{where}{spec.images.display(name)}: {detail}")
                    if s.strict:
                        raise _strict_error(skips)
                    continue
                shard = int(spec.s_shard[j])
                if shard != writer_shard:
                    if hasher is not None and part_count:
                        parts.append(Part(writer_shard, part_start, writer.size - part_start, part_count,
                                          hasher.digest()))
                    hasher, part_count = None, 0
                    if writer is not None:
                        n_bytes += _close_shard(writer)
                        n_shards += 1
                    writer, writer_shard = store.open_writer(shard_name(shard)), shard
                if hasher is None:
                    hasher, part_start, part_count = hashlib.sha256(), writer.size, 0
                meta = _sample_meta(spec, user, spec.image_names[spec.s_image[j]], j)
                blob = sample_bytes(f"{key}_{j - a:06d}", data, meta)
                writer.write(blob)
                hasher.update(blob)
                part_count += 1
                n_samples += 1
                stored[spec.s_image[j]] = True
                if truth and np.isnan(spec.s_latent[j]):
                    truth = False
            if hasher is not None and part_count:
                parts.append(Part(writer_shard, part_start, writer.size - part_start, part_count, hasher.digest()))
            if parts:
                rows.add(user, "test" if spec.is_test[u] else "train", truth, parts)
            elif spec.is_test[u]:
                log.warning("test user %s is in the ratings file but none of their ratings could be ingested", user)
        if writer is not None:
            n_bytes += _close_shard(writer)
            n_shards += 1
            writer = None
        if progress is not None and done_since:
            progress(done_since)
    except BaseException:
        if writer is not None:
            writer.abort()
        for fut in inflight.values():
            fut.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    local = np.flatnonzero(stored)
    return PartitionResult(
        index=spec.index, rows=rows.table(), skips=skips, samples=n_samples, shards=n_shards, bytes=n_bytes,
        image_decodes=decodes[0], image_cache_hits=cache.hits, image_ids=spec.image_gid[local],
        image_store=encoded.stats() if encoded is not None else {},
        peak_rss_mb=_peak_rss_mb(), seconds=time.perf_counter() - t0,
    )


def _close_shard(writer: Any) -> int:
    writer.write(end_of_archive(writer.size))
    size = writer.size
    writer.commit()
    return size


def publish(plan: IngestPlan, results: list[PartitionResult]) -> dict[str, Any]:
    """Write the manifest and report into the version, check it, then switch the pointer.

    Args:
        plan: the plan the partitions came from.
        results: one per partition, any order.

    Returns:
        The report (also written as ``versions/<version>/ingest_report.json``).

    Raises:
        DataError: nothing could be ingested (nothing is published), or a shard the rows name
            is missing from the version.
    """
    results = sorted(results, key=lambda r: r.index)
    store = open_store(plan.out_url, plan.endpoint_url)
    vstore = store.sub(version_prefix(plan.version))
    skips = SkipLog()
    skips.merge(plan.skips)
    for r in results:
        skips.merge(r.skips)
    table = pa.concat_tables([r.rows for r in results]) if results else ManifestRows().table()
    src = plan.src
    if table.num_rows == 0:
        raise DataError(f"{src.ratings_file}: no rating could be ingested ({len(skips)} skipped; "
                        f"images looked up in {src.images_dir}); nothing was published")
    s = plan.settings
    named = {shard_name(i) for i in np.unique(table.column("shards").combine_chunks().flatten().to_numpy()).tolist()}
    present = set(vstore.list("shards/"))
    lost = sorted(named - present)
    if lost:
        raise DataError(f"{vstore.url_of(lost[0])} is named by the manifest but was not written; nothing was published")
    meta = {"source": plan.source, "max_side": str(s.max_side), "jpeg_quality": str(s.quality),
            "shard_size": str(s.shard_size)}
    vstore.write_bytes(MANIFEST, manifest_bytes(table, meta))
    report = build_report(plan, results, skips, table, store, vstore)
    vstore.write_bytes(REPORT, (json.dumps(report, indent=1) + "\n").encode())
    write_pointer(store, plan.version, {"users": report["users"]["train"] + report["users"]["test"],
                                        "ratings": report["ratings"]["ingested"], "bytes": report["bytes"]})
    log.info("published version %s of %s: %d of %d ratings, %d shards", plan.version, store.url,
             report["ratings"]["ingested"], report["ratings"]["read"], report["shards"])
    return report


def build_report(plan: IngestPlan, results: list[PartitionResult], skips: SkipLog, table: pa.Table,
                 store: Store, vstore: Store) -> dict[str, Any]:
    """The ingest report: counts by kind and reason, examples, output and resource summary."""
    src, s = plan.src, plan.settings
    samples = sum(r.samples for r in results)
    ratings = {"read": src.ratings_read, "ingested": samples, "skipped": skips.by_reason("ratings")}
    tests_read = len(src.test_entries) + skips.counts.get(("test_workers", "duplicate_row"), 0)
    is_test_users = int(src.is_test.sum()) if src.test_entries else 0
    tests = {"read": tests_read, "ingested": is_test_users if src.test_file else 0,
             "skipped": skips.by_reason("test_workers")}
    for name, part in (("ratings", ratings), ("test_workers", tests)):
        total = part["ingested"] + sum(part["skipped"].values())
        if total != part["read"]:
            raise AssertionError(f"ingest accounting bug ({name}): read {part['read']} != {total}")
    images = np.unique(np.concatenate([r.image_ids for r in results])) if results else np.zeros(0)
    splits = table.column("split").to_pylist()
    n_shards = sum(r.shards for r in results)
    has_truth = table.column("has_truth").to_pylist()
    return {
        "version": FORMAT_VERSION,
        "dataset_version": plan.version,
        "source": plan.source,
        "format": plan.fmt,
        "ratings_file": src.ratings_file,
        "images_dir": src.images_dir,
        "test_workers_file": src.test_file,
        "test_fraction": src.test_fraction,
        "truth_sidecar": src.sidecar,
        "out": store.url,
        "version_url": vstore.url,
        "report_url": vstore.url_of(REPORT),
        "pointer_url": store.url_of(POINTER),
        "read": ratings["read"] + tests["read"],
        "ingested": ratings["ingested"] + tests["ingested"],
        "skipped": {r: ratings["skipped"][r] + tests["skipped"][r] for r in SKIP_REASONS},
        "ratings": ratings,
        "test_workers": tests,
        "examples": skips.example_lines(),
        "users": {"train": splits.count("train"), "test": splits.count("test")},
        "images": int(len(images)),
        "samples": samples,
        # Each rater's shard holds its own copy of an image: stored copies / distinct images.
        "image_amplification": round(samples / len(images), 3) if len(images) else 0.0,
        "shards": n_shards,
        "objects": n_shards + 3,  # shards + manifest + report + pointer
        "bytes": sum(r.bytes for r in results),
        "partitions": len(results),
        "image_decodes": sum(r.image_decodes for r in results),
        "image_cache_hits": sum(r.image_cache_hits for r in results),
        # image_decodes is every image encoded; these are the ones served by the on-disk store
        # instead (hits), what it cost (bytes: its disk use), and what went wrong with it.
        "image_store": _store_summary(plan, results),
        "max_side": s.max_side,
        "jpeg_quality": s.quality,
        "shard_size": s.shard_size,
        "max_pixels": s.max_pixels,
        "image_cache_mb": s.image_cache_mb,
        "peak_rss_mb": round(max([_peak_rss_mb()] + [r.peak_rss_mb for r in results]), 1),
        "seconds": round(time.time() - plan.started, 2),
        "has_truth": bool(has_truth) and all(has_truth),
    }


def _store_summary(plan: IngestPlan, results: list[PartitionResult]) -> dict[str, Any]:
    total = {k: sum(r.image_store.get(k, 0) for r in results)
             for k in ("hits", "misses", "writes", "bytes_written", "corrupt", "errors")}
    return {"enabled": plan.encode_store is not None, "dir": plan.encode_store, **total}


def ingest(
    fmt: str,
    root: str | Path | None,
    out_url: str,
    *,
    test_workers: str | Path | None = None,
    test_users: str | Path | None = None,
    test_fraction: float | None = None,
    split_seed: int = 0,
    fold: int | None = None,
    ratings_file: str | Path | None = None,
    images_dir: str | Path | None = None,
    score_range: tuple[float, float] | None = None,
    endpoint_url: str | None = None,
    strict: bool = False,
    max_side: int = DEFAULT_MAX_SIDE,
    quality: int = DEFAULT_QUALITY,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB,
    workers: int = 4,
    partitions: int = 1,
    progress: bool = False,
    encode_store: bool = True,
    encode_store_dir: str | None = None,
) -> dict[str, Any]:
    """Ingest rating files and images into a new version at ``out_url`` and publish it.

    Args:
        fmt: a format of :data:`piaa_dist.data.readers.READERS` (``flickr-aes``, ``aadb``,
            ``ratings``, ``para``).
        root: dataset folder (not used by ``ratings``).
        out_url: dataset URL: local folder or ``s3://bucket/prefix``.
        test_workers, test_users: test-user list (``ID`` CSV or one ID per line).
        test_fraction: choose this fraction of users as test users (seeded by user ID).
        split_seed: seed of that choice.
        fold: PARA user-split fold (1-4).
        ratings_file, images_dir: the ratings file and the image folder or ``s3://`` prefix.
        score_range: ``(lo, hi)`` of the file's scores (``ratings``, ``para``; default 1 5).
        endpoint_url: S3 endpoint (default ``$AWS_ENDPOINT_URL``).
        strict: raise on the first skip instead of counting it.
        max_side, quality: stored images' longest side and JPEG quality.
        shard_size: target samples per shard.
        max_pixels: larger input images are skipped (``too_many_pixels``).
        image_cache_mb: re-encoded images kept per partition (at most; and at most
            ``shard_size`` images).
        workers: threads for image work and uploads.
        partitions: partitions processed one after the other (the output does not depend on it).
        progress: show a tqdm bar.
        encode_store, encode_store_dir: the on-disk store of encoded images (see
            :class:`IngestSettings`); the output bytes do not depend on it.

    Returns:
        The report (also written into the version as ``ingest_report.json``).

    Raises:
        DataError: bad input (names the file and row), or nothing to ingest.
        StorageError: the output cannot be written (names the URL); nothing is published.
    """
    settings = IngestSettings(max_side=max_side, quality=quality, shard_size=shard_size, max_pixels=max_pixels,
                              image_cache_mb=image_cache_mb, workers=workers, strict=strict,
                              encode_store=encode_store, encode_store_dir=encode_store_dir)
    plan = plan_ingest(fmt, root, out_url, test_workers=test_workers, test_users=test_users,
                       test_fraction=test_fraction, split_seed=split_seed, fold=fold, ratings_file=ratings_file,
                       images_dir=images_dir, score_range=score_range, endpoint_url=endpoint_url, settings=settings)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan.sample_idx), desc="samples", unit="img", leave=False)
    try:
        results = [ingest_partition(spec, bar.update if bar is not None else None)
                   for spec in plan.partitions(partitions)]
        return publish(plan, results)
    finally:
        if bar is not None:
            bar.close()
        plan.remove_encode_store()


#: The name the orchestration layer imports.
ingest_dataset = ingest


def format_report(report: dict[str, Any]) -> str:
    """The report as a text table (what ``piaa-dist ingest`` prints)."""
    r, t = report["ratings"], report["test_workers"]
    lines = [
        f"ingest report: {report['source']} -> {report['out']} (version {report['dataset_version']})",
        f"{'':36s}{'ratings':>10s}{'test list':>11s}{'total':>10s}",
        f"{'read':36s}{r['read']:>10d}{t['read']:>11d}{report['read']:>10d}",
        f"{'ingested':36s}{r['ingested']:>10d}{t['ingested']:>11d}{report['ingested']:>10d}",
    ]
    for reason in SKIP_REASONS:
        lines.append(
            f"{'skipped: ' + SKIP_LABELS[reason]:36s}{r['skipped'][reason]:>10d}"
            f"{t['skipped'][reason]:>11d}{report['skipped'][reason]:>10d}"
        )
    lines.append(
        f"users: {report['users']['train']} train, {report['users']['test']} test; "
        f"{report['images']} images stored {report['samples']} times (amplification "
        f"{report['image_amplification']:.2f}); {report['shards']} shards, {report['objects']} objects, "
        f"{report['bytes'] / 1e6:.1f} MB" + ("; truth sidecar attached" if report["has_truth"] else "")
    )
    st = report.get("image_store") or {}
    stored = (f", {st['hits']} from the encoded-image store ({st['writes']} entries, "
              f"{st['bytes_written'] / 1e6:.1f} MB on disk; {st['corrupt']} damaged, {st['errors']} write errors)"
              if st.get("enabled") else ", encoded-image store off")
    lines.append(f"pixel limit {report['max_pixels']:,}; {report['image_decodes']} images encoded{stored}, "
                 f"{report['image_cache_hits']} cache hits; peak RSS {report['peak_rss_mb']:.0f} MB; "
                 f"{report['seconds']:.1f}s")
    for reason, ex in report["examples"].items():
        lines.append(f"  e.g. {SKIP_LABELS[reason]}: {ex[0]}")
    return "\n".join(lines)
