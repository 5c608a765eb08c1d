"""The typed result of the meta-testing protocol and its versioned JSON form.

:func:`piaa_dist.evaluate.evaluate` returns an :class:`EvaluationResult`; everything that shows
or stores a result takes one: the CLI table and the report tables and plots
(:mod:`piaa_dist.presentation`), MLflow logging (``RunLogger.log_evaluation``), the demo and
its README writer (:mod:`piaa_dist.orchestration.report`). Nobody indexes raw JSON dicts.

JSON (``to_json`` / ``from_json``, ``save`` / ``load``), schema version 2::

    {"schema_version": 2,
     "methods": {METHOD: {"K": {"srocc_mean", "srocc_std", "plcc_mean", "plcc_std",
                                "per_user": {USER: mean SROCC over repeats},
                                "per_user_plcc": {USER: ...}, "n_users", "degenerate"}}},
     "reference": "blg-piaa" | null,
     "paired": {"REFERENCE vs OTHER": {"K": {"diff_mean", "ci95": [lo, hi] | null,
                                             "n_users", "users_better"}}},
     "ceilings": {"oracle", "average_user", "users", "constant_users"} | null,
     "users": [USER, ...], "skipped": {"K": [USER, ...]}, "shots": [K, ...],
     "repeats", "seed", "config": {section: {...}}, "seconds",
     "model": str | null, "data": str | null, "giaa": str | null,
     "dataset_version": str | null, "giaa_key": str | null, "giaa_model": str | null,
     "ceilings_ci95": {"oracle": [lo, hi] | null, "average_user": [lo, hi] | null} | null,
     "finetune": {"protocol", "source", "chosen": {METHOD: {"K": SETTING}},
                  "validation_srocc": {METHOD: {"K": score}},
                  "grid": {METHOD: {"K": {SETTING: score}}}, "validation_users",
                  "validation_sha256", "repeats", "key", "note"} | null}

The last five keys were added to schema 2 later, as optional keys: a file without them (written
before) reads with them as null. ``ceilings_ci95`` is the 95% t-interval over users of each
ceiling (how sure the ceiling is on this finite sample of test users). ``finetune``
(:class:`FinetuneChoice`) is how each method's fine-tuning setting was chosen: the setting
(``eval.finetune`` syntax) per method and shot count, the mean validation SROCC it scored and
that of every candidate of the grid, on which validation users (count and SHA-256: training
users held out of meta-training, never test users). ``dataset_version`` is the dataset version evaluated,
``giaa_key`` the identity of the GIAA baseline (the hash of what it was trained from, see
:mod:`piaa_dist.orchestration.baselines`) and ``giaa_model`` the registered baseline used
(``models:/piaa-giaa/N``), so two results that name the same ``giaa_key`` compared their
meta-learners with the same GIAA model.

Version 1 is what ``evaluate`` wrote before the result was typed: the same layout without
``schema_version`` and ``reference``, ``users`` a count, a 95% interval that cannot be formed
(one user) written as ``[NaN, NaN]``, ceilings with only ``oracle`` and ``average_user``
(averaged over *every* user, constant-rating users scoring 0). :meth:`EvaluationResult.from_json`
reads it: the user list is rebuilt from ``per_user`` and ``skipped`` (every user is in one of
them for every k), and its ceilings read as ``users`` = all users, ``constant_users`` = 0 (no
user was left out under its rule). Anything else (an unknown key, a missing one, a newer
version) is a :class:`ResultFormatError` that names the file and the key.

This module is plain Python (no torch, Ray or MLflow), so any layer can read results.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from piaa_dist.errors import UserError
from piaa_dist.metrics import Ceilings

#: The version :meth:`EvaluationResult.to_json` writes.
SCHEMA_VERSION = 2
#: Versions :meth:`EvaluationResult.from_json` reads.
READABLE_VERSIONS = (1, 2)


class ResultFormatError(UserError):
    """A result file that is not an evaluation result this version can read: names the file
    (or ``<string>``) and the offending key."""


@dataclass(frozen=True)
class ShotStats:
    """One method at one shot count, over the users that had enough ratings.

    Attributes:
        srocc_mean: mean over users of each user's mean SROCC over repeats.
        srocc_std: spread over repeats: sample std of the per-repeat, user-averaged SROCC.
        plcc_mean / plcc_std: the same for PLCC.
        per_user: user → mean SROCC over repeats.
        per_user_plcc: user → mean PLCC over repeats.
        n_users: users scored.
        degenerate: splits whose predictions or test ratings were constant (scored 0).
    """

    srocc_mean: float
    srocc_std: float
    plcc_mean: float
    plcc_std: float
    per_user: dict[str, float]
    per_user_plcc: dict[str, float]
    n_users: int
    degenerate: int


@dataclass(frozen=True)
class PairedDiff:
    """Per-user paired difference ``reference − other`` at one shot count.

    Attributes:
        diff_mean: mean over common users of the difference of their mean SROCC over repeats.
        ci95: two-sided 95% t-interval of that mean; None when it cannot be formed (one user).
        n_users: common users.
        users_better: users for whom the reference scored higher.
    """

    diff_mean: float
    ci95: tuple[float, float] | None
    n_users: int
    users_better: int

    @property
    def significant(self) -> bool:
        """True when the whole 95% interval lies above zero."""
        return self.ci95 is not None and self.ci95[0] > 0


@dataclass(frozen=True)
class FinetuneChoice:
    """How the fine-tuning settings of an evaluation were chosen (never on test users).

    Attributes:
        protocol: ``"per-method"`` (each method its own setting) or ``"shared"`` (the paper's:
            the ``eval.finetune_*`` budget for every fine-tuned method).
        source: ``"search"`` (searched on validation users now), ``"cache"`` (a search of the
            same model, data, users and grid, reused), ``"config"`` (every setting given in
            ``eval.finetune``) or ``"none"`` (nothing to choose, see ``note``).
        chosen: method → k → the setting used (``eval.finetune`` syntax).
        validation_srocc: method → k → mean validation SROCC of the chosen setting (None: given,
            not searched).
        grid: method → k → setting → mean validation SROCC of every candidate searched.
        validation_users: how many validation users scored the candidates.
        validation_sha256: SHA-256 of their sorted IDs.
        repeats: random splits per validation user and k.
        key: the search's identity (model, data, users, grid, protocol), or None.
        note: why nothing was searched, when so.
    """

    protocol: str
    source: str
    chosen: dict[str, dict[int, str]] = field(default_factory=dict)
    validation_srocc: dict[str, dict[int, float | None]] = field(default_factory=dict)
    grid: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    validation_users: int = 0
    validation_sha256: str = ""
    repeats: int = 0
    key: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "chosen", {m: {int(k): str(v) for k, v in by.items()}
                                            for m, by in self.chosen.items()})
        object.__setattr__(self, "validation_srocc", {m: {int(k): (None if v is None else float(v))
                                                              for k, v in by.items()}
                                                      for m, by in self.validation_srocc.items()})
        object.__setattr__(self, "grid", {m: {int(k): {str(t): float(v) for t, v in c.items()}
                                              for k, c in by.items()} for m, by in self.grid.items()})

    def settings(self) -> tuple[str, ...]:
        """The chosen settings as ``eval.finetune`` entries (``METHOD@K: ...``)."""
        return tuple(text for by_k in self.chosen.values() for text in by_k.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (shot counts as string keys)."""
        return {
            "protocol": self.protocol, "source": self.source,
            "chosen": {m: {str(k): v for k, v in by.items()} for m, by in self.chosen.items()},
            "validation_srocc": {m: {str(k): v for k, v in by.items()} for m, by in self.validation_srocc.items()},
            "grid": {m: {str(k): dict(c) for k, c in by.items()} for m, by in self.grid.items()},
            "validation_users": self.validation_users, "validation_sha256": self.validation_sha256,
            "repeats": self.repeats, "key": self.key, "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinetuneChoice:
        """The inverse of :meth:`to_dict` (use :meth:`EvaluationResult.from_json` for checked
        reading of a result file)."""
        return cls(**dict(data))


@dataclass(frozen=True)
class EvaluationResult:
    """What one run of the meta-testing protocol measured (see the module docstring).

    Attributes:
        methods: method → shots k → :class:`ShotStats` (a k is absent when no user had enough
            ratings for it). Insertion order is the order the methods were evaluated in.
        reference: the method every other is compared with (``blg-piaa``), None if not run.
        paired: other method → k → :class:`PairedDiff` (``reference − other``).
        ceilings: oracle / average-user ceilings of the users (synthetic data only), else None.
        users: the users evaluated (for each k each is scored or in ``skipped``).
        skipped: k → users with too few ratings for k shots.
        shots, repeats, seed: the protocol.
        config: the job config as a dict (``piaa_dist.config.config_to_dict``).
        seconds: wall time of the run.
        model, data, giaa: where the meta-learner, the dataset and the GIAA prior came from
            (set by the command; None when not known).
        dataset_version: the dataset version evaluated (None when not known).
        giaa_key: the GIAA baseline's identity (None when it has none: a folder given by hand).
        giaa_model: the registered GIAA baseline (``models:/piaa-giaa/N``), when it is one.
        ceilings_ci95: ceiling name (``oracle``, ``average_user``) → 95% t-interval over the
            test users (None: not formed, e.g. one user), or None without ceilings.
        finetune: how each method's fine-tuning setting was chosen (:class:`FinetuneChoice`),
            or None (a result written before it was recorded, or a bare protocol run).
    """

    schema_version: ClassVar[int] = SCHEMA_VERSION

    methods: dict[str, dict[int, ShotStats]]
    reference: str | None
    paired: dict[str, dict[int, PairedDiff]]
    ceilings: Ceilings | None
    users: tuple[str, ...]
    skipped: dict[int, tuple[str, ...]]
    shots: tuple[int, ...]
    repeats: int
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    model: str | None = None
    data: str | None = None
    giaa: str | None = None
    dataset_version: str | None = None
    giaa_key: str | None = None
    giaa_model: str | None = None
    ceilings_ci95: dict[str, tuple[float, float] | None] | None = None
    finetune: FinetuneChoice | None = None

    def __post_init__(self) -> None:
        # The JSON form of the config (lists, not tuples), so that a result read back from its
        # JSON compares equal to the one that wrote it.
        object.__setattr__(self, "config", json.loads(json.dumps(self.config)))
        object.__setattr__(self, "users", tuple(self.users))
        object.__setattr__(self, "shots", tuple(int(k) for k in self.shots))
        object.__setattr__(self, "skipped", {int(k): tuple(v) for k, v in self.skipped.items()})
        if self.ceilings_ci95 is not None:
            object.__setattr__(self, "ceilings_ci95", {
                str(n): (None if ci is None else (float(ci[0]), float(ci[1])))
                for n, ci in self.ceilings_ci95.items()})

    # -----------------------------------------------------------------------------------------
    # Reading

    def stats(self, method: str, shots: int) -> ShotStats | None:
        """The statistics of `method` at `shots`, or None when it was not scored."""
        return self.methods.get(method, {}).get(int(shots))

    def paired_with(self, other: str, shots: int) -> PairedDiff | None:
        """``reference − other`` at `shots`, or None."""
        return self.paired.get(other, {}).get(int(shots))

    def baselines(self) -> list[str]:
        """Every method but the reference, in evaluation order."""
        return [m for m in self.methods if m != self.reference]

    def strongest_baseline(self, shots: int) -> tuple[str, PairedDiff] | None:
        """The baseline with the highest mean test SROCC at `shots`, and ``reference − it``.

        Picking the strongest by its *test* score is reporting (the comparison is made against
        whichever baseline did best, the hardest one to beat), not model selection: nothing is
        tuned on it. Ties go to the first baseline in evaluation order. None without a
        reference or a paired baseline at `shots`.
        """
        best: tuple[float, str] | None = None
        for name in self.baselines():
            cell, diff = self.stats(name, shots), self.paired_with(name, shots)
            if cell is None or diff is None:
                continue
            if best is None or cell.srocc_mean > best[0]:
                best = (cell.srocc_mean, name)
        if best is None:
            return None
        return best[1], self.paired_with(best[1], shots)  # type: ignore[return-value]

    def with_finetune(self, finetune: FinetuneChoice | None) -> EvaluationResult:
        """A copy that records how the fine-tuning settings were chosen."""
        return dataclasses.replace(self, finetune=finetune)

    def with_sources(self, *, model: str | None = None, data: str | None = None,
                     giaa: str | None = None, dataset_version: str | None = None,
                     giaa_key: str | None = None, giaa_model: str | None = None) -> EvaluationResult:
        """A copy that records where the model, the data and the GIAA prior came from."""
        return dataclasses.replace(self, model=model, data=data, giaa=giaa, dataset_version=dataset_version,
                                   giaa_key=giaa_key, giaa_model=giaa_model)

    # -----------------------------------------------------------------------------------------
    # JSON

    def to_dict(self) -> dict[str, Any]:
        """The schema-2 JSON object (strict JSON: no NaN)."""
        ref = self.reference
        return {
            "schema_version": SCHEMA_VERSION,
            "methods": {
                name: {str(k): dataclasses.asdict(s) for k, s in by_k.items()}
                for name, by_k in self.methods.items()
            },
            "reference": ref,
            "paired": {
                f"{ref} vs {other}": {
                    str(k): {"diff_mean": d.diff_mean,
                             "ci95": list(d.ci95) if d.ci95 is not None else None,
                             "n_users": d.n_users, "users_better": d.users_better}
                    for k, d in by_k.items()
                }
                for other, by_k in self.paired.items()
            },
            "ceilings": self.ceilings.to_dict() if self.ceilings is not None else None,
            "users": list(self.users),
            "skipped": {str(k): list(v) for k, v in self.skipped.items()},
            "shots": list(self.shots),
            "repeats": self.repeats,
            "seed": self.seed,
            "config": self.config,
            "seconds": self.seconds,
            "model": self.model,
            "data": self.data,
            "giaa": self.giaa,
            "dataset_version": self.dataset_version,
            "giaa_key": self.giaa_key,
            "giaa_model": self.giaa_model,
            "ceilings_ci95": None if self.ceilings_ci95 is None else {
                n: (None if ci is None else list(ci)) for n, ci in self.ceilings_ci95.items()},
            "finetune": None if self.finetune is None else self.finetune.to_dict(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The schema-2 JSON text."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to `path` (parent folders created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> EvaluationResult:
        """Read a schema-1 or schema-2 JSON text.

        Raises:
            ResultFormatError: not JSON, not a result, an unknown/missing key, a bad value or
                an unsupported version; the message names `source` and the key.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ResultFormatError(f"{source}: not JSON: {err}") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> EvaluationResult:
        """Read a result file (schema 1 or 2).

        Raises:
            ResultFormatError: unreadable file or not a result (see :meth:`from_json`).
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ResultFormatError(f"{path}: cannot read evaluation result: {err.strerror}") from None
        return cls.from_json(text, str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> EvaluationResult:
        """Build from a parsed JSON object (schema 1 or 2); see :meth:`from_json`."""
        return _Reader(source).result(data)


# ---------------------------------------------------------------------------------------------
# Reading JSON strictly, with errors that say where


_V2_KEYS = {"schema_version", "methods", "reference", "paired", "ceilings", "users", "skipped",
            "shots", "repeats", "seed", "config", "seconds", "model", "data", "giaa"}
_V1_KEYS = {"methods", "paired", "ceilings", "users", "skipped", "shots", "repeats", "seed",
            "config", "seconds"}
_V1_OPTIONAL = {"model", "data", "giaa"}
#: added to schema 2 later: absent in files written before
_V2_OPTIONAL = {"dataset_version", "giaa_key", "giaa_model", "ceilings_ci95", "finetune"}
_FINETUNE_KEYS = {f.name for f in dataclasses.fields(FinetuneChoice)}
_STATS_KEYS = {f.name for f in dataclasses.fields(ShotStats)}
_PAIRED_KEYS = {"diff_mean", "ci95", "n_users", "users_better"}
_CEILING_KEYS = {f.name for f in dataclasses.fields(Ceilings)}


class _Reader:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, what: str) -> ResultFormatError:
        return ResultFormatError(f"{self.source}: evaluation result {where}: {what}")

    def mapping(self, value: Any, where: str, required: set[str] | None = None,
                optional: set[str] = frozenset()) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected an object, got {type(value).__name__}")
        if required is not None:
            missing = sorted(required - set(value))
            unknown = sorted(set(value) - required - set(optional))
            if missing:
                raise self.fail(where, f"missing key(s) {missing}")
            if unknown:
                raise self.fail(where, f"unknown key(s) {unknown}")
        return value

    def number(self, value: Any, where: str, *, allow_nan: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"expected a number, got {value!r}")
        out = float(value)
        if not allow_nan and not math.isfinite(out):
            raise self.fail(where, f"expected a finite number, got {value!r}")
        return out

    def integer(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, got {value!r}")
        return int(value)

    def shots_key(self, value: Any, where: str) -> int:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise self.fail(where, f"expected a shot count, got {value!r}") from None

    def optional_str(self, value: Any, where: str) -> str | None:
        if value is not None and not isinstance(value, str):
            raise self.fail(where, f"expected a string or null, got {value!r}")
        return value

    def names(self, value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(where, f"expected a list of user names, got {value!r}")
        return tuple(value)

    def per_user(self, value: Any, where: str) -> dict[str, float]:
        m = self.mapping(value, where)
        return {str(u): self.number(v, f"{where}.{u}") for u, v in m.items()}

    def stats(self, value: Any, where: str) -> ShotStats:
        m = self.mapping(value, where, _STATS_KEYS)
        return ShotStats(
            srocc_mean=self.number(m["srocc_mean"], f"{where}.srocc_mean"),
            srocc_std=self.number(m["srocc_std"], f"{where}.srocc_std"),
            plcc_mean=self.number(m["plcc_mean"], f"{where}.plcc_mean"),
            plcc_std=self.number(m["plcc_std"], f"{where}.plcc_std"),
            per_user=self.per_user(m["per_user"], f"{where}.per_user"),
            per_user_plcc=self.per_user(m["per_user_plcc"], f"{where}.per_user_plcc"),
            n_users=self.integer(m["n_users"], f"{where}.n_users"),
            degenerate=self.integer(m["degenerate"], f"{where}.degenerate"),
        )

    def paired_diff(self, value: Any, where: str) -> PairedDiff:
        m = self.mapping(value, where, _PAIRED_KEYS)
        ci = m["ci95"]
        if ci is not None:
            if not isinstance(ci, list) or len(ci) != 2:
                raise self.fail(f"{where}.ci95", f"expected [low, high] or null, got {ci!r}")
            lo, hi = (self.number(c, f"{where}.ci95", allow_nan=True) for c in ci)
            # schema 1 wrote an interval that cannot be formed (one user) as [NaN, NaN]
            ci = None if math.isnan(lo) or math.isnan(hi) else (lo, hi)
        return PairedDiff(
            diff_mean=self.number(m["diff_mean"], f"{where}.diff_mean"),
            ci95=ci,
            n_users=self.integer(m["n_users"], f"{where}.n_users"),
            users_better=self.integer(m["users_better"], f"{where}.users_better"),
        )

    def ceilings(self, value: Any, where: str, *, v1_users: int | None = None) -> Ceilings | None:
        if value is None:
            return None
        if v1_users is not None:
            m = self.mapping(value, where, {"oracle", "average_user"})
            return Ceilings(oracle=self.number(m["oracle"], f"{where}.oracle"),
                            average_user=self.number(m["average_user"], f"{where}.average_user"),
                            users=v1_users, constant_users=0)
        m = self.mapping(value, where, _CEILING_KEYS)

        def opt(key: str) -> float | None:
            return None if m[key] is None else self.number(m[key], f"{where}.{key}")

        return Ceilings(oracle=opt("oracle"), average_user=opt("average_user"),
                        users=self.integer(m["users"], f"{where}.users"),
                        constant_users=self.integer(m["constant_users"], f"{where}.constant_users"))

    def interval(self, value: Any, where: str) -> tuple[float, float] | None:
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != 2:
            raise self.fail(where, f"expected [low, high] or null, got {value!r}")
        return (self.number(value[0], where), self.number(value[1], where))

    def ceilings_ci(self, value: Any, where: str) -> dict[str, tuple[float, float] | None] | None:
        if value is None:
            return None
        m = self.mapping(value, where, set(), {"oracle", "average_user"})
        return {str(n): self.interval(ci, f"{where}.{n}") for n, ci in m.items()}

    def by_method_k(self, value: Any, where: str, cell: Any) -> dict[str, dict[int, Any]]:
        return {str(m): {self.shots_key(k, f"{where}.{m}"): cell(v, f"{where}.{m}.{k}")
                         for k, v in self.mapping(by, f"{where}.{m}").items()}
                for m, by in self.mapping(value, where).items()}

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"expected a string, got {value!r}")
        return value

    def finetune(self, value: Any, where: str) -> FinetuneChoice | None:
        if value is None:
            return None
        m = self.mapping(value, where, _FINETUNE_KEYS)
        return FinetuneChoice(
            protocol=self.string(m["protocol"], f"{where}.protocol"),
            source=self.string(m["source"], f"{where}.source"),
            chosen=self.by_method_k(m["chosen"], f"{where}.chosen", self.string),
            validation_srocc=self.by_method_k(
                m["validation_srocc"], f"{where}.validation_srocc",
                lambda v, w: None if v is None else self.number(v, w)),
            grid=self.by_method_k(m["grid"], f"{where}.grid",
                                  lambda v, w: {str(t): self.number(x, f"{w}.{t}")
                                                for t, x in self.mapping(v, w).items()}),
            validation_users=self.integer(m["validation_users"], f"{where}.validation_users"),
            validation_sha256=self.string(m["validation_sha256"], f"{where}.validation_sha256"),
            repeats=self.integer(m["repeats"], f"{where}.repeats"),
            key=self.optional_str(m["key"], f"{where}.key"),
            note=self.string(m["note"], f"{where}.note"),
        )

    def result(self, data: Any) -> EvaluationResult:
        top = self.mapping(data, "top level")
        version = top.get("schema_version", 1)
        if version not in READABLE_VERSIONS:
            raise self.fail("schema_version", f"{version!r} is not one this piaa-dist reads "
                                              f"({', '.join(map(str, READABLE_VERSIONS))})")
        if version == 1:
            top = self.mapping(top, "top level (schema 1)", _V1_KEYS, _V1_OPTIONAL)
        else:
            top = self.mapping(top, "top level", _V2_KEYS, _V2_OPTIONAL)

        methods: dict[str, dict[int, ShotStats]] = {}
        for name, by_k in self.mapping(top["methods"], "methods").items():
            methods[str(name)] = {
                self.shots_key(k, f"methods.{name}"): self.stats(cell, f"methods.{name}.{k}")
                for k, cell in self.mapping(by_k, f"methods.{name}").items()
            }
        paired_raw = self.mapping(top["paired"], "paired")
        references = set()
        paired: dict[str, dict[int, PairedDiff]] = {}
        for key, by_k in paired_raw.items():
            ref, sep, other = str(key).partition(" vs ")
            if not sep or not ref or not other:
                raise self.fail(f"paired.{key}", "expected a key 'REFERENCE vs OTHER'")
            references.add(ref)
            paired[other] = {
                self.shots_key(k, f"paired.{key}"): self.paired_diff(d, f"paired.{key}.{k}")
                for k, d in self.mapping(by_k, f"paired.{key}").items()
            }
        if len(references) > 1:
            raise self.fail("paired", f"comparisons against several references {sorted(references)}")
        if version == 1:
            reference = next(iter(references), None)
            if reference is None and "blg-piaa" in methods:
                reference = "blg-piaa"
        else:
            reference = self.optional_str(top["reference"], "reference")
            if references and references != {reference}:
                raise self.fail("paired", f"keys name reference {sorted(references)}, "
                                          f"not the result's reference {reference!r}")

        skipped = {
            self.shots_key(k, "skipped"): self.names(v, f"skipped.{k}")
            for k, v in self.mapping(top["skipped"], "skipped").items()
        }
        if version == 1:
            count = self.integer(top["users"], "users")
            seen: set[str] = set()
            for by_k in methods.values():
                for cell in by_k.values():
                    seen.update(cell.per_user)
            for names in skipped.values():
                seen.update(names)
            if len(seen) != count:
                raise self.fail("users", f"says {count} users but per_user and skipped name "
                                         f"{len(seen)}: cannot rebuild the user list")
            users = tuple(sorted(seen))
            ceilings = self.ceilings(top["ceilings"], "ceilings", v1_users=count)
        else:
            users = self.names(top["users"], "users")
            ceilings = self.ceilings(top["ceilings"], "ceilings")

        shots = top["shots"]
        if not isinstance(shots, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in shots):
            raise self.fail("shots", f"expected a list of integers, got {shots!r}")
        config = self.mapping(top["config"], "config")
        return EvaluationResult(
            methods=methods,
            reference=reference,
            paired=paired,
            ceilings=ceilings,
            users=users,
            skipped=skipped,
            shots=tuple(shots),
            repeats=self.integer(top["repeats"], "repeats"),
            seed=self.integer(top["seed"], "seed"),
            config=dict(config),
            seconds=self.number(top["seconds"], "seconds"),
            model=self.optional_str(top.get("model"), "model"),
            data=self.optional_str(top.get("data"), "data"),
            giaa=self.optional_str(top.get("giaa"), "giaa"),
            dataset_version=self.optional_str(top.get("dataset_version"), "dataset_version"),
            giaa_key=self.optional_str(top.get("giaa_key"), "giaa_key"),
            giaa_model=self.optional_str(top.get("giaa_model"), "giaa_model"),
            ceilings_ci95=self.ceilings_ci(top.get("ceilings_ci95"), "ceilings_ci95"),
            finetune=self.finetune(top.get("finetune"), "finetune"),
        )


__all__ = [
    "READABLE_VERSIONS",
    "SCHEMA_VERSION",
    "EvaluationResult",
    "FinetuneChoice",
    "PairedDiff",
    "ResultFormatError",
    "ShotStats",
]
