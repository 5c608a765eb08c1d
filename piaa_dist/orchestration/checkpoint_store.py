"""Where a meta-training run keeps its checkpoints, and how they are written, found and loaded.

No Ray here (pyarrow for storage, :mod:`piaa_dist.checkpoint` for the files), so the rules
that decide what a run resumes from are tested without a cluster, and the Ray Train runner
(:mod:`piaa_dist.orchestration.ray_train`) and the in-process runner
(:mod:`piaa_dist.orchestration.in_process`) share them.

Layout of one run's storage (``<root>`` is a local folder or ``s3://bucket/prefix``)::

    <root>/<name>/checkpoint_<step:06d>/        written by Ray Train (rank 0's reports)
    <root>/<name>/local/checkpoint_<step:06d>/  written by an in-process run
    <root>/<name>/local/LATEST                  pointer: name of the newest folder it saved
    <root>/<name>[/local]/best/checkpoint_<step>/  the best validation checkpoint (a copy)
    <root>/<name>[/local]/BEST                  pointer: "best/checkpoint_<step>"

A checkpoint folder is a training state (``piaa_dist.checkpoint.save_training_state``: its
JSON, written last, records the tensors' SHA-256) plus the run's ``config.yaml``. A folder that
does not load (a torn upload, a killed writer, bit rot) is never resumed from: a restart takes
the newest folder that *loads* and logs the real location of every newer one it skipped.
Pointer files (``LATEST``, ``BEST``) are written atomically and never decide what a run
resumes from, so an empty or stale pointer cannot send a run back to step 0.

The best checkpoint: whenever a validation SROCC is a new best (held-out *training* users,
never test users; :class:`piaa_dist.schedule.EarlyStopping`), the runner writes a copy of that
step's checkpoint to ``best/`` and moves ``BEST`` to it (:func:`write_best`); the previous best
copy is deleted only after the pointer has moved, and the regular pruning (newest + previous)
never touches ``best/``. What a run registers is the model in ``BEST`` (:func:`read_best`), not
its last step; a best copy that does not agree with the run's own early-stopping state (a
stale copy of an earlier run under the same name) is ignored with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from piaa_dist.checkpoint import (
    STATE_JSON_FILE,
    CheckpointError,
    load_training_state,
    save_training_state,
)
from piaa_dist.config import JobConfig, dump_config
from piaa_dist.errors import UserError
from piaa_dist.redact import split_credentials

log = logging.getLogger(__name__)

DEFAULT_NAME = "meta-train"
#: checkpoints kept in storage: the newest, and one older one to survive a torn newest
KEEP_CHECKPOINTS = 2
#: sub-folder of a run's storage that holds the checkpoints of in-process runs
IN_PROCESS_DIR = "local"
#: pointer file naming the newest checkpoint folder an in-process run saved
LATEST = "LATEST"
#: pointer file naming the best validation checkpoint (``best/checkpoint_<step>``)
BEST = "BEST"
#: sub-folder holding the copy of the best validation checkpoint
BEST_DIR = "best"
CHECKPOINT_CONFIG_FILE = "config.yaml"
#: file in a run's storage folder that the driver writes and every node must read back
VISIBILITY_MARKER = ".piaa-storage-check"

_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d{6,})$")


def checkpoint_dir_name(step: int) -> str:
    """The folder name of the checkpoint after ``step`` meta-updates."""
    return f"checkpoint_{step:06d}"


def absolute_url(url: str) -> str:
    """A URL with scheme unchanged; a local path made absolute.

    Ray Train workers run in their own working directory, so a relative dataset or storage
    path would point somewhere else there.
    """
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


class StorageNotShared(UserError):
    """A run's checkpoint storage is not the same storage on every node of the cluster."""


def _is_local(fs: Any) -> bool:
    return getattr(fs, "type_name", "") == "local"


@dataclasses.dataclass(frozen=True)
class RunStorage:
    """One run's checkpoint storage: a root (local folder or S3 prefix) and a run name.

    Picklable (pyarrow filesystems are), so it travels to Ray Train workers as is, and its
    pickle holds no credentials: every process takes those from its own environment.

    Attributes:
        url: the root as users write it: an absolute local folder or ``s3://bucket/prefix``.
        root: the same root as a path inside :attr:`filesystem` (``bucket/prefix`` on S3).
        filesystem: a ``pyarrow.fs.FileSystem`` that reaches the root.
        name: the run's folder under the root (re-using a name resumes that run).
        endpoint_url: the S3 endpoint the filesystem was pointed at (None: AWS default).
    """

    url: str
    root: str
    filesystem: Any
    name: str = DEFAULT_NAME
    endpoint_url: str | None = None

    @classmethod
    def from_url(
        cls, url: str, name: str = DEFAULT_NAME, endpoint_url: str | None = None
    ) -> RunStorage:
        """Build from a storage URL.

        Args:
            url: a local folder (made absolute) or ``s3://bucket/prefix``.
            name: the run's folder name under the root.
            endpoint_url: S3 endpoint (a moto or MinIO server); default ``$AWS_ENDPOINT_URL``,
                else AWS itself.
        """
        import pyarrow.fs

        if not url.startswith("s3://"):
            local = absolute_url(url.removeprefix("file://"))
            return cls(local, local, pyarrow.fs.LocalFileSystem(), name, None)
        url = url.rstrip("/")
        root = url[len("s3://"):]
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        if endpoint is not None:
            endpoint = split_credentials(endpoint)[0]
        if endpoint is None:
            # Real AWS: default credential chain and the bucket's region.
            fs, root = pyarrow.fs.FileSystem.from_uri(url)
            return cls(url, root.rstrip("/"), fs, name, None)
        parsed = urlparse(endpoint)
        # No keys here, ever: pyarrow pickles explicit keys with the filesystem, and Ray pickles
        # the filesystem into Tune's tuner.pkl in the storage itself and into every worker's
        # arguments. Without them, each process reads its own credentials (AWS_ACCESS_KEY_ID /
        # AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, a profile, an instance role) when it first
        # talks to S3: a local Ray inherits the driver's environment, a cluster's nodes or the
        # job's runtime_env provide theirs. (User-info in an endpoint URL is not an S3
        # credential, S3 signs requests with keys, and would break the host name: dropped above.)
        kwargs: dict[str, Any] = {
            "endpoint_override": parsed.netloc or parsed.path,
            "scheme": parsed.scheme or "http",
            "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        }
        return cls(url, root, pyarrow.fs.S3FileSystem(**kwargs), name, endpoint)

    @property
    def is_local(self) -> bool:
        """True for a local folder."""
        return _is_local(self.filesystem)

    def run_path(self, *parts: str) -> str:
        """A path inside the filesystem under this run's folder (``<root>/<name>/<parts>``)."""
        return "/".join([self.root.rstrip("/"), self.name, *[p.strip("/") for p in parts if p]])

    def url_of(self, path: str) -> str:
        """The user-facing location of a filesystem path (``s3://...`` on S3), for messages."""
        if self.is_local or path.startswith("s3://"):
            return path
        return f"s3://{path}"

    def visibility_marker_path(self) -> str:
        """The marker file that shows whether a node sees this run's storage (a filesystem path)."""
        return self.run_path(VISIBILITY_MARKER)

    def write_visibility_marker(self) -> str:
        """Write a fresh nonce into :meth:`visibility_marker_path` (atomically); return it.

        A node that reads back this nonce sees the same storage as the writer; a node that
        reads nothing, or an older nonce, has a storage of its own (a local folder of the same
        name), whatever the path looks like.
        """
        nonce = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex}"
        self.filesystem.create_dir(self.run_path(), recursive=True)
        write_pointer(self, self.visibility_marker_path(), nonce)
        return nonce

    def read_visibility_marker(self) -> str | None:
        """The nonce this node reads at :meth:`visibility_marker_path` (None: no marker)."""
        try:
            return read_pointer(self, self.visibility_marker_path())
        except OSError as err:
            log.warning("cannot read %s: %s", self.url_of(self.visibility_marker_path()), err)
            return None

    def ray_storage(self) -> tuple[str, Any | None]:
        """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``.

        Ray infers the filesystem of a local path or a plain ``s3://`` URL itself; a custom
        endpoint needs the filesystem passed explicitly and the scheme stripped.
        """
        if self.is_local:
            return self.root, None
        if self.endpoint_url is None:
            return self.url, None
        return self.root, self.filesystem


# ---------------------------------------------------------------------------------------------
# Checkpoint folders


def write_checkpoint_folder(directory: str | Path, state: Mapping[str, Any], cfg: JobConfig) -> Path:
    """Write a training state and the run's config into a local folder (not yet in storage)."""
    out = save_training_state(directory, state)
    (out / CHECKPOINT_CONFIG_FILE).write_text(dump_config(cfg))
    return out


def stored_checkpoints(storage: RunStorage, *under: str) -> list[tuple[int, str]]:
    """``(step, folder)`` of the ``checkpoint_<step>`` folders in the run's storage, newest first.

    Args:
        storage: the run's storage.
        under: sub-folders of the run folder to look in (e.g. ``"local"``).

    Returns:
        Folders as paths inside ``storage.filesystem``; empty when the run has none yet.
    """
    import pyarrow.fs

    selector = pyarrow.fs.FileSelector(storage.run_path(*under), allow_not_found=True)
    found = []
    for info in storage.filesystem.get_file_info(selector):
        m = _CHECKPOINT_DIR.match(info.base_name)
        if m and info.type == pyarrow.fs.FileType.Directory:
            found.append((int(m.group(1)), info.path))
    return sorted(found, reverse=True)


def load_checkpoint(storage: RunStorage, folder: str) -> dict:
    """Load the training state in a checkpoint folder of ``storage``.

    The one way every runner reads a checkpoint: a local folder is read where it is; a remote
    one is downloaded to a temporary folder first. Errors name the folder's real location
    (never the temporary copy).

    Args:
        storage: the storage the folder lives in.
        folder: the folder as a path inside ``storage.filesystem``.

    Raises:
        CheckpointError: the folder is missing, incomplete or corrupted (names its URL).
    """
    import pyarrow.fs

    url = storage.url_of(folder)
    if storage.is_local:
        return load_training_state(folder)
    with tempfile.TemporaryDirectory(prefix="piaa-checkpoint-") as tmp:
        try:
            pyarrow.fs.copy_files(
                folder, tmp, source_filesystem=storage.filesystem,
                destination_filesystem=pyarrow.fs.LocalFileSystem(),
            )
        except OSError as err:
            raise CheckpointError(f"{url}: cannot download checkpoint: {err}") from None
        try:
            return load_training_state(tmp)
        except CheckpointError as err:
            raise CheckpointError(str(err).replace(tmp, url)) from None


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """What a run resumes from.

    Attributes:
        folder: the checkpoint folder (a path inside the storage's filesystem), or None.
        url: its user-facing location, or None.
        state: its training state, or None (start from scratch).
        skipped: locations of newer checkpoint folders that did not load, newest first.
    """

    folder: str | None = None
    url: str | None = None
    state: dict | None = None
    skipped: tuple[str, ...] = ()

    @property
    def step(self) -> int:
        """The step the run continues at (0 = from scratch)."""
        return int(self.state["step"]) if self.state is not None else 0


def newest_loadable(storage: RunStorage, *under: str, after: int = -1) -> ResumePoint:
    """The newest checkpoint in the run's storage that loads, with a step above ``after``.

    Folders that fail to load (a torn upload: a missing file or a hash mismatch) are skipped,
    each with a warning naming its real location and why; the skipped ones are in the result.

    Args:
        storage: the run's storage.
        under: sub-folders of the run folder to look in (``"local"`` for in-process runs).
        after: only consider checkpoints after this step.
    """
    skipped: list[str] = []
    for step, folder in stored_checkpoints(storage, *under):
        if step <= after:
            break
        url = storage.url_of(folder)
        try:
            state = load_checkpoint(storage, folder)
        except (CheckpointError, OSError) as err:
            log.warning("skipping checkpoint %s: it does not load (%s)", url, err)
            skipped.append(url)
            continue
        if int(state.get("step", -1)) != step:
            log.warning("skipping checkpoint %s: it holds step %s, its name says %d",
                        url, state.get("step"), step)
            skipped.append(url)
            continue
        return ResumePoint(folder, url, state, tuple(skipped))
    if skipped:
        log.warning("none of the %d checkpoint(s) in %s loads; starting from step 0",
                    len(skipped), storage.url_of(storage.run_path(*under)))
    return ResumePoint(skipped=tuple(skipped))


def model_from_state(cfg: JobConfig, state: Mapping[str, Any]) -> Any:
    """The meta-learner (``piaa_dist.model.build_model(cfg.model)``) with a state's weights."""
    from piaa_dist.model import build_model

    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return model


# ---------------------------------------------------------------------------------------------
# Pointer files and uploads


def write_pointer(storage: RunStorage, path: str, text: str) -> None:
    """Write a small pointer file atomically: readers see the old or the new text, never less.

    A local file is written beside the target and renamed over it; an S3 object only becomes
    visible once its upload completes, so it is written in place.
    """
    fs = storage.filesystem
    if not storage.is_local:
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
        return
    parent, _, base = path.rpartition("/")
    tmp = f"{parent}/.{base}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        fs.move(tmp, path)  # rename(2): atomic replace
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def read_pointer(storage: RunStorage, path: str) -> str | None:
    """The text of a pointer file (stripped), or None when it is missing or empty."""
    import pyarrow.fs

    fs = storage.filesystem
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode(errors="replace").strip() or None


def _upload_folder(storage: RunStorage, local: Path, dest: str) -> None:
    """Copy a local checkpoint folder to ``dest``, its state JSON last (it marks completeness)."""
    fs = storage.filesystem
    if storage.is_local:
        # Write next to the target and rename: the folder appears complete or not at all.
        parent, _, base = dest.rpartition("/")
        tmp = f"{parent}/.{base}.{uuid.uuid4().hex}.tmp"
        fs.create_dir(tmp, recursive=True)
        for p in sorted(local.iterdir()):
            fs.copy_file(str(p), f"{tmp}/{p.name}")
        if _exists(fs, dest):  # a torn folder of an earlier attempt at this step
            fs.delete_dir(dest)
        fs.move(tmp, dest)
        return
    fs.delete_dir_contents(dest, missing_dir_ok=True)  # no stale files from a torn attempt
    fs.create_dir(dest, recursive=True)
    files = sorted(local.iterdir(), key=lambda p: (p.name == STATE_JSON_FILE, p.name))
    for p in files:
        with fs.open_output_stream(f"{dest}/{p.name}") as out:
            out.write(p.read_bytes())


def _exists(fs: Any, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


@dataclasses.dataclass(frozen=True)
class BestPoint:
    """A run's best validation checkpoint.

    Attributes:
        step: the meta-step it was saved after.
        score: its validation SROCC (held-out training users).
        url: the folder's user-facing location.
        state: its training state.
    """

    step: int
    score: float | None
    url: str
    state: dict


def write_best(storage: RunStorage, local: str | Path, step: int, *under: str) -> str:
    """Keep a local checkpoint folder as the run's best: copy it to ``best/checkpoint_<step>``
    under the run folder (``under`` e.g. ``"local"``), move the ``BEST`` pointer to it, then
    delete the older best copies. Returns the copy's URL.

    The copy is complete before the pointer moves (JSON last, or a rename on a local disk), and
    the old best goes only after that, so ``BEST`` always names a whole folder.
    """
    import pyarrow.fs

    fs = storage.filesystem
    best_root = storage.run_path(*under, BEST_DIR)
    name = checkpoint_dir_name(step)
    fs.create_dir(best_root, recursive=True)
    _upload_folder(storage, Path(local), f"{best_root}/{name}")
    write_pointer(storage, storage.run_path(*under, BEST), f"{BEST_DIR}/{name}")
    for info in fs.get_file_info(pyarrow.fs.FileSelector(best_root, allow_not_found=True)):
        if info.type == pyarrow.fs.FileType.Directory and info.base_name != name:
            try:
                fs.delete_dir(info.path)
            except OSError as err:  # harmless: the next best write retries
                log.warning("could not delete old best checkpoint %s: %s", storage.url_of(info.path), err)
    return storage.url_of(f"{best_root}/{name}")


def read_best(storage: RunStorage, *under: str, best_step: int | None = None) -> BestPoint | None:
    """The run's best validation checkpoint (``BEST``), or None when it has none.

    Args:
        storage: the run's storage.
        under: the runner's sub-folder (``"local"`` for in-process runs).
        best_step: the best step the run's own final state records
            (``state["early_stopping"]["best_step"]``); a copy of another step (left by an
            earlier run under the same name) is ignored with a warning.
    """
    pointer = storage.run_path(*under, BEST)
    try:
        rel = read_pointer(storage, pointer)
    except OSError as err:
        log.warning("cannot read %s (%s); no best checkpoint", storage.url_of(pointer), err)
        return None
    if not rel:
        return None
    folder = storage.run_path(*under, rel)
    try:
        state = load_checkpoint(storage, folder)
    except (CheckpointError, OSError) as err:
        log.warning("best checkpoint %s does not load (%s); using the last checkpoint", storage.url_of(folder), err)
        return None
    step = int(state.get("step", -1))
    if best_step is not None and step != best_step:
        log.warning("%s names step %d but this run's best validation step is %d (a copy from an "
                    "earlier run?); ignoring it", storage.url_of(pointer), step, best_step)
        return None
    score = (state.get("early_stopping") or {}).get("best_score")
    return BestPoint(step, None if score is None else float(score), storage.url_of(folder), state)


class InProcessCheckpoints:
    """Checkpoints of an in-process run (``workers=0``), with the same storage options as Ray's.

    Layout: ``<root>/<name>/local/checkpoint_<step:06d>/`` plus the ``LATEST`` pointer. A save
    writes the folder completely (JSON last, or a rename on a local disk), then moves the
    pointer, then prunes: it keeps the new folder and the previous one (the one resumed from
    or saved before), so a torn newest folder always has an intact one behind it, plus the
    newest ``keep`` (``run.keep_checkpoints``; 0 prunes nothing). The best validation
    checkpoint lives apart (``local/best``, ``local/BEST``) and is never pruned while it is best.
    """

    def __init__(self, storage: RunStorage, keep: int = KEEP_CHECKPOINTS):
        self.storage = storage
        self.root = storage.run_path(IN_PROCESS_DIR)
        self.url = storage.url_of(self.root)
        self._previous: str | None = None
        #: checkpoint folders kept: the newest ``keep`` (and always the new one and the
        #: previous one); 0 keeps every one (``run.keep_checkpoints``)
        self.keep = int(keep)

    def resume_point(self) -> ResumePoint:
        """The newest checkpoint folder that loads (see :func:`newest_loadable`)."""
        point = newest_loadable(self.storage, IN_PROCESS_DIR)
        latest = self._read_latest()
        if point.folder is not None:
            self._previous = point.folder.rpartition("/")[2]
            if latest != self._previous:
                log.info("%s/%s names %s; resuming from %s, the newest checkpoint that loads",
                         self.url, LATEST, latest or "nothing", point.url)
        return point

    def _read_latest(self) -> str | None:
        try:
            return read_pointer(self.storage, f"{self.root}/{LATEST}")
        except OSError as err:
            log.warning("cannot read %s/%s (%s); ignoring it", self.url, LATEST, err)
            return None

    def save(self, step: int, state: Mapping[str, Any], cfg: JobConfig, *, best: bool = False) -> str:
        """Store the state after ``step`` updates; returns the checkpoint's URL.

        With ``best`` (a new best validation score at this step) it is also kept as the run's
        best checkpoint (:func:`write_best`: ``local/best/`` and ``local/BEST``).
        """
        name = checkpoint_dir_name(step)
        dest = f"{self.root}/{name}"
        self.storage.filesystem.create_dir(self.root, recursive=True)
        with tempfile.TemporaryDirectory(prefix="piaa-checkpoint-") as tmp:
            write_checkpoint_folder(tmp, state, cfg)
            _upload_folder(self.storage, Path(tmp), dest)
            if best:
                write_best(self.storage, tmp, step, IN_PROCESS_DIR)
        write_pointer(self.storage, f"{self.root}/{LATEST}", name)
        if self.keep > 0:
            newest = [checkpoint_dir_name(s) for s, _ in stored_checkpoints(self.storage, IN_PROCESS_DIR)]
            self._prune({name, self._previous, *newest[: self.keep]})
        self._previous = name
        return self.storage.url_of(dest)

    def _prune(self, keep: set[str | None]) -> None:
        import pyarrow.fs

        fs = self.storage.filesystem
        for info in fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True)):
            base = info.base_name
            stale_tmp = base.startswith(".checkpoint_") and base.endswith(".tmp")
            if info.type != pyarrow.fs.FileType.Directory:
                continue
            if (_CHECKPOINT_DIR.match(base) and base not in keep) or stale_tmp:
                try:
                    fs.delete_dir(info.path)
                except OSError as err:  # a leftover is harmless: the next save retries
                    log.warning("could not delete old checkpoint %s: %s",
                                self.storage.url_of(info.path), err)


__all__ = [
    "BEST",
    "BEST_DIR",
    "BestPoint",
    "DEFAULT_NAME",
    "IN_PROCESS_DIR",
    "KEEP_CHECKPOINTS",
    "LATEST",
    "InProcessCheckpoints",
    "ResumePoint",
    "RunStorage",
    "StorageNotShared",
    "VISIBILITY_MARKER",
    "absolute_url",
    "checkpoint_dir_name",
    "load_checkpoint",
    "model_from_state",
    "newest_loadable",
    "read_best",
    "read_pointer",
    "stored_checkpoints",
    "write_best",
    "write_checkpoint_folder",
    "write_pointer",
]
