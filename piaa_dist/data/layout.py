"""The on-store layout of a dataset: immutable versions and one pointer that publishes one.

Layout at a dataset URL (a local folder or ``s3://bucket/prefix``)::

    _CURRENT                                  pointer: JSON naming the published version
    versions/<version>/manifest.parquet       one row per user (see piaa_dist.data.manifest)
    versions/<version>/ingest_report.json     what was read, ingested and skipped, and why
    versions/<version>/shards/<i:06d>.tar     packed WebDataset shards (whole users, contiguous)

Why: publication must be atomic. An ingest writes everything of a new version under a fresh
prefix that no reader uses, writes the manifest and report last, and only then switches
``_CURRENT`` with one write (one PUT on S3, which is atomic; a rename on a local folder). So:

* a reader resolves ``_CURRENT`` once, at open, and then reads only inside that version; a
  version is never modified after it is written, so a reader keeps working while a newer
  version is published;
* an ingest that crashes or fails leaves ``_CURRENT`` (and the version it names) untouched;
  re-running it writes another fresh version;
* two concurrent ingests write different versions; whichever switches the pointer last wins,
  and the pointer always names one complete version, never a mix;
* old versions stay until removed by an explicit command (``piaa-dist datasets URL
  --remove`` / ``--prune``), never silently; the published one cannot be removed.

Version IDs are ``<UTC time>-<random>`` (e.g. ``20250101T120000.123456Z-1a2b3c4d``): they sort
by creation time, two writers never pick the same one, and they appear in no shard or
manifest byte, so re-ingesting the same input gives byte-identical shards and manifests.

A dataset in the old layout (layout version 1: ``manifest.parquet`` at the root, per-user
shards) is refused with a message to re-ingest it. A URL that points at a version folder
itself (``.../versions/<version>``) opens that version.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from piaa_dist.data.manifest import FORMAT_VERSION, MANIFEST
from piaa_dist.errors import DataError
from piaa_dist.storage import ObjectNotFound, Store

POINTER = "_CURRENT"
VERSIONS = "versions"
REPORT = "ingest_report.json"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_version_id(now: float | None = None) -> str:
    """A fresh version ID: UTC time to the microsecond, then 8 random hex digits."""
    t = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    return f"{t:%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(4)}"


def version_created(version: str) -> datetime | None:
    """When a version was created (from its ID), or None for an ID not made here."""
    try:
        return datetime.strptime(version.split("-", 1)[0], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def check_version_id(version: str) -> str:
    """The ID if it is a plain name (no slashes, no ``..``), else a DataError."""
    if not _VERSION_RE.match(version or "") or ".." in version:
        raise DataError(f"not a dataset version ID: {version!r}")
    return version


def version_prefix(version: str) -> str:
    """Relative path of a version's folder."""
    return f"{VERSIONS}/{check_version_id(version)}"


def read_pointer(store: Store) -> dict[str, Any] | None:
    """The pointer's content, or None when there is none.

    Raises:
        DataError: the pointer exists but is not what this code writes (names its URL).
    """
    try:
        data = store.read_bytes(POINTER)
    except ObjectNotFound:
        return None
    try:
        pointer = json.loads(data)
        check_version_id(pointer["version"])
    except (ValueError, KeyError, TypeError, DataError):
        raise DataError(f"{store.url_of(POINTER)}: not a dataset pointer (expected JSON with a 'version')") from None
    if int(pointer.get("format", 0)) != FORMAT_VERSION:
        raise DataError(f"{store.url_of(POINTER)}: layout version {pointer.get('format')!r} is not supported "
                        f"(expected {FORMAT_VERSION})")
    return pointer


def write_pointer(store: Store, version: str, summary: dict[str, Any]) -> None:
    """Publish ``version``: one atomic write of the pointer (the last write of an ingest)."""
    pointer = {"format": FORMAT_VERSION, "version": check_version_id(version),
               "published": datetime.now(timezone.utc).isoformat(timespec="seconds"), **summary}
    store.write_bytes(POINTER, (json.dumps(pointer, indent=1, sort_keys=True) + "\n").encode())


def resolve(store: Store, version: str | None = None) -> tuple[str, Store]:
    """The version a reader should use, and a store rooted at it.

    Args:
        store: the dataset root.
        version: a specific version ID; None means the published one.

    Raises:
        DataError: nothing published, an unknown version, or the old layout (each names the URL).
    """
    if version is not None:
        sub = store.sub(version_prefix(version))
        if not sub.exists(MANIFEST):
            raise DataError(f"no complete version {version!r} at {store.url} "
                            f"({sub.url_of(MANIFEST)} not found; list them with `piaa-dist datasets {store.url}`)")
        return version, sub
    pointer = read_pointer(store)
    if pointer is not None:
        vid = pointer["version"]
        sub = store.sub(version_prefix(vid))
        return vid, sub
    if store.exists(MANIFEST):
        # Either a version folder opened directly, or a dataset in the old layout; the
        # manifest's own version tells them apart (Manifest.from_bytes refuses layout 1).
        name = store.url.rstrip("/").rsplit("/", 1)[-1]
        return name, store
    raise DataError(f"no dataset at {store.url}: {store.url_of(POINTER)} not found (run `piaa-dist ingest` first)")


@dataclass(frozen=True)
class VersionInfo:
    """One version folder of a dataset."""

    version: str
    current: bool  #: named by the pointer
    complete: bool  #: has its manifest and report (an ingest finished writing it)
    created: datetime | None
    users: int | None = None
    ratings: int | None = None
    bytes: int | None = None


def list_versions(store: Store) -> list[VersionInfo]:
    """Every version folder at the dataset root, oldest first (reads each version's report)."""
    pointer = read_pointer(store)
    current = pointer["version"] if pointer else None
    out = []
    for name in store.list_dirs(VERSIONS):
        if not _VERSION_RE.match(name):
            continue
        sub = store.sub(version_prefix(name))
        users = ratings = size = None
        complete = False
        try:
            report = json.loads(sub.read_bytes(REPORT))
            complete = sub.exists(MANIFEST)
            users = int(report["users"]["train"]) + int(report["users"]["test"])
            ratings, size = int(report["ratings"]["ingested"]), int(report["bytes"])
        except ObjectNotFound:
            pass
        except (ValueError, KeyError, TypeError):
            complete = sub.exists(MANIFEST)
        out.append(VersionInfo(name, name == current, complete, version_created(name), users, ratings, size))
    return sorted(out, key=lambda v: (v.created or datetime.min.replace(tzinfo=timezone.utc), v.version))


def versions_to_prune(versions: list[VersionInfo], *, keep: int = 0, grace_hours: float = 24.0,
                      now: datetime | None = None) -> list[str]:
    """The versions ``--prune`` removes: all but the published one and the ``keep`` newest complete.

    An incomplete version younger than ``grace_hours`` (or of unknown age) stays: it may be an
    ingest that is still writing.

    Args:
        versions: :func:`list_versions`' answer (oldest first).
        keep: other complete versions to keep, newest first.
        grace_hours: age under which an incomplete version is left alone.
        now: the current time (tests); default now, UTC.
    """
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(hours=grace_hours)
    others = [v for v in versions if not v.current]
    complete = [v for v in others if v.complete]
    kept = {v.version for v in complete[len(complete) - keep:]} if keep > 0 else set()
    return [v.version for v in others
            if v.version not in kept
            and (v.complete or (v.created is not None and v.created <= cutoff))]


def remove_version(store: Store, version: str) -> int:
    """Delete every object of a version; returns how many.

    Raises:
        DataError: the version is the published one, or does not exist.
    """
    pointer = read_pointer(store)
    if pointer is not None and pointer["version"] == version:
        raise DataError(f"{version} is the published version of {store.url}; publish another one before removing it")
    prefix = version_prefix(version)
    keys = store.list(prefix + "/")
    if not keys:
        raise DataError(f"no version {version!r} at {store.url}")
    return store.delete(keys)
