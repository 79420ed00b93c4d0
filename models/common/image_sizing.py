"""Sizing images without zoom or shift: an aspect-keeping target size, a pixel-centre-aligned resize.

Users of image-conditioned models see zoom and pixel shifts when branches are sized differently or rounded to
different multiples.  :func:`aspect_size` keeps the aspect ratio at a target area with sides multiples of
``multiple``; :func:`resize_images` and :func:`resize_mask` resize with pixel centres aligned
(``align_corners=False``), so image -> target size -> original size introduces no translation and never copies
one edge to the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["aspect_size", "resize_images", "resize_mask"]


def aspect_size(width: int, height: int, area: int | None, multiple: int) -> tuple[int, int]:
    """``(width, height)`` with the input's aspect ratio, about ``area`` pixels (``None``: the input's own area),
    each side rounded to the nearest multiple of ``multiple`` (at least one multiple)."""
    if width < 1 or height < 1:
        raise ValueError(f"impossible image size {width}x{height}")
    ratio = width / height
    area = width * height if area is None else area
    new_width = math.sqrt(area * ratio)
    new_height = new_width / ratio
    return (max(multiple, round(new_width / multiple) * multiple),
            max(multiple, round(new_height / multiple) * multiple))


def resize_images(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize ``[B,H,W,C]`` images in 0..1 to ``width x height``, pixel centres aligned (no shift), clamped.

    Antialiased bicubic when shrinking (no aliasing), bicubic when enlarging; an unchanged size is returned as is.
    """
    if images.shape[1] == height and images.shape[2] == width:
        return images
    x = images.movedim(-1, 1).float()
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp_(0.0, 1.0).movedim(1, -1).to(images.dtype)


def resize_mask(mask: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize a ``[B,H,W]`` (or ``[H,W]``) mask in 0..1 to ``width x height`` (antialiased bilinear, centres
    aligned), e.g. to the latent grid."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.shape[-2:] == (height, width):
        return mask.float()
    resized = F.interpolate(mask[:, None].float(), size=(height, width), mode="bilinear", align_corners=False,
                            antialias=True)
    return resized[:, 0].clamp_(0.0, 1.0)
