"""One size policy for Qwen-Image editing: the vision-language image, the VAE references and the output latent.

Every branch goes through :func:`policy_size` - aspect kept, a target area, sides multiples of ``multiple`` (32
by default, as the reference pipelines) - and :func:`models.common.image_sizing.resize_images`.  With
``multiple`` a multiple of one DiT token (16 px: 8x VAE, 2x2 patches) every latent side is even, so no padding
ever happens.

:func:`lanczos_resize` is the reference pipelines' own resize (Pillow's Lanczos on the 8-bit image), bit for bit:
the Edit-2509/2511 vision-language image is always resized (to a 384x384 area), so matching the reference there
needs its kernel, not just its size.
"""

from __future__ import annotations

import math

import torch

from ..common.image_sizing import aspect_size
from .latent import QWEN_IMAGE_LATENT

__all__ = ["REFERENCE_AREA", "EDIT_PLUS_VL_AREA", "policy_size", "latent_size", "lanczos_resize"]

REFERENCE_AREA = 1024 * 1024
EDIT_PLUS_VL_AREA = 384 * 384  # the Edit-2509 pipeline's vision-language image area
_TOKEN_PIXELS = QWEN_IMAGE_LATENT.pixel_multiple
_LANCZOS_LOBES = 3
_FIXED_BITS = 22  # Pillow's 8-bit resampling: weights in fixed point with 22 fraction bits (32 - 8 - 2)


def policy_size(width: int, height: int, area: int | None = REFERENCE_AREA, multiple: int = 32) -> tuple[int, int]:
    """``(width, height)`` with the input's aspect ratio, about ``area`` pixels (``None``: the input's own area),
    each side rounded to the nearest multiple of ``multiple`` (at least one multiple), as the reference does."""
    if multiple < _TOKEN_PIXELS or multiple % _TOKEN_PIXELS:
        raise ValueError(f"the size multiple must be a multiple of {_TOKEN_PIXELS} (one DiT token), got {multiple}")
    return aspect_size(width, height, area, multiple)


def latent_size(width: int, height: int) -> tuple[int, int]:
    """Latent ``(width, height)`` of an image of this size (the policy guarantees divisibility)."""
    return QWEN_IMAGE_LATENT.latent_size(width, height)


def _lanczos(x: float) -> float:
    def sinc(v: float) -> float:
        v *= math.pi
        return math.sin(v) / v if v else 1.0

    return sinc(x) * sinc(x / _LANCZOS_LOBES) if -_LANCZOS_LOBES <= x < _LANCZOS_LOBES else 0.0


def _pillow_weights(in_size: int, out_size: int) -> torch.Tensor:
    """One axis of Pillow's Lanczos resampling as a ``[in_size, out_size]`` matrix of its fixed-point weights.

    Each output's window and weights follow Pillow's order of operations in Python floats (sequential sums,
    multiplication by the inverse scale), so every rounded weight equals Pillow's."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _LANCZOS_LOBES * filter_scale
    inverse = 1.0 / filter_scale
    matrix = torch.zeros(in_size, out_size, dtype=torch.float64)
    for out in range(out_size):
        centre = (out + 0.5) * scale
        start = max(int(centre - support + 0.5), 0)
        stop = min(int(centre + support + 0.5), in_size)
        row = [_lanczos((i - centre + 0.5) * inverse) for i in range(start, stop)]
        total = 0.0
        for w in row:
            total += w
        if total:
            row = [w / total for w in row]
        # rounded half away from zero, as Pillow's (int)(k * 2^22 +- 0.5)
        fixed = [int(w * (1 << _FIXED_BITS) + (0.5 if w >= 0 else -0.5)) for w in row]
        matrix[start:stop, out] = torch.tensor(fixed, dtype=torch.float64)
    return matrix


def _resample_last_axis(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """8-bit values ``[..., n]`` (float64) -> ``[..., size]``: Pillow's fixed-point sum, shift and clip.  float64
    holds every product and partial sum exactly (integers below 2^53), so the matmul is Pillow's integer sum."""
    total = pixels @ _pillow_weights(pixels.shape[-1], size).to(pixels.device) + (1 << (_FIXED_BITS - 1))
    return torch.floor(total / (1 << _FIXED_BITS)).clamp_(0, 255)


def lanczos_resize(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize ``[B,H,W,C]`` images in 0..1 to ``width x height`` exactly as Pillow's ``Image.resize(...,
    Image.LANCZOS)`` does on the 8-bit image - what diffusers' Qwen-Image Edit pipelines do to every input (via
    ``VaeImageProcessor.resize``).  Values are rounded to 1/255 first (exact for images loaded from 8-bit files);
    the result holds multiples of 1/255, in the input's dtype.  Like Pillow: the width first, then the height,
    each pass clipped to 8 bits, and a pass whose size does not change is skipped."""
    pixels = (images.double().clamp(0.0, 1.0) * 255.0).round_().movedim(-1, 1)  # [B, C, H, W]
    if pixels.shape[-1] != width:
        pixels = _resample_last_axis(pixels, width)
    if pixels.shape[-2] != height:
        pixels = _resample_last_axis(pixels.transpose(-1, -2), height).transpose(-1, -2)
    return (pixels.movedim(1, -1) / 255.0).to(images.dtype)
