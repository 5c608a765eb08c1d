"""Check a published dataset version end to end: the check an operator runs after an incident.

:func:`verify_dataset` resolves the version as a reader would, validates the manifest, and
then reads every shard once (one GET per shard, shards in parallel) and checks, for every
user's byte range, what a trainer's ranged read checks (sha256, sample count, owner, tar
structure), plus what only a whole-shard walk can see: ranges that overlap or leave holes,
shards missing, shards no user references, bytes after the last range that are not the tar's
end, and the report's totals against the manifest's. It raises on the first inconsistency,
in shard order, naming the object, the byte range and the user.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from piaa_dist.data.layout import REPORT
from piaa_dist.data.manifest import Part
from piaa_dist.data.stream import Dataset, check_part
from piaa_dist.data.tarfmt import BLOCK, end_of_archive
from piaa_dist.errors import DataError
from piaa_dist.storage import ObjectNotFound

log = logging.getLogger(__name__)


def verify_dataset(url: str, endpoint_url: str | None = None, *, version: str | None = None,
                   workers: int = 4) -> dict[str, Any]:
    """Verify every user of the published (or given) version of a dataset.

    Args:
        url: dataset URL (local folder or ``s3://bucket/prefix``).
        endpoint_url: S3 endpoint (default ``$AWS_ENDPOINT_URL``).
        version: a version ID instead of the published one.
        workers: shards read in parallel (memory: one shard each).

    Returns:
        ``{"url", "version", "users", "ratings", "bytes", "shards"}``.

    Raises:
        DataError: the first inconsistency (names the URL, the range and the user).
        StorageError: the store cannot be read.
    """
    ds = Dataset.open(url, endpoint_url, version=version, cache_users=0)
    m = ds.manifest
    store = ds.store
    try:
        report = json.loads(store.read_bytes(REPORT))
    except ObjectNotFound:
        raise DataError(f"{store.url_of(REPORT)} not found: the version was not completely written") from None
    except ValueError as err:
        raise DataError(f"{store.url_of(REPORT)}: not JSON: {err}") from None
    users, ratings = m.n, int(m.n_ratings.sum())
    try:
        r_users = int(report["users"]["train"]) + int(report["users"]["test"])
        r_ratings = int(report["ratings"]["ingested"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{store.url_of(REPORT)}: lacks users/ratings counts") from None
    if (r_users, r_ratings) != (users, ratings):
        raise DataError(f"{store.url_of(REPORT)} says {r_users} users and {r_ratings} ratings; the manifest holds "
                        f"{users} users and {ratings} ratings")
    bad = m.keys_match()
    if bad >= 0:
        raise DataError(f"{store.url_of('manifest.parquet')}: row {bad} (user {m.user_at(bad)!r}) has a user_key "
                        "that is not the hash of its ID")
    if int(m.is_test.sum()) != int(report["users"]["test"]):
        raise DataError(f"{store.url_of(REPORT)} says {report['users']['test']} test users; the manifest holds "
                        f"{int(m.is_test.sum())}")

    owner = m.part_owner()
    order = np.lexsort((m.part_offset, m.part_shard))
    shards = np.unique(m.part_shard)
    listed = set(store.list("shards/"))
    named = {ds.shard_pattern.format(int(s)) for s in shards}
    extra = sorted(listed - named)
    if extra:
        raise DataError(f"{store.url_of(extra[0])} is in the version but no user of the manifest references it")
    by_shard: dict[int, list[int]] = {}
    for k in order.tolist():
        by_shard.setdefault(int(m.part_shard[k]), []).append(k)

    def check_shard(shard: int) -> int:
        rel = ds.shard_pattern.format(shard)
        url_s = store.url_of(rel)
        if rel not in listed:
            first = by_shard[shard][0]
            raise DataError(f"missing shard {url_s} (user {m.user_at(int(owner[first]))})")
        data = store.read_bytes(rel)
        pos = 0
        for k in by_shard[shard]:
            part = Part(shard, int(m.part_offset[k]), int(m.part_length[k]), int(m.part_samples[k]), m.part_sha(k))
            user = m.user_at(int(owner[k]))
            if part.offset != pos:
                what = "overlaps the previous range" if part.offset < pos else f"leaves a hole after byte {pos}"
                raise DataError(f"{url_s}: the range of user {user} at byte {part.offset} {what}")
            if part.offset + part.length > len(data):
                raise DataError(f"corrupt shard {url_s}: has {len(data)} bytes; user {user}'s range ends at "
                                f"{part.offset + part.length}")
            check_part(data[part.offset : part.offset + part.length], part, url_s, user)
            pos = part.offset + part.length
        if data[pos:] != end_of_archive(pos) or pos % BLOCK:
            raise DataError(f"corrupt shard {url_s}: bytes {pos}-{len(data) - 1} after the last user's range are "
                            "not the end of a tar")
        return len(data)

    total = 0
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="verify") as pool:
        # map() yields in shard order, so the first inconsistency raised is the first by shard.
        for size in pool.map(check_shard, shards.tolist()):
            total += size
    if total != int(report.get("bytes", total)):
        raise DataError(f"{store.url_of(REPORT)} says {report.get('bytes')} shard bytes; the shards hold {total}")
    summary = {"url": ds.url, "version": ds.version_id, "users": users, "ratings": ratings, "bytes": total,
               "shards": len(shards)}
    log.info("verified %s", summary)
    return summary
