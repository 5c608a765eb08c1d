"""One storage root, a local folder or ``s3://bucket/prefix``, behind one small interface.

Why our own retry on top of botocore's: botocore's ``standard`` retry mode retries failed
*requests* (throttling, 5xx, connection errors), but a response body that breaks while being
read (truncated stream, reset connection) surfaces later, in ``Body.read()``, outside
botocore's retry loop. :meth:`S3Store.read_bytes` therefore retries the whole GET with
exponential backoff.

Stores are picklable (the boto3 client is dropped and rebuilt lazily), so a
:class:`piaa_dist.data.stream.Dataset` can travel to Ray workers.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from piaa_dist.errors import StorageError

log = logging.getLogger(__name__)

#: Attempts per S3 request (botocore) and per body read (ours).
DEFAULT_ATTEMPTS = 5


class ObjectNotFound(StorageError):
    """The object does not exist (a permanent error: never retried)."""


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

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write (or replace) the object; readers never see a partial object."""
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        """Whether the object exists."""
        raise NotImplementedError

    def url_of(self, rel: str) -> str:
        """Full URL (or path) of a relative path, for messages and manifests."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Sorted relative paths of the objects under ``prefix`` (recursively)."""
        raise NotImplementedError


def _clean_rel(rel: str) -> str:
    rel = rel.replace("\\", "/").lstrip("/")
    if any(part == ".." for part in rel.split("/")):
        raise StorageError(f"refusing a path that leaves the store root: {rel!r}")
    return rel


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

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write to a temporary file and rename, so a crash never leaves a half-written
            # shard that a later reader would take for a corrupt one.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as err:
            raise StorageError(f"cannot write {path}: {err.strerror or err}") from None

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

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


class S3Store(Store):
    """``s3://bucket/prefix`` through boto3, with retries.

    Args:
        url: ``s3://bucket`` or ``s3://bucket/prefix``.
        endpoint_url: S3 endpoint; ``None`` means ``$AWS_ENDPOINT_URL``, then the AWS default.
        attempts: attempts per request (botocore standard mode) and per body read.
        backoff: base delay in seconds of our body-read retry (doubles each attempt).
    """

    def __init__(
        self,
        url: str,
        endpoint_url: str | None = None,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: float = 0.2,
    ):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"not an S3 URL (expected s3://bucket/prefix): {url!r}")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.attempts = max(1, int(attempts))
        self.backoff = backoff
        self._client: Any = None
        self._lock = threading.Lock()

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

                    config = Config(
                        retries={"mode": "standard", "max_attempts": self.attempts},
                        connect_timeout=10,
                        read_timeout=60,
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
        return f" (endpoint {self.endpoint_url})" if self.endpoint_url else ""

    def read_bytes(self, rel: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        url = self.url_of(rel)
        last: Exception | None = None
        for attempt in range(self.attempts):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
                body = resp["Body"]
                try:
                    data = body.read()
                finally:
                    body.close()
                expected = resp.get("ContentLength")
                if expected is not None and len(data) != expected:
                    raise IOError(f"short read: got {len(data)} of {expected} bytes")
                return data
            except ClientError as err:
                code = err.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise ObjectNotFound(f"not found: {url}{self._where()}") from None
                if code == "NoSuchBucket":
                    raise ObjectNotFound(f"no such bucket: s3://{self.bucket}{self._where()} (reading {url})") from None
                # botocore has already retried transient request errors; the rest are final.
                raise StorageError(f"cannot read {url}{self._where()}: {code or err}") from None
            except (BotoCoreError, IOError, OSError) as err:
                # Errors while streaming the body, or connection errors botocore gave up on.
                last = err
                if attempt + 1 < self.attempts:
                    delay = self.backoff * (2**attempt) * (1.0 + random.random() * 0.25)
                    log.warning("reading %s failed (%s); retry %d/%d in %.2fs", url, err, attempt + 1,
                                self.attempts - 1, delay)
                    time.sleep(delay)
        raise StorageError(f"cannot read {url}{self._where()} after {self.attempts} attempts: {last}")

    def write_bytes(self, rel: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        url = self.url_of(rel)
        try:
            # put_object sends the body from memory; botocore retries it whole on failure.
            self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            raise StorageError(f"cannot write {url}{self._where()}: {code or err}") from None
        except BotoCoreError as err:
            raise StorageError(f"cannot write {url}{self._where()}: {err}") from None

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        url = self.url_of(rel)
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"cannot stat {url}{self._where()}: {code or err}") from None
        except BotoCoreError as err:
            raise StorageError(f"cannot stat {url}{self._where()}: {err}") from None

    def list(self, prefix: str = "") -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        key_prefix = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key_prefix)
            for page in pages:
                out.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            raise StorageError(f"cannot list s3://{self.bucket}/{key_prefix}{self._where()}: {code or err}") from None
        except BotoCoreError as err:
            raise StorageError(f"cannot list s3://{self.bucket}/{key_prefix}{self._where()}: {err}") from None
        return sorted(out)


def open_store(url: str, endpoint_url: str | None = None) -> Store:
    """Open a storage root.

    Args:
        url: a local folder (plain path or ``file://``) or ``s3://bucket/prefix``.
        endpoint_url: S3 endpoint; ``None``/empty means ``$AWS_ENDPOINT_URL``, then AWS.

    Raises:
        StorageError: an unsupported URL scheme.
    """
    if not url:
        raise StorageError("empty storage URL: give a local folder or s3://bucket/prefix")
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return S3Store(url, endpoint_url or None)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # (a one-letter scheme is a Windows drive)
        raise StorageError(f"unsupported storage URL {url!r}: use a local folder or s3://bucket/prefix")
    return LocalStore(url)
