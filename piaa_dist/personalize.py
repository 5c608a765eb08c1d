"""Personalize a meta-learner to one person: adapt on their ratings, rank new images.

This is the product path of BLG-PIAA: a user rates 10 or more of their images, the
meta-learner is fine-tuned on them with the budget of the meta-testing protocol
(:func:`piaa_dist.protocol.finetune_budget` of the model's own config), and the adapted model
scores new images through the same :class:`piaa_dist.protocol.Scorer` ``evaluate`` uses, so a
person's ranking is exactly what the protocol measured would predict for them.

Plain PyTorch: no Ray, MLflow or boto3 here (the command resolves ``models:/`` URIs).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from piaa_dist.config import JobConfig
from piaa_dist.data.decode import decode
from piaa_dist.errors import DataError
from piaa_dist.protocol import Scorer, finetune_budget, score_targets

log = logging.getLogger(__name__)

MIN_RATINGS = 10
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_IMAGE_COLUMNS = ("image", "imagepair", "file", "filename", "path")
_SCORE_COLUMNS = ("score", "rating")


@dataclass(frozen=True)
class Ratings:
    """One person's ratings read from a CSV.

    Attributes:
        images: image paths (resolved against the images folder).
        scores: float32 ratings on the 1–5 scale.
        skipped: ``{reason: count}`` of rows not used (every row is either used or counted).
    """

    images: list[Path]
    scores: np.ndarray
    skipped: dict[str, int]


def read_ratings(csv_path: str | Path, images_dir: str | Path) -> Ratings:
    """Read ``image,score`` rows (FLICKR-AES' ``imagePair, score`` works too).

    Header names are matched case-insensitively with surrounding spaces ignored; an optional
    ``worker`` column is ignored. A row is skipped (and counted) when its score is not a number
    in [1, 5] or its image is missing from ``images_dir``; a repeated image keeps its first
    rating.

    Raises:
        DataError: unreadable file, no image/score columns (naming the file), or fewer than
            10 usable ratings (naming the file and the skip counts).
    """
    csv_path, images_dir = Path(csv_path), Path(images_dir)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as err:
        raise DataError(f"{csv_path}: cannot read ratings: {err.strerror}") from None
    if not rows:
        raise DataError(f"{csv_path}: empty ratings file")
    header = [h.strip().lower() for h in rows[0]]
    img_col = next((header.index(c) for c in _IMAGE_COLUMNS if c in header), None)
    score_col = next((header.index(c) for c in _SCORE_COLUMNS if c in header), None)
    if img_col is None or score_col is None:
        raise DataError(
            f"{csv_path}: header {rows[0]!r} needs an image column ({'/'.join(_IMAGE_COLUMNS)}) "
            f"and a score column ({'/'.join(_SCORE_COLUMNS)})"
        )
    images: list[Path] = []
    scores: list[float] = []
    seen: set[str] = set()
    skipped: dict[str, int] = {}

    def skip(reason: str, lineno: int, row: list[str]) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        log.warning("%s:%d: skipped (%s): %r", csv_path, lineno, reason, row)

    for lineno, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line, not a rating
        if len(row) <= max(img_col, score_col):
            skip("short row", lineno, row)
            continue
        name = row[img_col].strip()
        try:
            score = float(row[score_col].strip())
        except ValueError:
            skip("bad score", lineno, row)
            continue
        if not (1.0 <= score <= 5.0):
            skip("bad score", lineno, row)
            continue
        if name in seen:
            skip("duplicate image", lineno, row)
            continue
        path = images_dir / name
        if not path.is_file():
            skip("missing image", lineno, row)
            continue
        seen.add(name)
        images.append(path)
        scores.append(score)
    if len(images) < MIN_RATINGS:
        raise DataError(
            f"{csv_path}: {len(images)} usable ratings, personalization needs at least "
            f"{MIN_RATINGS} (skipped: {skipped or 'none'})"
        )
    return Ratings(images, np.asarray(scores, dtype=np.float32), skipped)


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


def load_images(paths: Iterable[Path], image_size: int) -> torch.Tensor:
    """Decode image files as the model sees them at test time: ``[N,3,S,S]`` (the same
    decoding as ``evaluate.decode_user``: one ``decode(..., augment=False)`` per image).

    Raises:
        DataError: an unreadable image, naming the file.
    """
    tensors = []
    for path in paths:
        try:
            tensors.append(decode(path.read_bytes(), image_size, False, None))
        except Exception as err:  # noqa: BLE001 - any decoder failure is this file's fault
            raise DataError(f"{path}: cannot decode image: {err}") from None
    return torch.stack(tensors)


def personalize(
    model: nn.Module,
    cfg: JobConfig,
    ratings: Ratings,
    score_images: Sequence[Path],
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[tuple[Path, float]]:
    """Adapt `model` on `ratings` and score `score_images`, best first.

    Exactly what ``evaluate`` does for one split: the budget of
    :func:`piaa_dist.protocol.finetune_budget` (``eval.finetune_*``, ``eval.batch_size``, and
    the inner loop's ``meta.inner_params`` / ``meta.inner_head_lr_scale``), the ratings in
    file order as the support set, and a :class:`piaa_dist.protocol.Scorer` over the images
    to score. With the same images, ratings and seed the predictions equal ``evaluate``'s bit
    for bit (``tests/test_protocol.py``).

    Args:
        device: where to fine-tune and score (``piaa_dist.model.select_device(cfg.run.use_gpu)``
            picks it the way every job does); None keeps the model where it is. A CUDA device
            must be usable.

    Raises:
        DataError: an unreadable image, naming the file.
        ConfigError: an invalid fine-tuning budget in `cfg`.
        GpuUnavailable: a CUDA device was given but CUDA cannot use it here (names the driver).

    Returns:
        ``[(image, predicted score on the 1–5 scale)]`` sorted from highest to lowest.
    """
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda":
            from piaa_dist.gpu import require_cuda

            require_cuda("personalize")
        model = model.to(device)
    size = cfg.data.image_size
    budget = finetune_budget(cfg, model)
    support = (load_images(ratings.images, size), score_targets(ratings.scores))
    preds = Scorer(model, budget, load_images(score_images, size)).score(support, seed=seed) * 5.0
    order = np.argsort(-preds, kind="stable")
    return [(score_images[i], float(preds[i])) for i in order]


def write_ranking(ranked: Sequence[tuple[Path, float]], out_csv: str | Path) -> Path:
    """Write ``rank,image,predicted_score`` rows (rank 1 = best)."""
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "image", "predicted_score"])
        for i, (path, score) in enumerate(ranked, start=1):
            w.writerow([i, str(path), f"{score:.4f}"])
    return out
