"""Where ingestion finds images, which image paths it refuses, and how it re-encodes them.

An :class:`ImageSource` is a local folder or an ``s3://bucket/prefix``. Image paths come
from rating files, which we do not control, so a path is refused (skip reason
``outside_image_folder``, counted, never read) when it is absolute, contains a ``..``
component, or (local folders) resolves through a symlink to somewhere outside the folder.

Memory: a decoded image costs ~3 bytes per pixel however small its file is (a 97 KB PNG of
10000x10000 pixels decodes to 300 MB), so :func:`process_image` reads the pixel size from the
header and refuses images above ``max_pixels`` (:class:`TooManyPixels`, skip reason
``too_many_pixels``) before decoding. JPEGs are decoded at a reduced scale when that still
covers ``max_side`` (libjpeg's draft mode), which also bounds their decode buffers.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from PIL import Image, ImageOps

from piaa_dist.errors import DataError
from piaa_dist.storage import ObjectNotFound, Store, open_store

#: Default pixel limit (width x height) of an input image: a 40-megapixel photo decodes to
#: ~120 MB; larger images are skipped (``too_many_pixels``) rather than decoded.
DEFAULT_MAX_PIXELS = 40_000_000


class TooManyPixels(ValueError):
    """The image has more pixels than the limit (not decoded)."""


class MissingImage(FileNotFoundError):
    """The image does not exist (an object store answered 404)."""


def unsafe_reason(name: str) -> str | None:
    """Why an image path from a ratings file must not be used, or ``None`` if it may be.

    Paths are relative to the image folder, with ``/`` as separator. Refused: empty names,
    absolute paths (``/x``, ``\\x``, ``C:x``), any ``..`` component, NUL bytes.
    """
    if not name:
        return "empty image path"
    if "\0" in name:
        return "NUL byte in the image path"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return "absolute image path"
    if any(part == ".." for part in PurePosixPath(norm).parts):
        return "image path with '..'"
    return None


class ImageSource:
    """A folder or ``s3://`` prefix that ratings files name images relative to. Picklable.

    Args:
        root: local folder or ``s3://bucket/prefix``.
        endpoint_url: S3 endpoint for an ``s3://`` root.
    """

    def __init__(self, root: str | os.PathLike[str], endpoint_url: str | None = None):
        root = str(root)
        self.is_s3 = urlparse(root).scheme == "s3"
        self.endpoint_url = endpoint_url
        if self.is_s3:
            self._store: Store | None = open_store(root, endpoint_url)
            self.url = self._store.url
            self._real = ""
        else:
            path = Path(root).expanduser()
            if not path.is_dir():
                raise DataError(f"image folder does not exist: {path}")
            self._store = None
            self._real = os.path.realpath(path)
            self.url = str(path)

    def __repr__(self) -> str:
        return f"ImageSource({self.url!r})"

    def display(self, name: str) -> str:
        """Where an image is, for messages."""
        if self._store is not None:
            return self._store.url_of(name)
        return str(Path(self.url) / name)

    def check(self) -> None:
        """Fail early if an ``s3://`` image root cannot be used (missing bucket, credentials)."""
        if self._store is not None:
            self._store.check()

    def locate(self, name: str) -> tuple[str, str | None]:
        """Check one image path without reading the image.

        Returns:
            ``(status, ref)``: ``("ok", ref)`` with what :meth:`read` takes, or
            ``("outside", None)`` / ``("missing", None)``. Local folders are checked for
            existence here; on S3 a missing object is found when it is read.
        """
        if unsafe_reason(name):
            return "outside", None
        norm = name.replace("\\", "/")
        if self._store is not None:
            return "ok", norm
        real = os.path.realpath(os.path.join(self._real, norm))
        if not (real == self._real or real.startswith(self._real + os.sep)):
            return "outside", None  # a symlink leads out of the folder
        if not os.path.isfile(real):
            return "missing", None
        return "ok", real

    def read(self, ref: str) -> Any:
        """What :func:`process_image` takes for a located image: a path, or the bytes (S3).

        Raises:
            MissingImage: the S3 object does not exist.
            StorageError: the object store cannot be read (not the image's fault: not a skip).
        """
        if self._store is None:
            return ref
        try:
            return self._store.read_bytes(ref)
        except ObjectNotFound as err:
            raise MissingImage(str(err)) from None


def process_image(src: str | Path | bytes, max_side: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Load an image and re-encode it: longest side <= ``max_side``, JPEG ``quality``.

    EXIF orientation is applied and metadata dropped, so the bytes depend only on the pixels
    and the settings.

    Args:
        src: a file path or the file's bytes.
        max_side: longest side of the result.
        quality: JPEG quality of the result.
        max_pixels: images with more pixels (width x height) are refused before decoding.

    Raises:
        TooManyPixels: the image is larger than ``max_pixels``.
        OSError/ValueError (from PIL): the file is not a complete, decodable image.
    """
    fp: Any = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    with Image.open(fp) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise TooManyPixels(f"{w}x{h} = {w * h} pixels is above the limit of {max_pixels}")
        if img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result stays >= max_side:
            # several times faster on full-size photos, and still deterministic.
            img.draft("RGB", (max_side, max_side))
        img.load()  # raises on truncated data (we never set LOAD_TRUNCATED_IMAGES)
        img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            if img.mode in ("RGBA", "LA", "P", "PA"):
                # Composite transparency over white instead of letting it turn black.
                img = img.convert("RGBA")
                bg = Image.new("RGB", img.size, (255, 255, 255))
                bg.paste(img, mask=img.getchannel("A"))
                img = bg
            else:
                img = img.convert("RGB")
        w, h = img.size
        if w == 0 or h == 0:
            raise ValueError("empty image")
        if max(w, h) > max_side:
            f = max_side / max(w, h)
            img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
        return buf.getvalue()


class ByteLRU:
    """A thread-safe LRU of bytes values bounded by their total size and, optionally, by their
    number (re-encoded images that several raters share, so an image is usually decoded once
    per partition, not per rater)."""

    def __init__(self, max_bytes: int, max_items: int | None = None):
        self.max_bytes = max(0, int(max_bytes))
        self.max_items = None if max_items is None else max(0, int(max_items))
        self._data: OrderedDict[Any, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
                self.hits += 1
            return value

    def put(self, key: Any, value: bytes) -> None:
        if len(value) > self.max_bytes or self.max_items == 0:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._data[key] = value
            self._size += len(value)
            while self._size > self.max_bytes or (self.max_items is not None and len(self._data) > self.max_items):
                _, dropped = self._data.popitem(last=False)
                self._size -= len(dropped)
