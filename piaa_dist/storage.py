"""One storage root, a local folder or ``s3://bucket/prefix``, behind one small interface.

What a :class:`Store` offers and why:

* ``read_bytes`` / ``read_range``: whole objects (manifests, pointers) and byte ranges (one
  user inside a packed shard: a worker reads exactly one user with one ranged GET).
* ``write_bytes`` and ``open_writer``: every write is atomic for readers (a local temporary
  file renamed into place; one S3 PUT, or a multipart upload that only becomes visible when
  completed), so a crash never leaves a half-written object that looks whole. ``open_writer``
  streams: it holds at most one part (``part_size`` bytes) in memory, so a shard of hundreds
  of MB never sits in memory whole.
* ``list`` / ``list_dirs`` / ``delete`` / ``size`` / ``sub``: what dataset versions need
  (list the versions, remove one on explicit request, check object sizes).
* ``check``: find a missing bucket, missing credentials or an unreachable endpoint at the
  start of a job, before any expensive work.

S3 robustness. botocore's ``standard`` retry mode retries failed *requests* (throttling, 5xx,
connection errors), but a response body that breaks or stalls while being read surfaces
later, in ``Body.read()``, outside botocore's loop; :class:`S3Store` therefore retries whole
operations itself with exponential backoff. Every attempt is bounded by the connect and read
timeouts, and retrying stops once ``retry_seconds`` have passed since the operation began, so
a stalled endpoint costs a bounded, configurable time and then a :class:`StorageError` naming
the URL. The limits come from the constructor or from the environment:

================================  =======  ===========================================
variable                          default  meaning
================================  =======  ===========================================
``PIAA_S3_CONNECT_TIMEOUT``       10       seconds to establish a connection
``PIAA_S3_READ_TIMEOUT``          60       seconds without a byte before a read fails
``PIAA_S3_RETRY_SECONDS``         120      total time spent retrying one operation
``PIAA_S3_ATTEMPTS``              5        attempts per request (botocore) and per operation
================================  =======  ===========================================

Missing credentials, an unreachable endpoint and a missing bucket each give one actionable
line (what to set, or ``piaa-dist s3-local``) instead of botocore's terse messages.

Stores are picklable (the boto3 client is dropped and rebuilt lazily), so a
:class:`piaa_dist.data.stream.Dataset` or an ingest partition can travel to Ray workers.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import urlparse

from piaa_dist.errors import StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts per S3 request (botocore) and per operation (ours).
DEFAULT_ATTEMPTS = 5
#: Multipart part size of streamed S3 uploads (S3 needs >= 5 MiB for all but the last part).
DEFAULT_PART_SIZE = 8 * 1024 * 1024
_MIN_PART_SIZE = 5 * 1024 * 1024

#: What to do about missing or wrong S3 settings (appended to those errors).
S3_SETUP_HINT = (
    "set AWS_ENDPOINT_URL (for a non-AWS endpoint), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "or run `piaa-dist s3-local` and apply the exports it prints"
)


class ObjectNotFound(StorageError):
    """The object (or its bucket) does not exist (a permanent error: never retried)."""


class ShortObject(StorageError):
    """The object is shorter than the byte range asked for (permanent: never retried)."""


@dataclass(frozen=True)
class S3Options:
    """Timeouts and retry limits of an :class:`S3Store` (see the module doc).

    Attributes:
        attempts: attempts per request (botocore) and per operation (ours).
        connect_timeout: seconds to establish a connection.
        read_timeout: seconds without receiving a byte before a read fails.
        retry_seconds: total seconds one operation may spend retrying; once passed, the
            last error is raised (each attempt is still bounded by the timeouts).
        backoff: base delay in seconds of our retries (doubles each attempt, with jitter).
        part_size: part size of streamed uploads (at least 5 MiB).
    """

    attempts: int = DEFAULT_ATTEMPTS
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retry_seconds: float = 120.0
    backoff: float = 0.2
    part_size: int = DEFAULT_PART_SIZE

    _ENV = {
        "attempts": "PIAA_S3_ATTEMPTS",
        "connect_timeout": "PIAA_S3_CONNECT_TIMEOUT",
        "read_timeout": "PIAA_S3_READ_TIMEOUT",
        "retry_seconds": "PIAA_S3_RETRY_SECONDS",
    }

    @classmethod
    def from_env(cls, **overrides: Any) -> "S3Options":
        """Defaults, then ``PIAA_S3_*`` variables, then non-None ``overrides``.

        Raises:
            StorageError: a variable or override is not a positive number (names it).
        """
        values: dict[str, Any] = {}
        for name, var in cls._ENV.items():
            raw = os.environ.get(var, "").strip()
            if raw:
                values[name] = _positive(raw, var, int if name == "attempts" else float)
        for name, value in overrides.items():
            if value is not None:
                kind = int if name in ("attempts", "part_size") else float
                values[name] = _positive(value, name, kind)
        opts = replace(cls(), **values)
        if opts.part_size < _MIN_PART_SIZE:
            raise StorageError(f"part_size must be at least {_MIN_PART_SIZE} bytes (S3's minimum), "
                               f"got {opts.part_size}")
        return opts


def _positive(raw: Any, what: str, kind: type) -> Any:
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise StorageError(f"{what} must be a positive number, got {raw!r}") from None
    if not value > 0:
        raise StorageError(f"{what} must be a positive number, got {raw!r}")
    return value


class ObjectWriter:
    """A streamed, atomic write of one object: ``write`` pieces, then ``commit`` (or ``abort``).

    Nothing is visible to readers before :meth:`commit`. As a context manager it commits on
    success and aborts on an exception.
    """

    #: Bytes written so far (the offset the next ``write`` starts at).
    size: int = 0

    def write(self, data: bytes) -> None:
        """Append ``data`` to the object."""
        raise NotImplementedError

    def commit(self) -> None:
        """Make the object visible under its name (replacing any previous one)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop everything written; the name is left as it was. Safe to call twice."""
        raise NotImplementedError

    def __enter__(self) -> "ObjectWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Store:
    """A storage root. Paths passed to methods are relative to :attr:`url`, with ``/``."""

    url: str

    def read_bytes(self, rel: str) -> bytes:
        """Return the object's bytes.

        Raises:
            ObjectNotFound: the object does not exist (names the full URL).
            StorageError: it cannot be read after retries (names the full URL).
        """
        raise NotImplementedError

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of the object starting at ``offset`` (one ranged GET on S3).

        Raises:
            ObjectNotFound: the object does not exist.
            ShortObject: the object ends before ``offset + length``.
            StorageError: it cannot be read after retries (names the full URL).
        """
        raise NotImplementedError

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write (or replace) the object; readers never see a partial object."""
        raise NotImplementedError

    def open_writer(self, rel: str) -> ObjectWriter:
        """A streamed, atomic writer of the object (see :class:`ObjectWriter`)."""
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        """Whether the object exists."""
        raise NotImplementedError

    def size(self, rel: str) -> int:
        """Size of the object in bytes.

        Raises:
            ObjectNotFound: the object does not exist.
        """
        raise NotImplementedError

    def url_of(self, rel: str) -> str:
        """Full URL (or path) of a relative path, for messages and manifests."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Sorted relative paths of the objects under ``prefix`` (recursively)."""
        raise NotImplementedError

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Sorted names of the immediate "folders" under ``prefix`` (not recursive)."""
        raise NotImplementedError

    def delete(self, rels: Iterable[str]) -> int:
        """Delete objects (missing ones are ignored); returns how many were asked for."""
        raise NotImplementedError

    def sub(self, rel: str) -> "Store":
        """A store rooted at ``rel`` under this one (same endpoint and settings)."""
        raise NotImplementedError

    def check(self) -> None:
        """Fail early, with an actionable message, if the root cannot be used at all.

        Raises:
            StorageError: no such bucket, no credentials, endpoint unreachable, access denied,
                or a local path that is not a folder.
        """
        raise NotImplementedError


def _clean_rel(rel: str) -> str:
    rel = rel.replace("\\", "/").lstrip("/")
    if any(part == ".." for part in rel.split("/")):
        raise StorageError(f"refusing a path that leaves the store root: {rel!r}")
    return rel


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


# ---------------------------------------------------------------------------------------------
# local folders


class _LocalWriter(ObjectWriter):
    def __init__(self, path: Path):
        self.path = path
        self.size = 0
        self._done = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as err:
            raise StorageError(f"cannot write {path}: {err.strerror or err}") from None
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as err:
            self.abort()
            raise StorageError(f"cannot write {self.path}: {err.strerror or err}") from None
        self.size += len(data)

    def commit(self) -> None:
        if self._done:
            return
        try:
            self._file.close()
            os.replace(self._tmp, self.path)
        except OSError as err:
            self.abort()
            raise StorageError(f"cannot write {self.path}: {err.strerror or err}") from None
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)


class LocalStore(Store):
    """A local folder."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    def _path(self, rel: str) -> Path:
        return self.root / _clean_rel(rel)

    def url_of(self, rel: str) -> str:
        return str(self._path(rel))

    def read_bytes(self, rel: str) -> bytes:
        path = self._path(rel)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"not found: {path}") from None
        except OSError as err:
            raise StorageError(f"cannot read {path}: {err.strerror or err}") from None

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        path = self._path(rel)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(f"not found: {path}") from None
        except OSError as err:
            raise StorageError(f"cannot read {path}: {err.strerror or err}") from None
        if len(data) != length:
            raise ShortObject(f"{path} ends before byte {offset + length} (read {len(data)} of {length} "
                              f"bytes at offset {offset})")
        return data

    def open_writer(self, rel: str) -> ObjectWriter:
        return _LocalWriter(self._path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        # Write to a temporary file and rename, so a crash never leaves a half-written
        # object that a later reader would take for a corrupt one.
        with self.open_writer(rel) as w:
            w.write(data)

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def size(self, rel: str) -> int:
        path = self._path(rel)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"not found: {path}") from None
        except OSError as err:
            raise StorageError(f"cannot stat {path}: {err.strerror or err}") from None

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [_clean_rel(prefix)]
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.endswith(".tmp"):
                out.append(p.relative_to(self.root).as_posix())
        return sorted(out)

    def list_dirs(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def delete(self, rels: Iterable[str]) -> int:
        n = 0
        parents: set[Path] = set()
        for rel in rels:
            path = self._path(rel)
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                raise StorageError(f"cannot delete {path}: {err.strerror or err}") from None
            parents.add(path.parent)
            n += 1
        # Remove folders the deletion emptied (deepest first), never the root itself.
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            p = parent
            while p != self.root and self.root in p.parents:
                try:
                    p.rmdir()
                except OSError:
                    break
                p = p.parent
        return n

    def sub(self, rel: str) -> "LocalStore":
        return LocalStore(self._path(rel))

    def check(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.root} exists and is not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create {self.root}: {err.strerror or err}") from None
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"cannot write to {self.root}: permission denied")


# ---------------------------------------------------------------------------------------------
# S3


class _S3Writer(ObjectWriter):
    """Small objects: one PUT at commit. Large ones: a multipart upload, one part at a time."""

    def __init__(self, store: "S3Store", rel: str):
        self.store, self.rel = store, rel
        self.key, self.url = store._key(rel), store.url_of(rel)
        self.size = 0
        self._buf: list[bytes] = []
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._done = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._buf.append(bytes(data))
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered >= self.store.options.part_size:
            self._flush_part()

    def _flush_part(self) -> None:
        body = b"".join(self._buf)
        self._buf, self._buffered = [], 0
        client, bucket = self.store.client, self.store.bucket
        try:
            if self._upload_id is None:
                resp = self.store._call("write", self.url, lambda: client.create_multipart_upload(
                    Bucket=bucket, Key=self.key))
                self._upload_id = resp["UploadId"]
            number = len(self._parts) + 1
            resp = self.store._call("write", self.url, lambda: client.upload_part(
                Bucket=bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=body))
            self._parts.append({"ETag": resp["ETag"], "PartNumber": number})
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        if self._done:
            return
        client, bucket = self.store.client, self.store.bucket
        try:
            if self._upload_id is None:
                body = b"".join(self._buf)
                self.store._call("write", self.url, lambda: client.put_object(Bucket=bucket, Key=self.key, Body=body))
            else:
                if self._buf:
                    self._flush_part()
                upload_id, parts = self._upload_id, self._parts
                self.store._call("write", self.url, lambda: client.complete_multipart_upload(
                    Bucket=bucket, Key=self.key, UploadId=upload_id, MultipartUpload={"Parts": parts}))
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._buf = []

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buf = []
        if self._upload_id is not None:
            try:
                self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key,
                                                         UploadId=self._upload_id)
            except Exception as err:  # noqa: BLE001 - best effort; the upload was never visible
                log.warning("could not abort the multipart upload of %s: %s", self.url, err)


class S3Store(Store):
    """``s3://bucket/prefix`` through boto3, with bounded timeouts and retries.

    Args:
        url: ``s3://bucket`` or ``s3://bucket/prefix``.
        endpoint_url: S3 endpoint; ``None`` means ``$AWS_ENDPOINT_URL``, then the AWS default.
        attempts, backoff, connect_timeout, read_timeout, retry_seconds, part_size: see
            :class:`S3Options`; ``None`` takes the ``PIAA_S3_*`` variable, then the default.
        options: a complete :class:`S3Options` instead of the single settings.
    """

    def __init__(
        self,
        url: str,
        endpoint_url: str | None = None,
        *,
        attempts: int | None = None,
        backoff: float | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        retry_seconds: float | None = None,
        part_size: int | None = None,
        options: S3Options | None = None,
    ):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"not an S3 URL (expected s3://bucket/prefix): {url!r}")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        if options is None:
            options = S3Options.from_env(attempts=attempts, backoff=backoff, connect_timeout=connect_timeout,
                                         read_timeout=read_timeout, retry_seconds=retry_seconds,
                                         part_size=part_size)
        self.options = options
        self._client: Any = None
        self._lock = threading.Lock()

    # ``attempts`` and ``backoff`` stay assignable attributes (tests shorten the backoff).
    @property
    def attempts(self) -> int:
        return self.options.attempts

    @attempts.setter
    def attempts(self, value: int) -> None:
        self.options = replace(self.options, attempts=max(1, int(value)))

    @property
    def backoff(self) -> float:
        return self.options.backoff

    @backoff.setter
    def backoff(self, value: float) -> None:
        self.options = replace(self.options, backoff=float(value))

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self.endpoint_url!r})"

    # boto3 clients cannot be pickled; rebuild lazily on the other side.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use; thread-safe to share)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    o = self.options
                    config = Config(
                        retries={"mode": "standard", "total_max_attempts": o.attempts},
                        connect_timeout=o.connect_timeout,
                        read_timeout=o.read_timeout,
                        max_pool_connections=32,
                    )
                    # A private session: boto3's default session is not thread-safe.
                    session = boto3.session.Session()
                    self._client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    def _key(self, rel: str) -> str:
        rel = _clean_rel(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def url_of(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self._key(rel)}"

    def _where(self) -> str:
        return f" (endpoint {self.endpoint_url})" if self.endpoint_url else " (AWS default endpoint)"

    def _error(self, action: str, url: str, err: BaseException) -> StorageError:
        """One actionable line for an error botocore raised (no retry decision here)."""
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        where = self._where()
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(f"no S3 credentials to {action} {url}{where}: {S3_SETUP_HINT}")
        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") and action != "check":
                return ObjectNotFound(f"not found: {url}{where}")
            if code == "NoSuchBucket" or (action == "check" and status == 404):
                return ObjectNotFound(f"no such bucket: s3://{self.bucket}{where} ({action} {url}); "
                                      f"create it first (e.g. `aws s3 mb s3://{self.bucket}`)")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
                return StorageError(f"S3 refused to {action} {url}{where}: {code}; check the credentials "
                                    f"(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the bucket's permissions")
            if code == "InvalidRange":
                return ShortObject(f"{url}{where}: the requested byte range lies beyond the end of the object")
            return StorageError(f"cannot {action} {url}{where}: {code or err}")
        if isinstance(err, (EndpointConnectionError, ConnectTimeoutError)):
            return StorageError(f"cannot reach the S3 endpoint to {action} {url}{where}: {err}; is it running? "
                                f"{S3_SETUP_HINT}")
        if isinstance(err, ReadTimeoutError):
            return StorageError(f"timed out to {action} {url}{where}: no data for "
                                f"{self.options.read_timeout:g}s (PIAA_S3_READ_TIMEOUT)")
        return StorageError(f"cannot {action} {url}{where}: {err}")

    def _call(self, action: str, url: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with our retries: bounded by attempts and by ``retry_seconds`` in total.

        Errors that retrying cannot fix (missing object or bucket, credentials, access, an
        S3 error response botocore already retried) are raised at once.
        """
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            ParamValidationError,
            PartialCredentialsError,
        )

        start = time.monotonic()
        last: BaseException | None = None
        attempt = 0
        while True:
            try:
                return fn()
            except ClientError as err:
                raise self._error(action, url, err) from None
            except (NoCredentialsError, PartialCredentialsError, ParamValidationError) as err:
                raise self._error(action, url, err) from None
            except (BotoCoreError, OSError) as err:  # connection errors, timeouts, broken bodies
                last = err
            attempt += 1
            elapsed = time.monotonic() - start
            delay = self.options.backoff * (2 ** (attempt - 1)) * (1.0 + random.random() * 0.25)
            if attempt >= self.options.attempts or elapsed + delay > self.options.retry_seconds:
                break
            log.warning("%s %s failed (%s); retry %d/%d in %.2fs", action, url, last, attempt,
                        self.options.attempts - 1, delay)
            time.sleep(delay)
        base = self._error(action, url, last)
        raise type(base)(f"{base} (gave up after {attempt} attempt{'s' if attempt != 1 else ''} in "
                         f"{time.monotonic() - start:.1f}s; "
                         f"limits: PIAA_S3_ATTEMPTS={self.options.attempts}, "
                         f"PIAA_S3_RETRY_SECONDS={self.options.retry_seconds:g})")

    def _get(self, rel: str, offset: int | None = None, length: int | None = None) -> bytes:
        url = self.url_of(rel)
        key = self._key(rel)

        def once() -> bytes:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
            if offset is not None:
                kwargs["Range"] = f"bytes={offset}-{offset + length - 1}"
            resp = self.client.get_object(**kwargs)
            if offset is not None:
                total = str(resp.get("ContentRange", "")).rsplit("/", 1)[-1]
                if total.isdigit() and int(total) < offset + length:
                    resp["Body"].close()
                    raise ShortObject(f"{url}{self._where()} has {total} bytes, ends before byte {offset + length}")
            body = resp["Body"]
            try:
                data = body.read()
            finally:
                body.close()
            expected = resp.get("ContentLength")
            if expected is not None and len(data) != expected:
                raise IOError(f"short read: got {len(data)} of {expected} bytes")
            if length is not None and len(data) != length:
                raise ShortObject(f"{url}{self._where()}: got {len(data)} of the {length} bytes at offset {offset}")
            return data

        return self._call("read", url, once)

    def read_bytes(self, rel: str) -> bytes:
        return self._get(rel)

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return self._get(rel, int(offset), int(length))

    def open_writer(self, rel: str) -> ObjectWriter:
        return _S3Writer(self, rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        url, key = self.url_of(rel), self._key(rel)
        # put_object sends the body from memory, so a retry resends it whole.
        self._call("write", url, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data))

    def _head(self, rel: str) -> dict[str, Any]:
        return self._call("stat", self.url_of(rel), lambda: self.client.head_object(Bucket=self.bucket,
                                                                                      Key=self._key(rel)))

    def exists(self, rel: str) -> bool:
        try:
            self._head(rel)
            return True
        except ObjectNotFound as err:
            if "no such bucket" in str(err):
                raise
            return False

    def size(self, rel: str) -> int:
        return int(self._head(rel)["ContentLength"])

    def _paginate(self, action: str, **kwargs: Any) -> list[dict[str, Any]]:
        url = f"s3://{self.bucket}/{kwargs.get('Prefix', '')}"

        def once() -> list[dict[str, Any]]:
            return list(self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, **kwargs))

        return self._call(action, url, once)

    def _list_prefix(self, prefix: str) -> str:
        if prefix:
            key = self._key(prefix)
            return key if key.endswith("/") else key + "/"
        return f"{self.prefix}/" if self.prefix else ""

    def list(self, prefix: str = "") -> list[str]:
        key_prefix = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
        for page in self._paginate("list", Prefix=key_prefix):
            out.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(out)

    def list_dirs(self, prefix: str = "") -> list[str]:
        key_prefix = self._list_prefix(prefix)
        out: list[str] = []
        for page in self._paginate("list", Prefix=key_prefix, Delimiter="/"):
            out.extend(p["Prefix"][len(key_prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(out)

    def delete(self, rels: Iterable[str]) -> int:
        keys = [self._key(r) for r in rels]
        for i in range(0, len(keys), 1000):  # S3's limit per DeleteObjects request
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            resp = self._call("delete", self.url, lambda batch=batch: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))
            errors = resp.get("Errors") or []
            if errors:
                e = errors[0]
                raise StorageError(f"cannot delete s3://{self.bucket}/{e.get('Key')}{self._where()}: "
                                   f"{e.get('Code')} {e.get('Message', '')}".rstrip())
        return len(keys)

    def sub(self, rel: str) -> "S3Store":
        return S3Store(f"s3://{self.bucket}/{_join(self.prefix, _clean_rel(rel))}", self.endpoint_url,
                       options=self.options)

    def check(self) -> None:
        self._call("check", f"s3://{self.bucket}", lambda: self.client.head_bucket(Bucket=self.bucket))


def open_store(url: str, endpoint_url: str | None = None, **s3_options: Any) -> Store:
    """Open a storage root.

    Args:
        url: a local folder (plain path or ``file://``) or ``s3://bucket/prefix``.
        endpoint_url: S3 endpoint; ``None``/empty means ``$AWS_ENDPOINT_URL``, then AWS.
        **s3_options: :class:`S3Options` fields for an S3 root (ignored for a folder).

    Raises:
        StorageError: an unsupported URL scheme, or bad S3 options.
    """
    if not url:
        raise StorageError("empty storage URL: give a local folder or s3://bucket/prefix")
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        known = {f.name for f in fields(S3Options)}
        unknown = sorted(set(s3_options) - known)
        if unknown:
            raise TypeError(f"unknown S3 option(s) {unknown}; known: {sorted(known)}")
        return S3Store(url, endpoint_url or None, **s3_options)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # (a one-letter scheme is a Windows drive)
        raise StorageError(f"unsupported storage URL {url!r}: use a local folder or s3://bucket/prefix")
    return LocalStore(url)
