"""Eval transforms: PIL image -> normalized CHW float tensor, as the model's ``Preprocess`` says.

Every image goes through ``to_rgb`` first, so calibration and validation see the same pixels
whatever the file's mode. Transparent pixels are composited on white: their stored colour is
undefined (often black) and would otherwise reach the model as content; white is how the image
looks when displayed. This differs from torchvision's ``ImageFolder`` loader, which drops alpha.
EXIF orientation is not applied (pixels as stored), as in torchvision and timm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from t2tedge.models.spec import Preprocess

INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# Integer modes hold 16-bit samples in practice (16-bit PNG/TIFF); PIL's own convert would clip
# them at 255 instead of scaling, turning most of the image white.
_WIDE_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit RGB image (alpha composited on white, 16-bit scaled to 8-bit)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _WIDE_INT_MODES:
        samples = np.asarray(img, dtype=np.int64).clip(0, 65535)
        # 257 maps 0..65535 exactly onto 0..255 (65535 = 255 * 257).
        gray = np.rint(samples / 257.0).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def build_pixel_transform(pre: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """The geometric half of the eval transform: RGB, resize short side, center-crop -> uint8 (3, S, S).

    What is cached for large sets (a quarter of float32's bytes); :func:`normalize` finishes it.
    Unknown interpolation names raise ``ValueError`` (the spec or recipe is wrong, not the data).
    """
    try:
        interpolation = INTERPOLATIONS[pre.interpolation]
    except KeyError:
        known = ", ".join(INTERPOLATIONS)
        raise ValueError(f"unknown interpolation {pre.interpolation!r}; expected one of: {known}") from None
    return v2.Compose(
        [
            v2.Lambda(to_rgb),
            # Resize/crop act on the PIL image (PIL's antialiased resampling, as timm's eval path).
            v2.Resize(pre.resize_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop(pre.input_size),
            v2.PILToTensor(),
        ]
    )


def normalize(pixels: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (..., 3, S, S) -> float32 scaled to [0, 1] and normalized: the eval transform's values bit for bit.

    A uint8 channel has 256 values, so the transform's own ops (``ToDtype`` with scaling, then
    ``Normalize``) run once on them into a table per channel, and each pixel is a lookup: the same
    float32 results, elementwise, without four passes over the batch (8x faster on one thread)."""
    table = _normalize_table(tuple(pre.mean), tuple(pre.std))
    source = pixels.numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    if source.dtype != np.uint8 or source.ndim < 3 or source.shape[-3] != len(table):
        raise ValueError(f"expected uint8 pixels of shape (..., {len(table)}, S, S), got {source.dtype} {source.shape}")
    out = np.empty(source.shape, dtype=np.float32)
    for channel, values in enumerate(table):
        np.take(values, source[..., channel, :, :], out=out[..., channel, :, :])
    return torch.from_numpy(out)


@functools.cache
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: channel c's normalized value of every uint8 level, by the eval transform's ops."""
    levels = torch.arange(256, dtype=torch.uint8).repeat(len(mean), 1).reshape(len(mean), 1, 256)
    scaled = v2.functional.to_dtype(levels, torch.float32, scale=True)
    return v2.functional.normalize(scaled, mean=list(mean), std=list(std)).reshape(len(mean), 256).numpy()


def build_eval_transform(pre: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """Eval transform for ``pre``: RGB, resize short side, center-crop, scale to [0, 1], normalize.

    Returns a callable mapping a PIL image to a float32 tensor of shape (3, input_size, input_size).
    Unknown interpolation names raise ``ValueError`` (the spec or recipe is wrong, not the data).
    """
    pixels = build_pixel_transform(pre)
    return v2.Compose(
        [
            pixels,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(pre.mean), std=list(pre.std)),
        ]
    )
