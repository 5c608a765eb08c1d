"""JPEG bytes to model input: pure functions (PIL, numpy, torch), no I/O, no global state.

Augmentation follows the reference code scaled to the model's input side ``S``: resize the
image to ``round(S * 256 / 224)`` square, take a random ``S`` x ``S`` crop and flip it
horizontally with probability 1/2. Without augmentation the image is resized to ``S`` x ``S``.
Every random draw comes from the caller's ``torch.Generator``, so a decision depends only on
how that generator was seeded (the task stream seeds it from ``(seed, step, user)``).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def augment_side(size: int) -> int:
    """Side an image is resized to before the random ``size`` crop (256/224 of it)."""
    return max(size, int(round(size * 256 / 224)))


def load_rgb(jpeg: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image.

    Raises:
        ValueError: the bytes are not a decodable image.
    """
    try:
        img = Image.open(io.BytesIO(jpeg))
        img.load()
    except Exception as err:  # PIL raises several types (OSError, SyntaxError, ...)
        raise ValueError(f"cannot decode image ({len(jpeg)} bytes): {err}") from None
    return img.convert("RGB") if img.mode != "RGB" else img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image to a float tensor ``[3, H, W]``, ImageNet-normalized."""
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    return (x - _MEAN) / _STD


def decode(
    jpeg: bytes,
    size: int,
    augment: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode one image to a normalized ``[3, size, size]`` float tensor.

    Args:
        jpeg: encoded image bytes.
        size: output side ``S``.
        augment: resize to ``augment_side(S)``, random crop ``S`` and random horizontal flip;
            otherwise resize to ``S`` x ``S``.
        generator: source of the crop and flip draws (required for determinism when
            ``augment`` is true; a fresh unseeded one is used when omitted).

    Returns:
        ``Tensor[3, S, S]`` of float32.
    """
    img = load_rgb(jpeg)
    if not augment:
        return to_tensor(img.resize((size, size), Image.BILINEAR))
    side = augment_side(size)
    img = img.resize((side, side), Image.BILINEAR)
    g = generator if generator is not None else torch.Generator()
    # Draw in a fixed order (x, y, flip) so the sequence of draws defines the result.
    xy = torch.randint(0, side - size + 1, (2,), generator=g)
    flip = bool(torch.rand((), generator=g) < 0.5)
    x0, y0 = int(xy[0]), int(xy[1])
    img = img.crop((x0, y0, x0 + size, y0 + size))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def decode_batch(
    jpegs: Sequence[bytes],
    size: int,
    augment: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode several images into ``[N, 3, size, size]`` (draws taken in list order)."""
    if len(jpegs) == 0:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    return torch.stack([decode(j, size, augment, generator) for j in jpegs])


def decode_pixels(jpegs: Sequence[bytes], size: int) -> torch.Tensor:
    """Decode and resize without augmentation, stopping before normalization: uint8
    ``[N, 3, size, size]`` (a quarter of the float32 bytes, for caching).

    ``normalize(decode_pixels(j, S))`` equals ``decode_batch(j, S)`` bit for bit.
    """
    if len(jpegs) == 0:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    arrs = [np.asarray(load_rgb(j).resize((size, size), Image.BILINEAR), dtype=np.uint8) for j in jpegs]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` pixels to the model's float input, ImageNet-normalized: the same
    element-wise operations as :func:`to_tensor`, so the same bits."""
    x = pixels.to(torch.float32).div_(255.0)
    return (x - _MEAN) / _STD
