"""Eval transforms: PIL image -> normalized CHW float tensor, as the model's ``Preprocess`` says.

Every image goes through ``to_rgb`` first, so calibration and validation see the same pixels
whatever the file's mode. Transparent pixels are composited on white: their stored colour is
undefined (often black) and would otherwise reach the model as content; white is how the image
looks when displayed. This differs from torchvision's ``ImageFolder`` loader, which drops alpha.
EXIF orientation is not applied (pixels as stored), as in torchvision and timm.
"""

from __future__ import annotations

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
    """uint8 (..., 3, S, S) -> float32 scaled to [0, 1] and normalized: the same ops, in the same order, as
    the eval transform, so a batch of cached pixels gives the per-image transform's values bit for bit."""
    scaled = v2.functional.to_dtype(pixels, torch.float32, scale=True)
    return v2.functional.normalize(scaled, mean=list(pre.mean), std=list(pre.std))


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
