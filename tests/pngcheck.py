"""Reading a PNG back for tests: its size from the header, and that its pixels decode.

A plot test that only checks that a file exists (or is over N bytes) passes for a truncated
file, an HTML error page or a blank canvas; these read what a viewer would.
"""

from __future__ import annotations

import struct
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the PNG's IHDR chunk; AssertionError if it is not a PNG."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == SIGNATURE, f"{path}: not a PNG (starts {head[:8]!r})"
    length, kind = struct.unpack(">I4s", head[8:16])
    assert kind == b"IHDR" and length == 13, f"{path}: first chunk is {kind!r} (length {length}), not IHDR"
    return struct.unpack(">II", head[16:24])


def assert_plot(path: str | Path, size: tuple[int, int]) -> None:
    """`path` is a PNG of `size` pixels (width, height) that decodes to a drawing, not a blank
    canvas (a figure with axes, lines and text has many distinct colours)."""
    import numpy as np
    from matplotlib.image import imread

    assert png_size(path) == size, f"{path}: {png_size(path)} pixels, expected {size}"
    pixels = imread(str(path))  # decodes every chunk: a truncated file raises here
    assert pixels.shape[:2] == (size[1], size[0]), pixels.shape
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 10, f"{path}: {len(colours)} distinct colours: a blank figure"
