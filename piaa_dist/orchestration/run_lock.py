"""One run per output: a lock on a run's ``--out`` folder and its checkpoint storage.

Two ``train`` runs on the same output would prune each other's checkpoints and interleave their
metrics; the second one is refused instead, with a message naming the holder (host, pid, and
since when). A lock left behind by a process that died (``kill -9``, a lost node) is taken over
with a warning, when that can be verified:

* a local folder holds ``.piaa-dist.lock``: an exclusive ``flock`` held for the run's lifetime
  (the kernel drops it when the process dies, however it dies) plus a JSON record of the holder
  for the message. A record whose ``flock`` is free belongs to a dead process if it was written
  on this host; a record from another host is not taken over (its process cannot be checked
  from here): the message says which file to delete once that run is known to be gone.
* S3 storage holds the object ``<root>/<name>/.piaa-dist.lock``, created with a conditional
  ``PutObject`` (``If-None-Match: *``), so only one of two racing runs gets it. It is taken over
  when its holder is a process of this host that no longer exists.

Locks are re-entrant for the thread that holds them (``train`` holds the output for the whole
command and :func:`~piaa_dist.orchestration.ray_train.run_distributed` holds it again), and
released (the file or object deleted) when the outermost holder exits. No Ray here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from piaa_dist.errors import StorageError, UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".piaa-dist.lock"


class RunLocked(UserError):
    """The output or checkpoint storage is held by another run (names the holder)."""


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: written into the lock so a refused run can say who is in the way."""

    host: str
    pid: int
    started: str
    command: str = ""

    @classmethod
    def me(cls) -> LockHolder:
        """This process, now."""
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), started, " ".join(sys.argv)[:300])

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder recorded in a lock's text; None when the text is not a holder record."""
        try:
            doc = json.loads(text)
            return cls(str(doc["host"]), int(doc["pid"]), str(doc["started"]), str(doc.get("command", "")))
        except (ValueError, TypeError, KeyError):
            return None

    def to_json(self) -> str:
        """The record as JSON text."""
        return json.dumps(dataclasses.asdict(self))

    def describe(self) -> str:
        """``host H, pid P, since T`` for messages."""
        return f"host {self.host}, pid {self.pid}, since {self.started}"

    def is_dead_here(self) -> bool:
        """True when this holder was a process of this host that no longer exists."""
        return self.host == socket.gethostname() and not pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Local folders: flock + holder record


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _holder_of(path: Path) -> LockHolder | None:
    """The live holder's record (it is written right after the flock is taken: wait a little)."""
    for _ in range(20):
        holder = LockHolder.parse(_read_text(path))
        if holder is not None:
            return holder
        time.sleep(0.05)
    return None


def _acquire_local(path: Path, what: str, me: LockHolder) -> Callable[[], None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder_of(path)
            who = holder.describe() if holder else "a process that has not recorded itself yet"
            raise RunLocked(
                f"{what} is in use by another run ({who}; lock {path}); wait for it to finish "
                "or choose another output"
            ) from None
        try:
            # A holder that was releasing may have unlinked the file we opened: lock the
            # file that is at `path` now, or two runs could each hold a different inode.
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                os.close(fd)
                continue
        except FileNotFoundError:
            os.close(fd)
            continue
        text = os.pread(fd, 1 << 16, 0).decode(errors="replace")
        if text.strip():
            previous = LockHolder.parse(text)
            if previous is not None and previous.host != me.host:
                os.close(fd)
                raise RunLocked(
                    f"{what} is locked by a run on another host ({previous.describe()}; lock "
                    f"{path}); its process cannot be checked from here. If that run has ended, "
                    f"delete {path} and start again"
                )
            log.warning(
                "%s: taking over the lock %s left by %s, which is no longer running",
                what, path, previous.describe() if previous else "an unreadable record",
            )
        data = me.to_json().encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

        def release(fd: int = fd) -> None:
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)  # while still locked: nobody can take a half-released lock
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)  # drops the flock

        return release
    raise RunLocked(f"{what}: could not take the lock {path} (it kept changing); try again")


# ---------------------------------------------------------------------------------------------
# S3: a conditionally created object


def _acquire_s3(storage: Any, what: str, me: LockHolder) -> Callable[[], None]:
    from botocore.exceptions import BotoCoreError, ClientError

    from piaa_dist.storage import open_store

    store = open_store(storage.url, storage.endpoint_url)
    client, bucket = store.client, store.bucket
    key = "/".join(p for p in (store.prefix, storage.name, LOCK_FILE) if p)
    url = f"s3://{bucket}/{key}"
    data = me.to_json().encode()

    def code_of(err: ClientError) -> str:
        return str(err.response.get("Error", {}).get("Code", ""))

    for _ in range(3):
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            break
        except ClientError as err:
            if code_of(err) not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise StorageError(f"cannot create the run lock {url}: {code_of(err) or err}") from None
        except BotoCoreError as err:
            raise StorageError(f"cannot create the run lock {url}: {err}") from None
        try:
            text = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode(errors="replace")
        except ClientError as err:
            if code_of(err) in ("NoSuchKey", "404"):
                continue  # released meanwhile: try again
            raise StorageError(f"cannot read the run lock {url}: {code_of(err) or err}") from None
        holder = LockHolder.parse(text)
        if holder is not None and holder.is_dead_here():
            log.warning("%s: taking over the lock %s left by %s, which is no longer running",
                        what, url, holder.describe())
            client.delete_object(Bucket=bucket, Key=key)
            continue
        who = holder.describe() if holder else "an unreadable record"
        hint = "" if holder is None or holder.host == me.host else (
            f"; if that run has ended, delete {url}"
        )
        raise RunLocked(f"{what} is in use by another run ({who}; lock {url}){hint}")
    else:
        raise RunLocked(f"{what}: could not take the lock {url} (it kept changing); try again")

    def release() -> None:
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            if body == data:  # never delete a lock someone took over meanwhile
                client.delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as err:
            log.warning("could not release the run lock %s: %s", url, err)

    return release


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Held:
    thread: int
    count: int
    release: Callable[[], None]


_HELD: dict[str, _Held] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def _hold(key: str, acquire: Callable[[], Callable[[], None]], what: str) -> Iterator[None]:
    me = threading.get_ident()
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None:
            if held.thread != me:
                raise RunLocked(f"{what} is in use by another thread of this process (pid {os.getpid()})")
            held.count += 1
    if held is None:
        release = acquire()
        with _HELD_LOCK:
            _HELD[key] = held = _Held(me, 1, release)
    try:
        yield
    finally:
        with _HELD_LOCK:
            held.count -= 1
            last = held.count == 0
            if last:
                del _HELD[key]
        if last:
            held.release()


def _inside(path: str, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


@contextlib.contextmanager
def hold_run(out_dir: str | Path, storage: Any | None = None) -> Iterator[None]:
    """Hold a run's output folder (and its checkpoint storage) for the duration of the block.

    Args:
        out_dir: the run's ``--out`` folder (created if needed).
        storage: the run's :class:`~piaa_dist.orchestration.checkpoint_store.RunStorage`; its
            run folder is locked too unless it lies inside ``out_dir`` (then the folder's lock
            covers it).

    Raises:
        RunLocked: a live run holds either (names host, pid and start time).
    """
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    me = LockHolder.me()
    lock = out / LOCK_FILE
    with contextlib.ExitStack() as stack:
        stack.enter_context(_hold(str(lock), lambda: _acquire_local(lock, str(out), me), str(out)))
        if storage is not None:
            run = storage.run_path()
            what = storage.url_of(run)
            if storage.is_local and not _inside(run, out):
                path = Path(run) / LOCK_FILE
                stack.enter_context(_hold(str(path), lambda: _acquire_local(path, what, me), what))
            elif not storage.is_local:
                key = f"{what}/{LOCK_FILE}"
                stack.enter_context(_hold(key, lambda: _acquire_s3(storage, what, me), what))
        yield


__all__ = ["LOCK_FILE", "LockHolder", "RunLocked", "hold_run", "pid_alive"]
