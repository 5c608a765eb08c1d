"""A synthetic personalized-aesthetics world written in exactly the FLICKR-AES layout.

Why a synthetic world: the real datasets cannot be shipped, and a world whose generative
process is known lets every later result be read against two ceilings computed from the
noise-free truth (see :func:`ceilings`).

Generative process (all of it deterministic under ``seed``):

* **Images.** Each image has an attribute vector ``a`` in ``[-1, 1]^8`` (see
  :data:`ATTRIBUTES`): brightness, colourfulness, warmth, contrast, sharpness, centring of the
  subject, clutter and subject size. The attributes are *rendered into the pixels* of a small
  scene (gradient background, a subject shape, distractor shapes, grain), so a model has to
  perceive them; nuisance variables (background hue, subject shape and colour, gradient
  direction, the subject's direction from the centre) vary freely.
* **Taste.** A user's noise-free preference is ``z_u(a) = shared(a) + g_u * w_k(u) . a +
  d_u . a``: a *shared* part everyone agrees on (sharp, uncluttered, big subject, moderate
  contrast), one of four *archetypes* built from two conflicting axes ("vivid" vs "moody":
  bright/colourful/warm or the opposite; "classic" vs "dynamic": centred/calm or the
  opposite), and a small *personal* perturbation ``d_u``. The archetypes cancel in the
  population average, so the average user is a weak predictor of most people, while a
  user's taste is low-dimensional enough that ~10 ratings identify the archetype: the
  structure meta-learning can exploit and a generic (average-user) prior cannot.
* **Scale use and noise.** ``latent = 3 + bias_u + scale_u * z_u`` is the user's noise-free
  score on the 1-5 scale; the observed integer rating adds Gaussian noise and applies the
  user's own (jittered) thresholds.

Files written to ``DIR``:

* ``images/*.jpg`` (names like ``farm3_4821_7261534982_9d2716d00e_b.jpg``),
* ``FLICKR-AES_image_labeled_by_each_worker.csv`` (header ``worker, imagePair, score`` with
  the real file's leading spaces in headers and values),
* ``test_workers.csv`` (header ``ID``),
* ``latent_scores.csv`` (the truth sidecar: ``worker,imagePair,latent,average_latent``),
* ``image_attributes.csv`` (the rendered attribute vector of each image),
* ``world.json`` (every generative parameter, per-user parameters and the ceilings).

This module is in the math layer: numpy, PIL and :mod:`piaa_dist.metrics` only.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from piaa_dist import metrics

log = logging.getLogger(__name__)

RATINGS_FILE = "FLICKR-AES_image_labeled_by_each_worker.csv"
TEST_WORKERS_FILE = "test_workers.csv"
SIDECAR_FILE = "latent_scores.csv"
ATTRIBUTES_FILE = "image_attributes.csv"
WORLD_FILE = "world.json"
IMAGES_DIR = "images"

#: Attribute names, in the order of an attribute vector. Every attribute lies in [-1, 1].
ATTRIBUTES: tuple[str, ...] = (
    "brightness",  # global exposure shift
    "colourfulness",  # saturation: blend towards grey (-1) or away from it (+1)
    "warmth",  # white balance: cool/blue (-1) to warm/orange (+1)
    "contrast",  # spread of the tones around the mean
    "sharpness",  # Gaussian blur: heavy (-1) to none (+1)
    "centring",  # subject far off-centre (-1) to exactly centred (+1)
    "clutter",  # distractor shapes: none (-1) to many (+1)
    "subject_size",  # subject radius: small (-1) to large (+1)
)
_IDX = {name: i for i, name in enumerate(ATTRIBUTES)}

#: What everyone agrees on (linear weights); plus a penalty on extreme contrast.
SHARED_WEIGHTS = {"sharpness": 0.55, "clutter": -0.35, "subject_size": 0.3}
SHARED_CONTRAST_PENALTY = 0.5

#: The two conflicting taste axes; an archetype is (sign_a, sign_b) applied to them.
AXIS_VIVID = {"brightness": 0.7, "colourfulness": 0.8, "warmth": 0.7}
AXIS_CLASSIC = {"centring": 0.9, "clutter": -0.5, "contrast": -0.4}
ARCHETYPES: tuple[tuple[str, int, int], ...] = (
    ("vivid-classic", +1, +1),
    ("vivid-dynamic", +1, -1),
    ("moody-classic", -1, +1),
    ("moody-dynamic", -1, -1),
)
#: Which archetypes a world with 1, 2 or 4 of them deals out (indices into ARCHETYPES). Two are
#: the opposite pair, so the population average still cancels them; one means every user leans
#: the same way, so the average user is a good model of everyone (GIAA's best case).
ARCHETYPE_SETS: dict[int, tuple[int, ...]] = {1: (0,), 2: (0, 3), 4: (0, 1, 2, 3)}


@dataclass(frozen=True)
class WorldSpec:
    """Size and generative parameters of a synthetic world.

    The defaults give 64 training and 16 test users over a pool of 3000 images (about 16k
    ratings, ~5 raters per image as in FLICKR-AES) and are generated in a few seconds.
    """

    users: int = 80  #: total users (train + test)
    images: int = 3000  #: size of the shared image pool
    seed: int = 0
    test_fraction: float = 0.2  #: share of users that are test users (at least 1)
    ratings_per_user: tuple[int, int] = (150, 250)  #: inclusive range of ratings per user
    image_size: int = 64  #: rendered side in pixels
    jpeg_quality: int = 95
    archetype_strength: tuple[float, float] = (0.75, 1.25)  #: per-user gain g_u on the archetype
    personal_sd: float = 0.2  #: sd of each component of the personal perturbation d_u
    bias_sd: float = 0.35  #: sd of the per-user offset of the 1-5 scale
    scale_range: tuple[float, float] = (0.55, 1.1)  #: per-user stretch of the 1-5 scale
    threshold_sd: float = 0.12  #: per-user jitter of the rating thresholds 1.5/2.5/3.5/4.5
    noise_sd: float = 0.45  #: rating noise, in units of the user's own scale (relative to z)
    archetypes: int = 4  #: how many taste archetypes the users are dealt (1, 2 or 4: ARCHETYPE_SETS)

    def __post_init__(self) -> None:
        lo, hi = self.ratings_per_user
        if self.users < 2:
            raise ValueError(f"a world needs at least 2 users (one train, one test), got {self.users}")
        if self.images < 2:
            raise ValueError(f"a world needs at least 2 images, got {self.images}")
        if not 1 <= lo <= hi:
            raise ValueError(f"ratings_per_user must be 1 <= lo <= hi, got {self.ratings_per_user}")
        if hi > self.images:
            raise ValueError(
                f"ratings_per_user upper bound {hi} exceeds the image pool ({self.images}): "
                "a user rates each image at most once"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.archetypes not in ARCHETYPE_SETS:
            raise ValueError(f"archetypes must be one of {sorted(ARCHETYPE_SETS)}, got {self.archetypes}")


@dataclass
class WorldSummary:
    """What :func:`make_world` wrote and the world's ceilings."""

    out: str
    users: int
    train_users: int
    test_users: int
    images: int
    ratings: int
    ceilings: dict[str, dict[str, float]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Rendering


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    h = (h % 1.0) * 6.0
    i = int(h) % 6
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def render_image(attrs: Sequence[float], rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Render one scene whose look is controlled by an attribute vector.

    Args:
        attrs: 8 values in [-1, 1], in the order of :data:`ATTRIBUTES`.
        rng: source of the nuisance variables (hues, shapes, positions, grain).
        size: side of the square image in pixels.

    Returns:
        An RGB PIL image of ``size`` x ``size``.
    """
    a = np.clip(np.asarray(attrs, dtype=np.float64), -1.0, 1.0)
    s = float(size)
    # Nuisance draws come first and in a fixed order so that an image depends only on its
    # attributes and its own generator, never on the rendering of other images.
    # The background hue follows warmth (blue/cyan when cool, through green, to orange/red
    # when warm) with some jitter: warmth must be visible as colour, not only as a subtle
    # white-balance shift that random hues would drown.
    hue_bg = 0.6 - 0.55 * (a[_IDX["warmth"]] + 1.0) / 2.0 + rng.uniform(-0.06, 0.06)
    hue_bg2 = hue_bg + rng.uniform(-0.06, 0.06)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    direction = rng.uniform(0.0, 2.0 * math.pi)
    shape = int(rng.integers(0, 3))
    hue_subject = hue_bg + 0.5 + rng.uniform(-0.15, 0.15)
    val_subject = rng.uniform(0.6, 0.9)

    # Background: a two-colour linear gradient in a random direction.
    yy, xx = _grid(size)
    t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5
    t = np.clip(t, 0.0, 1.0)[..., None]
    c1 = _hsv_to_rgb(hue_bg, 0.5, 0.62)
    c2 = _hsv_to_rgb(hue_bg2, 0.55, 0.38)
    img = c1 * (1.0 - t) + c2 * t

    canvas = Image.fromarray(np.uint8(np.clip(img, 0, 1) * 255 + 0.5), "RGB")
    draw = ImageDraw.Draw(canvas)
    # Clutter: 0..24 small distractor shapes of random colours.
    n_clutter = int(round((a[_IDX["clutter"]] + 1.0) / 2.0 * 24))
    for _ in range(n_clutter):
        cx, cy = rng.uniform(0, s), rng.uniform(0, s)
        r = rng.uniform(0.025, 0.06) * s
        col = tuple(int(255 * c) for c in _hsv_to_rgb(rng.random(), 0.7, rng.uniform(0.25, 0.95)))
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        else:
            draw.rectangle([cx - r, cy - r * 0.5, cx + r, cy + r * 0.5], fill=col)
    # Subject: size and distance from the centre are attributes; its direction is nuisance.
    radius = (0.13 + 0.09 * (a[_IDX["subject_size"]] + 1.0) / 2.0) * s
    offset = 0.3 * s * (1.0 - a[_IDX["centring"]]) / 2.0
    cx = s / 2 + offset * math.cos(direction)
    cy = s / 2 + offset * math.sin(direction)
    col = tuple(int(255 * c) for c in _hsv_to_rgb(hue_subject, 0.75, val_subject))
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == 0:
        draw.ellipse(box, fill=col)
    elif shape == 1:
        draw.rectangle(box, fill=col)
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=col)

    img = np.asarray(canvas, dtype=np.float64) / 255.0
    # Grain at a 2-pixel scale: fine texture that blur visibly removes, even at half size.
    g = max(size // 2, 1)
    grain = rng.normal(0.0, 0.05, size=(g, g))
    grain = np.kron(grain, np.ones((2, 2)))[:size, :size]
    if grain.shape[0] < size:
        grain = np.pad(grain, ((0, size - grain.shape[0]), (0, size - grain.shape[1])))
    img = img + grain[..., None]

    # Global photographic adjustments, each driven by one attribute.
    grey = img @ np.array([0.299, 0.587, 0.114])
    img = grey[..., None] + (img - grey[..., None]) * (1.0 + 0.85 * a[_IDX["colourfulness"]])
    img[..., 0] += 0.1 * a[_IDX["warmth"]]
    img[..., 1] += 0.02 * a[_IDX["warmth"]]
    img[..., 2] -= 0.1 * a[_IDX["warmth"]]
    mean = img.mean()
    img = mean + (img - mean) * (1.0 + 0.55 * a[_IDX["contrast"]])
    img = img + 0.2 * a[_IDX["brightness"]]
    out = Image.fromarray(np.uint8(np.clip(img, 0.0, 1.0) * 255 + 0.5), "RGB")
    blur = float(2.2 * (s / 64.0) * (1.0 - a[_IDX["sharpness"]]) / 2.0)
    if blur > 0.05:
        out = out.filter(ImageFilter.GaussianBlur(radius=blur))
    return out


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Taste


def _vector(weights: dict[str, float]) -> np.ndarray:
    v = np.zeros(len(ATTRIBUTES))
    for name, w in weights.items():
        v[_IDX[name]] = w
    return v


def shared_score(attrs: np.ndarray) -> np.ndarray:
    """The part of the preference every user shares, for attribute rows ``[N, 8]``."""
    attrs = np.atleast_2d(attrs)
    c = attrs[:, _IDX["contrast"]]
    # Centre the quadratic penalty (E[c^2] = 1/3 under U[-1, 1]) so it shifts no one's mean.
    return attrs @ _vector(SHARED_WEIGHTS) - SHARED_CONTRAST_PENALTY * (c**2 - 1.0 / 3.0)


def archetype_weights(k: int) -> np.ndarray:
    """Linear weights of archetype ``k`` (an index into :data:`ARCHETYPES`)."""
    _, sa, sb = ARCHETYPES[k]
    return sa * _vector(AXIS_VIVID) + sb * _vector(AXIS_CLASSIC)


# ---------------------------------------------------------------------------------------------
# Ceilings


def ceilings(
    latent: Sequence[float],
    average_latent: Sequence[float],
    observed: Sequence[float],
    users: Sequence[str],
) -> dict[str, float]:
    """The two reference SROCCs of a world, averaged over users.

    Groups the ratings by user and applies :func:`piaa_dist.metrics.ceilings` (the one
    implementation, shared with ``evaluate``; its Spearman is :func:`piaa_dist.metrics.srocc`).

    Args:
        latent: each rating's noise-free score for its own user.
        average_latent: each rating's noise-free score for the population-average user.
        observed: the observed ratings (1-5).
        users: the user of each rating (ratings are grouped by this).

    Returns:
        ``{"oracle": ..., "average_user": ..., "users": n, "constant_users": m}``: ``oracle``
        is the mean over users of SROCC(latent, observed), the best any model can reach;
        ``average_user`` is the mean of SROCC(average_latent, observed), what a perfect generic
        (GIAA) model reaches without personalization. Users whose ratings are all equal are
        left out (their SROCC is undefined) and counted in ``"constant_users"``; both means
        are NaN when no user is left.
    """
    latent = np.asarray(latent, dtype=np.float64)
    average_latent = np.asarray(average_latent, dtype=np.float64)
    observed = np.asarray(observed, dtype=np.float64)
    users_arr = np.asarray(users)
    if not (len(latent) == len(average_latent) == len(observed) == len(users_arr)):
        raise ValueError("latent, average_latent, observed and users must have the same length")
    groups = [users_arr == user for user in np.unique(users_arr)]
    out = metrics.ceilings((latent[m], average_latent[m], observed[m]) for m in groups).to_dict()
    # world.json and `piaa-dist synth` have always shown "no user left" as NaN
    return {k: (float("nan") if v is None else v) for k, v in out.items()}


def read_sidecar(root: str | Path) -> dict[str, np.ndarray]:
    """Read ``latent_scores.csv`` and the ratings file of a world, aligned row by row.

    Returns:
        ``{"users", "images", "latent", "average_latent", "observed"}`` arrays.
    """
    root = Path(root)
    truth: dict[tuple[str, str], tuple[float, float]] = {}
    with open(root / SIDECAR_FILE, newline="") as f:
        for row in csv.DictReader(f):
            truth[(row["worker"], row["imagePair"])] = (float(row["latent"]), float(row["average_latent"]))
    users, images, latent, avg, observed = [], [], [], [], []
    with open(root / RATINGS_FILE, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            w, img, score = (c.strip() for c in row)
            lat, av = truth[(w, img)]
            users.append(w)
            images.append(img)
            latent.append(lat)
            avg.append(av)
            observed.append(float(score))
    return {
        "users": np.asarray(users),
        "images": np.asarray(images),
        "latent": np.asarray(latent),
        "average_latent": np.asarray(avg),
        "observed": np.asarray(observed),
    }


def world_ceilings(root: str | Path) -> dict[str, dict[str, float]]:
    """Ceilings of a written world for all users and per split (``all``/``train``/``test``)."""
    root = Path(root)
    data = read_sidecar(root)
    with open(root / TEST_WORKERS_FILE, newline="") as f:
        test = {row["ID"].strip() for row in csv.DictReader(f)}
    is_test = np.array([u in test for u in data["users"]])
    out = {}
    for name, mask in (("all", np.ones_like(is_test)), ("train", ~is_test), ("test", is_test)):
        out[name] = ceilings(
            data["latent"][mask], data["average_latent"][mask], data["observed"][mask], data["users"][mask]
        )
    return out


# ---------------------------------------------------------------------------------------------
# The world


_ALNUM = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))


def _worker_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        wid = "A" + "".join(rng.choice(_ALNUM, size=13))
        if wid not in seen:
            seen.add(wid)
            ids.append(wid)
    return ids


def _image_names(rng: np.random.Generator, n: int) -> list[str]:
    names: list[str] = []
    seen: set[int] = set()
    while len(names) < n:
        photo = int(rng.integers(10**9, 10**10))
        if photo in seen:
            continue
        seen.add(photo)
        farm = int(rng.integers(1, 10))
        server = int(rng.integers(1000, 10000))
        secret = "".join(rng.choice(list("0123456789abcdef"), size=10))
        names.append(f"farm{farm}_{server}_{photo}_{secret}_b.jpg")
    return names


@dataclass
class World:
    """A sampled world in memory (everything but the pixels): see :func:`sample_world`."""

    spec: WorldSpec
    image_names: list[str]
    attrs: np.ndarray  #: [M, 8] attribute vectors
    render_seeds: list[np.random.SeedSequence]  #: one per image (nuisance draws of rendering)
    worker_ids: list[str]
    is_test: np.ndarray  #: [U] bool
    archetype: np.ndarray  #: [U] index into ARCHETYPES
    gain: np.ndarray
    personal: np.ndarray  #: [U, 8]
    bias: np.ndarray
    scale: np.ndarray
    thresholds: np.ndarray  #: [U, 4]
    n_ratings: np.ndarray
    z_sd: float
    raters_per_image: np.ndarray  #: [M]
    #: (user index, image index, observed score, latent, average_latent), grouped by user
    rows: list[tuple[int, int, int, float, float]]

    def ceilings(self) -> dict[str, dict[str, float]]:
        """Oracle and average-user ceilings for ``all``, ``train`` and ``test`` users."""
        u = np.array([r[0] for r in self.rows])
        obs = np.array([r[2] for r in self.rows], dtype=np.float64)
        lat = np.array([r[3] for r in self.rows])
        avg = np.array([r[4] for r in self.rows])
        test = self.is_test[u]
        return {
            name: ceilings(lat[m], avg[m], obs[m], u[m])
            for name, m in (("all", np.ones_like(test)), ("train", ~test), ("test", test))
        }


def sample_world(spec: WorldSpec | None = None) -> World:
    """Draw a world's images' attributes, its users and their ratings (no pixels, no files).

    Pure in ``spec``: the same spec always gives the same world.
    """
    spec = spec or WorldSpec()
    # Independent streams per concern, so e.g. changing the image count does not reshuffle
    # which users are test users.
    root = np.random.SeedSequence(spec.seed)
    ss_names, ss_attrs, ss_users, ss_assign, ss_noise, ss_render = root.spawn(6)

    # --- images
    image_names = _image_names(np.random.default_rng(ss_names), spec.images)
    attrs = np.random.default_rng(ss_attrs).uniform(-1.0, 1.0, size=(spec.images, len(ATTRIBUTES)))
    render_seeds = ss_render.spawn(spec.images)

    # --- users
    rng = np.random.default_rng(ss_users)
    worker_ids = _worker_ids(rng, spec.users)
    n_test = max(1, int(round(spec.users * spec.test_fraction)))
    n_test = min(n_test, spec.users - 1)
    is_test = np.zeros(spec.users, dtype=bool)
    is_test[rng.permutation(spec.users)[:n_test]] = True
    # Archetypes are dealt round-robin over a shuffled order within each split, so both splits
    # hold every archetype in (near) equal numbers and the population average cancels them.
    dealt = np.array(ARCHETYPE_SETS[spec.archetypes])
    archetype = np.zeros(spec.users, dtype=int)
    for split in (False, True):
        idx = np.flatnonzero(is_test == split)
        order = rng.permutation(idx)
        offset = int(rng.integers(0, len(dealt)))
        archetype[order] = dealt[(np.arange(len(order)) + offset) % len(dealt)]
    gain = rng.uniform(*spec.archetype_strength, size=spec.users)
    personal = rng.normal(0.0, spec.personal_sd, size=(spec.users, len(ATTRIBUTES)))
    bias = rng.normal(0.0, spec.bias_sd, size=spec.users)
    scale = rng.uniform(*spec.scale_range, size=spec.users)
    thresholds = np.sort(
        np.array([1.5, 2.5, 3.5, 4.5]) + rng.normal(0.0, spec.threshold_sd, size=(spec.users, 4)), axis=1
    )
    lo, hi = spec.ratings_per_user
    n_ratings = rng.integers(lo, hi + 1, size=spec.users)

    # Noise-free preference of every user for every image, standardised by the population sd
    # of z so that `scale` and `noise_sd` are in comparable units whatever the weights are.
    shared = shared_score(attrs)  # [M]
    arch_w = np.stack([archetype_weights(k) for k in archetype])  # [U, 8]
    z = shared[None, :] + (gain[:, None] * arch_w + personal) @ attrs.T  # [U, M]
    z_sd = float(z.std())
    z = z / z_sd
    latent = 3.0 + bias[:, None] + scale[:, None] * z
    # The population-average user: the mean noise-free score over the *training* users,
    # i.e. what a perfect generic model trained on the pooled training ratings predicts.
    average_latent = latent[~is_test].mean(axis=0)

    # --- who rates what: least-rated images first (random tie-break), so every image gets a
    # near-equal number of raters, as in FLICKR-AES's five raters per image.
    rng = np.random.default_rng(ss_assign)
    counts = np.zeros(spec.images)
    rated: list[tuple[int, np.ndarray]] = []
    for u in rng.permutation(spec.users):
        key = counts + rng.random(spec.images)
        chosen = np.argpartition(key, n_ratings[u] - 1)[: n_ratings[u]]
        counts[chosen] += 1
        rated.append((int(u), rng.permutation(chosen)))
    rated.sort(key=lambda t: t[0])

    rng = np.random.default_rng(ss_noise)
    rows: list[tuple[int, int, int, float, float]] = []
    for u, imgs in rated:
        noisy = latent[u, imgs] + rng.normal(0.0, spec.noise_sd * scale[u], size=len(imgs))
        scores = 1 + (noisy[:, None] > thresholds[u][None, :]).sum(axis=1)
        for i, sc in zip(imgs, scores):
            rows.append((u, int(i), int(sc), float(latent[u, i]), float(average_latent[i])))
    return World(
        spec=spec, image_names=image_names, attrs=attrs, render_seeds=render_seeds,
        worker_ids=worker_ids, is_test=is_test, archetype=archetype, gain=gain, personal=personal,
        bias=bias, scale=scale, thresholds=thresholds, n_ratings=n_ratings, z_sd=z_sd,
        raters_per_image=counts, rows=rows,
    )


def make_world(
    out: str | Path,
    spec: WorldSpec | None = None,
    *,
    workers: int = 4,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> WorldSummary:
    """Generate a synthetic world into ``out`` (created; existing world files are overwritten).

    Args:
        out: destination folder.
        spec: sizes and generative parameters (defaults: :class:`WorldSpec`).
        workers: threads rendering images (numpy and PIL release the GIL for part of it).
        progress: optional wrapper around the image iterator (e.g. ``tqdm``).

    Returns:
        A :class:`WorldSummary` including the oracle and average-user ceilings.
    """
    w = sample_world(spec)
    spec = w.spec
    out = Path(out)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)

    def render(i: int) -> None:
        img = render_image(w.attrs[i], np.random.default_rng(w.render_seeds[i]), spec.image_size)
        (out / IMAGES_DIR / w.image_names[i]).write_bytes(_encode_jpeg(img, spec.jpeg_quality))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        it = pool.map(render, range(spec.images))
        for _ in progress(it) if progress else it:
            pass

    ids, names = w.worker_ids, w.image_names
    with open(out / RATINGS_FILE, "w", newline="") as f:
        # The real file's quirk: a space after every comma, in the header and in the rows.
        f.write("worker, imagePair, score\n")
        for u, i, sc, _, _ in w.rows:
            f.write(f"{ids[u]}, {names[i]}, {sc}\n")
    with open(out / TEST_WORKERS_FILE, "w", newline="") as f:
        f.write("ID\n")
        for u in np.flatnonzero(w.is_test):
            f.write(f"{ids[u]}\n")
    with open(out / SIDECAR_FILE, "w", newline="") as f:
        f.write("worker,imagePair,latent,average_latent\n")
        for u, i, _, lat, avg in w.rows:
            f.write(f"{ids[u]},{names[i]},{lat:.6f},{avg:.6f}\n")
    with open(out / ATTRIBUTES_FILE, "w", newline="") as f:
        f.write("imagePair," + ",".join(ATTRIBUTES) + "\n")
        for name, a in zip(names, w.attrs):
            f.write(name + "," + ",".join(f"{v:.6f}" for v in a) + "\n")

    # Ceilings from the files just written (rounded latents), so they match what ingest reads.
    ceil = world_ceilings(out)
    n_test = int(w.is_test.sum())
    world = {
        "format": "piaa-dist synthetic world v1",
        "spec": asdict(spec),
        "attributes": list(ATTRIBUTES),
        "attribute_range": [-1.0, 1.0],
        "taste": {
            "z": "shared(a) + gain_u * archetype_k(u) . a + personal_u . a, divided by z_sd",
            "shared_weights": SHARED_WEIGHTS,
            "shared_contrast_penalty": SHARED_CONTRAST_PENALTY,
            "axis_vivid": AXIS_VIVID,
            "axis_classic": AXIS_CLASSIC,
            "archetypes": [{"name": n, "vivid": a, "classic": b} for n, a, b in ARCHETYPES],
            "z_sd": w.z_sd,
            "latent": "3 + bias_u + scale_u * z (noise-free score on the 1-5 scale)",
            "average_latent": "mean of latent over the training users",
            "observed": "1 + #{thresholds_u < latent + N(0, (noise_sd * scale_u)^2)}",
        },
        "users": [
            {
                "worker": ids[u],
                "split": "test" if w.is_test[u] else "train",
                "archetype": ARCHETYPES[w.archetype[u]][0],
                "gain": round(float(w.gain[u]), 6),
                "personal": [round(float(v), 6) for v in w.personal[u]],
                "bias": round(float(w.bias[u]), 6),
                "scale": round(float(w.scale[u]), 6),
                "thresholds": [round(float(v), 6) for v in w.thresholds[u]],
                "ratings": int(w.n_ratings[u]),
            }
            for u in range(spec.users)
        ],
        "raters_per_image": {
            "min": int(w.raters_per_image.min()),
            "max": int(w.raters_per_image.max()),
            "mean": float(w.raters_per_image.mean()),
        },
        "ceilings": ceil,
    }
    (out / WORLD_FILE).write_text(json.dumps(world, indent=1) + "\n")
    log.info(
        "wrote a synthetic world to %s: %d users (%d test), %d images, %d ratings",
        out, spec.users, n_test, spec.images, len(w.rows),
    )
    return WorldSummary(
        out=str(out),
        users=spec.users,
        train_users=spec.users - n_test,
        test_users=n_test,
        images=spec.images,
        ratings=len(w.rows),
        ceilings=ceil,
    )
