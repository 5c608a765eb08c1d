"""Readers for the published rating files: FLICKR-AES and AADB, quirks included.

A reader turns a dataset folder into *candidate* ratings in file order plus the row-level
skips it found (bad score, duplicate row, malformed row). Image-level checks (missing or
unreadable image) and the test-list check (unknown test worker) need the image folder and
the full set of users, so :mod:`piaa_dist.data.ingest` does them. Nothing is dropped without
a :class:`Skip` that names the file, the row and the reason.

Row numbers are 1-based *line* numbers of the file (the header is line 1), so a message can
be checked with ``sed -n Np FILE``; for an AADB batch row the slot (1-10) is named too.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

from piaa_dist.errors import DataError

log = logging.getLogger(__name__)

FLICKR_RATINGS = "FLICKR-AES_image_labeled_by_each_worker.csv"
AADB_RATINGS = "AllinAll.csv"
FLICKR_IMAGE_DIRS = ("images", "40K")
AADB_IMAGE_DIRS = ("images", "datasetImages_originalSize", "datasetImages_warp256")
DEFAULT_TEST_LISTS = ("test_workers.csv", "FLICKR-AES_test_workers.csv")
AADB_SLOTS = 10

#: Every reason a record can be skipped for, in report order.
SKIP_REASONS: tuple[str, ...] = (
    "missing_image",
    "unreadable_image",
    "duplicate_row",
    "bad_score",
    "unknown_test_worker",
    "malformed_row",  # no worker ID, or too few columns to hold one: not a rating we can place
)
SKIP_LABELS = {
    "missing_image": "missing image",
    "unreadable_image": "unreadable image",
    "duplicate_row": "duplicate row",
    "bad_score": "bad score",
    "unknown_test_worker": "unknown test worker",
    "malformed_row": "malformed row",
}


@dataclass(frozen=True)
class Rating:
    """One candidate rating, with where it came from."""

    user: str
    image: str
    score: int
    file: str
    row: int
    slot: int = 0  #: AADB: which of the batch's 10 images (1-based); 0 for FLICKR-AES


@dataclass(frozen=True)
class Skip:
    """A record that was not ingested, and why."""

    reason: str
    file: str
    row: int
    detail: str
    kind: str = "ratings"  #: "ratings" (a rating) or "test_workers" (a test-list entry)

    def where(self) -> str:
        """``file:row`` for messages."""
        return f"{self.file}:{self.row}"


@dataclass(frozen=True)
class TestEntry:
    """One worker ID of the test list."""

    user: str
    file: str
    row: int


@dataclass
class SourceRead:
    """What a reader found before image checks."""

    source: str  #: "flickr-aes" or "aadb"
    ratings_file: str
    images_dir: str
    ratings_read: int  #: ratings seen (AADB: filled image slots, not batch rows)
    candidates: list[Rating] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    raters: set[str] = field(default_factory=set)  #: every worker named by a rating record
    test_file: str | None = None
    test_entries: list[TestEntry] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# helpers


def parse_score(raw: str) -> int | None:
    """An integer score 1-5 from text (``"4"``, ``" 4 "``, ``"4.0"``), or None if it is not one."""
    text = (raw or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or not value.is_integer():
        return None
    score = int(value)
    return score if 1 <= score <= 5 else None


def _records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """CSV records with the line each starts on (quoted fields may span lines)."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    with f:
        reader = csv.reader(f)
        start = 1
        try:
            for record in reader:
                yield start, record
                start = reader.line_num + 1
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV: {err}") from None


def _pick_dir(root: Path, explicit: str | Path | None, candidates: tuple[str, ...]) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise DataError(f"image folder does not exist: {path}")
        return path
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    return root


def _pick_file(root: Path, explicit: str | Path | None, default: str, what: str) -> Path:
    path = Path(explicit) if explicit else root / default
    if not path.is_file():
        raise DataError(f"{what} not found: {path}" + ("" if explicit else " (give it with --ratings)"))
    return path


def read_test_list(path: str | Path) -> tuple[list[TestEntry], list[Skip]]:
    """Read a test-worker list: the published CSV with header ``ID``, or one ID per line.

    Blank lines are ignored; a repeated ID is a ``duplicate_row`` skip. Only the first column
    of a CSV is used.
    """
    path = Path(path)
    entries: list[TestEntry] = []
    skips: list[Skip] = []
    seen: set[str] = set()
    first = True
    for line, record in _records(path):
        cells = [c.strip() for c in record]
        if not cells or not cells[0]:
            continue
        wid = cells[0]
        if first:
            first = False
            if wid.lower() in ("id", "worker", "workerid", "worker_id"):
                continue
        if wid in seen:
            skips.append(Skip("duplicate_row", str(path), line, f"test worker {wid} listed again", "test_workers"))
            continue
        seen.add(wid)
        entries.append(TestEntry(wid, str(path), line))
    return entries, skips


def _default_test_list(root: Path) -> Path | None:
    for name in DEFAULT_TEST_LISTS:
        if (root / name).is_file():
            return root / name
    return None


# ---------------------------------------------------------------------------------------------
# FLICKR-AES


def read_flickr_aes(
    root: str | Path,
    *,
    test_workers: str | Path | None = None,
    ratings_file: str | Path | None = None,
    images_dir: str | Path | None = None,
) -> SourceRead:
    """Read ``FLICKR-AES_image_labeled_by_each_worker.csv`` (header ``worker, imagePair, score``).

    Headers and values are stripped (the published file has a space after every comma).

    Args:
        root: dataset folder.
        test_workers: test list (``ID`` CSV or one per line); default ``root/test_workers.csv``
            if present, else every user is a training user.
        ratings_file: the ratings CSV (default under ``root``).
        images_dir: image folder (default ``root/images``, ``root/40K`` or ``root``).
    """
    root = Path(root)
    path = _pick_file(root, ratings_file, FLICKR_RATINGS, "FLICKR-AES ratings file")
    out = SourceRead("flickr-aes", str(path), str(_pick_dir(root, images_dir, FLICKR_IMAGE_DIRS)), 0)
    records = _records(path)
    header = next(records, None)
    if header is None:
        raise DataError(f"{path}: empty file (expected the header 'worker, imagePair, score')")
    names = [h.strip().lower() for h in header[1]]
    try:
        iw, ii, isc = names.index("worker"), names.index("imagepair"), names.index("score")
    except ValueError:
        raise DataError(
            f"{path}:1: header {header[1]!r} lacks worker/imagePair/score columns"
        ) from None
    seen: set[tuple[str, str]] = set()
    for line, record in records:
        cells = [c.strip() for c in record]
        if not any(cells):
            continue  # blank line: not a record
        out.ratings_read += 1
        worker = cells[iw] if iw < len(cells) else ""
        image = cells[ii] if ii < len(cells) else ""
        raw = cells[isc] if isc < len(cells) else ""
        if not worker:
            out.skips.append(Skip("malformed_row", str(path), line, f"no worker ID in {record!r}"))
            continue
        out.raters.add(worker)
        score = parse_score(raw)
        if score is None:
            out.skips.append(Skip("bad_score", str(path), line, f"score {raw!r} is not an integer 1-5"))
            continue
        if (worker, image) in seen:
            out.skips.append(Skip("duplicate_row", str(path), line, f"{worker} rated {image} again"))
            continue
        seen.add((worker, image))
        out.candidates.append(Rating(worker, image, score, str(path), line))
    tl = Path(test_workers) if test_workers else _default_test_list(root)
    if tl is not None:
        out.test_file = str(tl)
        out.test_entries, skips = read_test_list(tl)
        out.skips.extend(skips)
    return out


# ---------------------------------------------------------------------------------------------
# AADB


def _image_name(url: str) -> str:
    """Image file name of an AADB URL: the basename of its path."""
    return unquote(urlparse(url.strip()).path.rsplit("/", 1)[-1])


def read_aadb(
    root: str | Path,
    *,
    test_workers: str | Path | None = None,
    ratings_file: str | Path | None = None,
    images_dir: str | Path | None = None,
) -> SourceRead:
    """Read the AADB MTurk batch CSV (``AllinAll.csv``): one row per assignment of 10 images.

    Columns used: ``WorkerId``, ``Input.image_url1..10``, ``Answer.overallScore1..10``; the
    image file name is the basename of the URL. Each filled slot is one rating read; a slot
    with neither URL nor score is not a rating.

    Args:
        root: dataset folder (holds ``AllinAll.csv`` unless ``ratings_file`` is given).
        test_workers: optional test list (``ID`` CSV or one per line).
        ratings_file: the batch CSV.
        images_dir: image folder (default ``root/images``, ``root/datasetImages_originalSize``,
            ``root/datasetImages_warp256`` or ``root``).
    """
    root = Path(root)
    path = _pick_file(root, ratings_file, AADB_RATINGS, "AADB batch file")
    out = SourceRead("aadb", str(path), str(_pick_dir(root, images_dir, AADB_IMAGE_DIRS)), 0)
    records = _records(path)
    header = next(records, None)
    if header is None:
        raise DataError(f"{path}: empty file (expected an MTurk batch header with WorkerId)")
    cols = {h.strip(): i for i, h in enumerate(header[1])}
    if "WorkerId" not in cols:
        raise DataError(f"{path}:1: no WorkerId column in the header")
    slots = [
        (k, cols[f"Input.image_url{k}"], cols[f"Answer.overallScore{k}"])
        for k in range(1, AADB_SLOTS + 1)
        if f"Input.image_url{k}" in cols and f"Answer.overallScore{k}" in cols
    ]
    if not slots:
        raise DataError(f"{path}:1: no Input.image_urlK / Answer.overallScoreK column pairs in the header")
    iw = cols["WorkerId"]
    seen: set[tuple[str, str]] = set()
    for line, record in records:
        cells = [c.strip() for c in record]
        if not any(cells):
            continue
        worker = cells[iw] if iw < len(cells) else ""
        for k, iu, isc in slots:
            url = cells[iu] if iu < len(cells) else ""
            raw = cells[isc] if isc < len(cells) else ""
            if not url and not raw:
                continue
            out.ratings_read += 1
            if not worker:
                out.skips.append(Skip("malformed_row", str(path), line, f"slot {k}: no WorkerId"))
                continue
            out.raters.add(worker)
            score = parse_score(raw)
            if score is None:
                out.skips.append(Skip("bad_score", str(path), line, f"slot {k}: score {raw!r} is not an integer 1-5"))
                continue
            image = _image_name(url) if url else ""
            if image and (worker, image) in seen:
                out.skips.append(Skip("duplicate_row", str(path), line, f"slot {k}: {worker} rated {image} again"))
                continue
            if image:
                seen.add((worker, image))
            out.candidates.append(Rating(worker, image, score, str(path), line, k))
    if test_workers:
        out.test_file = str(test_workers)
        out.test_entries, skips = read_test_list(test_workers)
        out.skips.extend(skips)
    return out


READERS = {"flickr-aes": read_flickr_aes, "aadb": read_aadb}


def read_source(fmt: str, root: str | Path, **kwargs) -> SourceRead:
    """Dispatch to the reader of ``fmt`` (``flickr-aes`` or ``aadb``)."""
    try:
        reader = READERS[fmt]
    except KeyError:
        raise DataError(f"unknown format {fmt!r}: use one of {', '.join(READERS)}") from None
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder does not exist: {root}")
    return reader(root, **kwargs)
