"""Personalize a meta-learner to one person: adapt on their ratings, rank new images.

This is the product path of BLG-PIAA: a user rates 10 or more of their images, the
meta-learner is fine-tuned on them with the budget of the meta-testing protocol
(:func:`piaa_dist.protocol.finetune_budget` of the model's own config), and the adapted model
scores new images through the same :class:`piaa_dist.protocol.Scorer` ``evaluate`` uses, so a
person's ranking is exactly what the protocol measured would predict for them.

Ratings as people have them (:func:`read_ratings`):

* a CSV with a header naming an image column (:data:`IMAGE_COLUMNS`) and a score column
  (:data:`SCORE_COLUMNS`), or two columns ``image,score`` without a header (recognised by a
  first row whose second cell is a number);
* scores on the person's own scale ``score_range=(LO, HI)`` (default 1–5), mapped linearly onto
  the model's 1–5 scale as ingestion maps them; the ranking is returned on the person's scale;
* image paths looked up under the images folder first, then relative to the CSV's own folder;
  an absolute path is taken as written. A path is used only if, with symlinks resolved, it
  lands inside the images folder or the CSV's folder (see :func:`locate_image`): ``../``
  escapes, absolute paths elsewhere and symlinks leading out are refused and counted, never
  read.

Every row is used or counted under a reason; a file that cannot be read as ratings (not UTF-8,
a field longer than the CSV reader's limit, no usable header) is a :class:`DataError` naming
the file and line. Images that do not decode never abort a run: a rated one is dropped and
counted (still at least :data:`MIN_RATINGS` needed), an image to score is skipped and named
in the result, and every other image is ranked. All of it is checked before fine-tuning
starts.

Plain PyTorch: no Ray, MLflow or boto3 here (the command resolves ``models:/`` URIs).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
import torch
from torch import nn

from piaa_dist.config import JobConfig
from piaa_dist.data.decode import decode
from piaa_dist.errors import DataError
from piaa_dist.protocol import Scorer, budget_of_setting, finetune_budget, score_targets

log = logging.getLogger(__name__)

MIN_RATINGS = 10
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: header names of the image column (matched case-insensitively, surrounding spaces ignored)
IMAGE_COLUMNS = ("image", "imagepair", "file", "filename", "path")
#: header names of the score column
SCORE_COLUMNS = ("score", "rating")
#: the model's own score scale (FLICKR-AES, AADB, PARA: 1-5)
MODEL_SCALE = (1.0, 5.0)
#: one line for a command's ``--help``: the CSV forms :func:`read_ratings` accepts
RATINGS_FORMAT_HELP = (
    f"CSV of image,score rows ({MIN_RATINGS} or more ratings); a header is optional: with one, "
    f"the image column is named {'/'.join(IMAGE_COLUMNS)} and the score column "
    f"{'/'.join(SCORE_COLUMNS)} (any case), other columns are ignored; without one, the first "
    "two columns are image and score. Image paths are looked up under --images, then beside "
    "the CSV; paths leading outside both folders are refused"
)

#: skip reasons of rating rows (every row is used or counted under one)
SKIP_SHORT = "short row"
SKIP_BAD_SCORE = "bad score"
SKIP_DUPLICATE = "duplicate image"
SKIP_MISSING = "missing image"
SKIP_OUTSIDE = "outside image folders"
SKIP_UNREADABLE = "unreadable image"
#: warnings logged per skip reason (the rest are counted)
_WARN_PER_REASON = 5


@dataclass(frozen=True)
class Ratings:
    """One person's ratings read from a CSV.

    Attributes:
        images: the rated images (resolved paths inside the images or the CSV's folder).
        scores: float32 ratings on the model's 1–5 scale.
        skipped: ``{reason: count}`` of rows not used (every row is either used or counted).
        score_range: the person's own scale ``(LO, HI)`` the file's scores were read on.
        source: the CSV file.
        lines: the CSV line of each rating (for messages).
    """

    images: list[Path]
    scores: np.ndarray
    skipped: dict[str, int]
    score_range: tuple[float, float] = MODEL_SCALE
    source: Path | None = None
    lines: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class PersonalRanking(Sequence):
    """What :func:`personalize` produced: a sequence of ``(image, predicted score)``, best first.

    Iterating, indexing and ``len`` go over :attr:`ranked`, so it reads like the list of pairs it
    replaces; the rest says what was left out and on which scale the scores are.

    Attributes:
        ranked: ``(image, predicted score on the person's scale)``, highest first.
        unreadable: ``(image, why)`` of the images to score that did not decode (not ranked).
        score_range: the person's scale ``(LO, HI)`` (the ratings' ``score_range``).
        ratings_used: ratings the adaptation used.
        skipped: ``{reason: count}`` of rating rows not used (the reader's, plus rated images
            that did not decode, under ``"unreadable image"``).
        finetune: the fine-tuning setting the adaptation used, in words (:func:`describe_budget`).
    """

    ranked: tuple[tuple[Path, float], ...]
    unreadable: tuple[tuple[Path, str], ...] = ()
    score_range: tuple[float, float] = MODEL_SCALE
    ratings_used: int = 0
    skipped: Mapping[str, int] = field(default_factory=dict)
    finetune: str = ""

    @overload
    def __getitem__(self, i: int) -> tuple[Path, float]: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[tuple[Path, float], ...]: ...
    def __getitem__(self, i):
        return self.ranked[i]

    def __len__(self) -> int:
        return len(self.ranked)

    def __iter__(self) -> Iterator[tuple[Path, float]]:
        return iter(self.ranked)


# ---------------------------------------------------------------------------------------------
# Reading ratings


def check_score_range(score_range: Sequence[float] | None) -> tuple[float, float]:
    """``(LO, HI)`` as floats; None means the model's 1–5 scale.

    Raises:
        DataError: not two finite numbers with LO < HI.
    """
    if score_range is None:
        return MODEL_SCALE
    try:
        lo, hi = (float(x) for x in score_range)
    except (TypeError, ValueError):
        raise DataError(f"score range must be two numbers LO HI, got {score_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise DataError(f"score range must be two finite numbers LO < HI, got {lo:g} {hi:g}")
    return lo, hi


def to_model_scale(score: float, score_range: tuple[float, float]) -> float:
    """A score on ``score_range`` mapped linearly onto the model's 1–5 scale (as ingestion does)."""
    lo, hi = score_range
    if (lo, hi) == MODEL_SCALE:
        return score  # exactly, so 1-5 ratings reach the protocol bit for bit
    return 1.0 + 4.0 * (score - lo) / (hi - lo)


def from_model_scale(pred: np.ndarray, score_range: tuple[float, float]) -> np.ndarray:
    """Predictions on the model's 1–5 scale mapped back onto the person's ``score_range``."""
    lo, hi = score_range
    if (lo, hi) == MODEL_SCALE:
        return pred
    return lo + (pred - 1.0) * ((hi - lo) / 4.0)


def _parse_score(cell: str) -> float | None:
    try:
        value = float(cell.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def locate_image(name: str, roots: Sequence[Path]) -> tuple[Path | None, str | None, list[Path]]:
    """Find a rated image: where it is, or why it is not used, and where it was looked for.

    The rule: a relative path is looked up under each of ``roots`` in order (the images folder,
    then the CSV's folder); an absolute path is taken as written. The first candidate that is a
    file *and*, with symlinks resolved, lies inside one of ``roots`` is used. A file found only
    outside them (``../`` leading out, an absolute path elsewhere, a symlink pointing out) is
    refused without being read: the CSV names the images a person rated, never other files
    of the machine.

    Args:
        name: the path as the CSV gives it.
        roots: resolved folders, in lookup order.

    Returns:
        ``(path, None, looked)`` with the resolved file, or ``(None, reason, looked)`` with
        :data:`SKIP_MISSING` or :data:`SKIP_OUTSIDE`; ``looked`` lists the candidates.
    """
    try:
        p = Path(name)
        candidates = [p] if p.is_absolute() else [root / p for root in roots]
    except (TypeError, ValueError):
        return None, SKIP_MISSING, []
    outside = False
    for candidate in candidates:
        try:
            real = candidate.resolve()
            if not real.is_file():
                continue
        except (OSError, ValueError, RuntimeError):  # NUL bytes, too long, a symlink loop
            continue
        if any(real.is_relative_to(root) for root in roots):
            return real, None, candidates
        outside = True
    return None, (SKIP_OUTSIDE if outside else SKIP_MISSING), candidates


def _decode_text(csv_path: Path) -> str:
    try:
        raw = csv_path.read_bytes()
    except OSError as err:
        raise DataError(f"{csv_path}: cannot read ratings: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{csv_path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "save the ratings as a UTF-8 CSV"
        ) from None


def _rows(csv_path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """``(line, cells)`` of every CSV record (line = where the record starts, 1-based)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            limit = csv.field_size_limit()
            what = (f"a field longer than {limit} characters (is this a ratings CSV?)"
                    if "field larger than field limit" in str(err) else f"malformed CSV: {err}")
            raise DataError(f"{csv_path}:{start}: {what}") from None
        yield start, row
        start = reader.line_num + 1


def _columns(csv_path: Path, line: int, row: list[str]) -> tuple[int, int, bool]:
    """``(image column, score column, has_header)`` from the first record."""
    header = [h.strip().lower() for h in row]
    img_col = next((header.index(c) for c in IMAGE_COLUMNS if c in header), None)
    score_col = next((header.index(c) for c in SCORE_COLUMNS if c in header), None)
    if img_col is not None and score_col is not None:
        return img_col, score_col, True
    if len(row) >= 2 and _parse_score(row[1]) is not None:
        return 0, 1, False  # headerless image,score rows
    shown = ", ".join(repr(h[:40]) for h in row[:6]) + (", ..." if len(row) > 6 else "")
    raise DataError(
        f"{csv_path}: header [{shown}] (line {line}) needs an image column "
        f"({'/'.join(IMAGE_COLUMNS)}) and a score column ({'/'.join(SCORE_COLUMNS)}); a file "
        "without a header must start with an image,score row (a number in the second column)"
    )


def read_ratings(
    csv_path: str | Path,
    images_dir: str | Path | None = None,
    *,
    score_range: Sequence[float] | None = None,
) -> Ratings:
    """Read one person's ``image,score`` ratings (FLICKR-AES' ``imagePair, score`` works too).

    Header names are matched case-insensitively with surrounding spaces ignored (other columns,
    e.g. ``worker``, are ignored); a file whose first row's second cell is a number has no
    header and its first two columns are image and score. A row is skipped and counted when it
    is too short, its score is not a number in ``score_range``, its image was already rated
    (the first rating is kept), or its image is missing or lies outside the images folder and
    the CSV's folder (:func:`locate_image`; the warning names where it looked). Blank lines are
    not ratings.

    Args:
        csv_path: the ratings CSV (UTF-8; a BOM is fine).
        images_dir: the folder image paths are looked up in first (None: only the CSV's folder).
        score_range: ``(LO, HI)`` of the person's scale (default 1–5); scores are mapped
            linearly onto the model's 1–5 scale.

    Raises:
        DataError: an unreadable or non-UTF-8 file, an oversized field or malformed CSV, a first
            row that is neither a usable header nor a data row (each naming the file and line),
            an invalid ``score_range``, or fewer than 10 usable ratings (naming the file and
            the skip counts).
    """
    csv_path = Path(csv_path)
    lo_hi = check_score_range(score_range)
    if images_dir is not None and not Path(images_dir).is_dir():
        raise DataError(f"{images_dir}: no such image folder (the folder holding the rated images)")
    text = _decode_text(csv_path)
    roots: list[Path] = []
    for folder in ([Path(images_dir)] if images_dir is not None else []) + [csv_path.parent]:
        try:
            root = folder.resolve()
        except (OSError, RuntimeError) as err:
            raise DataError(f"{folder}: cannot resolve the image folder: {err}") from None
        if root not in roots:
            roots.append(root)

    images: list[Path] = []
    scores: list[float] = []
    lines: list[int] = []
    seen: set[Path] = set()
    skipped: dict[str, int] = {}

    def skip(reason: str, lineno: int, row: list[str], detail: str = "") -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        if skipped[reason] <= _WARN_PER_REASON:
            shown = [cell[:200] for cell in row[:6]]
            log.warning("%s:%d: skipped (%s): %r%s", csv_path, lineno, reason, shown, detail)

    columns: tuple[int, int] | None = None
    for lineno, row in _rows(csv_path, text):
        if not any(cell.strip() for cell in row):
            continue  # blank line, not a rating
        if columns is None:
            img_col, score_col, has_header = _columns(csv_path, lineno, row)
            columns = (img_col, score_col)
            if has_header:
                continue
        img_col, score_col = columns
        if len(row) <= max(img_col, score_col):
            skip(SKIP_SHORT, lineno, row)
            continue
        score = _parse_score(row[score_col])
        if score is None or not (lo_hi[0] <= score <= lo_hi[1]):
            skip(SKIP_BAD_SCORE, lineno, row, f"; scores must be numbers in {lo_hi[0]:g}-{lo_hi[1]:g}")
            continue
        name = row[img_col].strip()
        path, reason, looked = locate_image(name, roots) if name else (None, SKIP_MISSING, [])
        if path is None:
            where = ", ".join(str(p) for p in looked) or "nowhere (no path)"
            detail = (f"; found outside {' and '.join(map(str, roots))}, not read" if reason == SKIP_OUTSIDE
                      else f"; looked for {where}")
            skip(reason, lineno, row, detail)
            continue
        if path in seen:
            skip(SKIP_DUPLICATE, lineno, row)
            continue
        seen.add(path)
        images.append(path)
        scores.append(to_model_scale(score, lo_hi))
        lines.append(lineno)
    for reason, n in skipped.items():
        if n > _WARN_PER_REASON:
            log.warning("%s: %d rows skipped (%s) in all; the first %d are shown above",
                        csv_path, n, reason, _WARN_PER_REASON)
    if len(images) < MIN_RATINGS:
        raise DataError(
            f"{csv_path}: {len(images)} usable ratings, personalization needs at least "
            f"{MIN_RATINGS} (skipped: {skipped or 'none'})"
        )
    return Ratings(images, np.asarray(scores, dtype=np.float32), skipped, lo_hi, csv_path, lines)


# ---------------------------------------------------------------------------------------------
# Images


def list_images(targets: Sequence[str | Path]) -> list[Path]:
    """Expand folders (their image files, sorted) and check that listed files exist.

    Raises:
        DataError: a path that does not exist, or nothing to score.
    """
    out: list[Path] = []
    for target in targets:
        p = Path(target)
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such image file or folder to score")
    if not out:
        raise DataError(f"no images to score in {', '.join(map(str, targets))}")
    return out


def decode_images(
    paths: Iterable[Path], image_size: int
) -> tuple[torch.Tensor | None, list[int], list[tuple[Path, str]]]:
    """Decode image files as the model sees them at test time, skipping those that fail.

    The same decoding as ``evaluate`` (one ``decode(..., augment=False)`` per image).

    Returns:
        ``(images [N,3,S,S] or None when none decodes, indices of the decoded paths,
        [(path, why)] of the others)``.
    """
    tensors, kept, failed = [], [], []
    for i, path in enumerate(paths):
        try:
            tensors.append(decode(Path(path).read_bytes(), image_size, False, None))
        except Exception as err:  # noqa: BLE001 - any reader/decoder failure is this file's fault
            failed.append((Path(path), f"{type(err).__name__}: {err}"[:300]))
            continue
        kept.append(i)
    return (torch.stack(tensors) if tensors else None), kept, failed


def load_images(paths: Iterable[Path], image_size: int) -> torch.Tensor:
    """Decode image files as the model sees them at test time: ``[N,3,S,S]``.

    Raises:
        DataError: an unreadable image, naming the file.
    """
    paths = list(paths)
    images, _, failed = decode_images(paths, image_size)
    if failed:
        path, why = failed[0]
        raise DataError(f"{path}: cannot decode image: {why}")
    if images is None:
        raise DataError("no images to decode")
    return images


def closest_setting(settings: Mapping[int, str], ratings: int) -> tuple[int, str] | None:
    """The setting of the shot count closest to the number of `ratings` (the smaller on a tie):
    ``(k, setting)``, or None when there is none."""
    if not settings:
        return None
    k = min((int(k) for k in settings), key=lambda k: (abs(k - int(ratings)), k))
    return k, settings[k]


def describe_budget(budget) -> str:
    """A fine-tuning budget in one line (what ``personalize`` says it used)."""
    if budget.ridge is not None:
        return f"ridge penalty={budget.ridge!r}"
    lrs = sorted({budget.lr_of(n) for n in budget.adapt_names} if budget.adapt_names is not None
                 else ({float(v) for v in budget.lr.values()} if isinstance(budget.lr, Mapping)
                       else {float(budget.lr)}))
    lr = "/".join(f"{v:g}" for v in lrs)
    params = "all" if budget.adapt_names is None else f"{len(budget.adapt_names)} tensors"
    return (f"{budget.optimizer} lr={lr} steps={budget.steps} params={params} "
            f"(batch {budget.batch_size}, BatchNorm {budget.bn})")


def personalize(
    model: nn.Module,
    cfg: JobConfig,
    ratings: Ratings,
    score_images: Sequence[Path],
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    setting: str | None = None,
) -> PersonalRanking:
    """Adapt `model` on `ratings` and score `score_images`, best first.

    Exactly what ``evaluate`` does for one split: the budget of
    :func:`piaa_dist.protocol.finetune_budget` (``eval.finetune_*``, ``eval.batch_size``, and
    the inner loop's ``meta.inner_params`` / ``meta.inner_head_lr_scale``), or of `setting`
    when given, the ratings in file order as the support set, and a
    :class:`piaa_dist.protocol.Scorer` over the images to score. With the same images, ratings,
    seed and setting the predictions equal ``evaluate``'s bit for bit (``tests/test_protocol.py``).

    `setting` is an ``eval.finetune`` entry (``"blg-piaa@10: sgd lr=0.5 steps=20 params=head"``,
    e.g. the one the per-method search chose for ``blg-piaa``; the orchestration layer reads it
    from the registry): its optimizer, rate, steps and parameters replace the shared budget's,
    as ``evaluate`` does under ``eval.protocol: per-method`` (BatchNorm mode and minibatch size
    stay ``cfg.eval``'s).

    Every image is decoded before fine-tuning starts. A rated image that does not decode is
    dropped (counted as ``"unreadable image"``, named in a warning); an image to score that
    does not decode is skipped, named in a warning and in :attr:`PersonalRanking.unreadable`,
    and every other image is still ranked.

    Args:
        device: where to fine-tune and score (``piaa_dist.model.select_device(cfg.run.use_gpu)``
            picks it the way every job does); None keeps the model where it is. A CUDA device
            must be usable.

    Raises:
        DataError: fewer than 10 rated images decode, or none of the images to score does.
        ConfigError: an invalid fine-tuning budget in `cfg`, or an invalid `setting`.
        GpuUnavailable: a CUDA device was given but CUDA cannot use it here (names the driver).

    Returns:
        The ranking: ``(image, predicted score)`` pairs from highest to lowest, on the person's
        own scale (``ratings.score_range``; a 1–10 rater gets 1–10 predictions).
    """
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda":
            from piaa_dist.gpu import require_cuda

            require_cuda("personalize")
        model = model.to(device)
    size = cfg.data.image_size
    if setting is not None:
        from piaa_dist.config import ConfigError, RuleError, parse_finetune_setting

        try:
            values = parse_finetune_setting(setting)[2]
        except RuleError as err:
            raise ConfigError(f"fine-tuning setting: {err}") from None
        if "penalty" in values:
            raise ConfigError(f"fine-tuning setting {setting!r}: a ridge penalty, not a fine-tuning setting")
        budget = budget_of_setting(cfg, model, values)
    else:
        budget = finetune_budget(cfg, model)
    source = ratings.source or "ratings"
    rated, kept, bad_rated = decode_images(ratings.images, size)
    skipped = dict(ratings.skipped)
    if bad_rated:
        skipped[SKIP_UNREADABLE] = skipped.get(SKIP_UNREADABLE, 0) + len(bad_rated)
        line_of = dict(zip(ratings.images, ratings.lines)) if ratings.lines else {}
        for path, why in bad_rated:
            where = f"{source}:{line_of[path]}" if path in line_of else str(source)
            log.warning("%s: skipped (%s): rated image %s does not decode: %s",
                        where, SKIP_UNREADABLE, path, why)
    if len(kept) < MIN_RATINGS:
        raise DataError(
            f"{source}: {len(kept)} usable ratings, personalization needs at least {MIN_RATINGS} "
            f"(skipped: {skipped or 'none'}; first image that does not decode: "
            f"{bad_rated[0][0] if bad_rated else 'none'})"
        )
    score_images = list(score_images)
    images, ok, unreadable = decode_images(score_images, size)
    for path, why in unreadable:
        log.warning("%s: skipped: does not decode (%s); the other images are still ranked", path, why)
    if images is None:
        raise DataError(
            f"none of the {len(score_images)} images to score decodes (first: {unreadable[0][0]}: "
            f"{unreadable[0][1]})" if unreadable else "no images to score"
        )
    targets = ratings.scores if len(kept) == len(ratings.images) else ratings.scores[kept]
    support = (rated, score_targets(targets))
    preds = Scorer(model, budget, images).score(support, seed=seed) * 5.0
    preds = from_model_scale(preds, ratings.score_range)
    order = np.argsort(-preds, kind="stable")
    return PersonalRanking(
        ranked=tuple((score_images[ok[i]], float(preds[i])) for i in order),
        unreadable=tuple(unreadable),
        score_range=ratings.score_range,
        ratings_used=len(kept),
        skipped=skipped,
        finetune=describe_budget(budget),
    )


def write_ranking(ranked: Iterable[tuple[Path, float]], out_csv: str | Path) -> Path:
    """Write ``rank,image,predicted_score`` rows (rank 1 = best), scores on the person's scale."""
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "image", "predicted_score"])
        for i, (path, score) in enumerate(ranked, start=1):
            w.writerow([i, str(path), f"{score:.4f}"])
    return out


__all__ = [
    "IMAGE_COLUMNS",
    "IMAGE_SUFFIXES",
    "MIN_RATINGS",
    "MODEL_SCALE",
    "RATINGS_FORMAT_HELP",
    "SCORE_COLUMNS",
    "PersonalRanking",
    "Ratings",
    "check_score_range",
    "closest_setting",
    "decode_images",
    "describe_budget",
    "from_model_scale",
    "list_images",
    "load_images",
    "locate_image",
    "personalize",
    "read_ratings",
    "to_model_scale",
    "write_ranking",
]
