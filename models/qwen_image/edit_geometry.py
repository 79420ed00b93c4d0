"""One size policy for editing: the vision-language image, the VAE references and the output latent.

Users of Qwen-Image-Edit see zoom and pixel shifts when the branches are sized differently (384 px for the VL
branch, 1024 px for the VAE, sides rounded to 8 on one branch and 32 on another, odd latent sizes padded by
wrap-around).  Here every branch goes through :func:`policy_size` - aspect kept, a target area, sides multiples of
``multiple`` (32 by default, as the reference pipelines) - and :func:`resize_images`, a pixel-centre-aligned
resize (``align_corners=False``, antialiased bicubic), so image -> policy size -> original size introduces no
translation and never copies one edge to the other.

With ``multiple`` a multiple of 16 every latent side is even (8x VAE, 2x2 patches): no padding ever happens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REFERENCE_AREA = 1024 * 1024
EDIT_PLUS_VL_AREA = 384 * 384  # the Edit-2509 pipeline's vision-language image area
VAE_FACTOR = 8


def policy_size(width: int, height: int, area: int | None = REFERENCE_AREA, multiple: int = 32) -> tuple[int, int]:
    """``(width, height)`` with the input's aspect ratio, about ``area`` pixels (``None``: the input's own area),
    each side rounded to the nearest multiple of ``multiple`` (at least one multiple), as the reference does."""
    if width < 1 or height < 1:
        raise ValueError(f"impossible image size {width}x{height}")
    if multiple < 16 or multiple % 16:
        raise ValueError(f"the size multiple must be a multiple of 16 (8x VAE, 2x2 patches), got {multiple}")
    ratio = width / height
    area = width * height if area is None else area
    new_width = math.sqrt(area * ratio)
    new_height = new_width / ratio
    return (max(multiple, round(new_width / multiple) * multiple),
            max(multiple, round(new_height / multiple) * multiple))


def latent_size(width: int, height: int) -> tuple[int, int]:
    """Latent ``(width, height)`` of an image of this size (the policy guarantees divisibility)."""
    if width % VAE_FACTOR or height % VAE_FACTOR:
        raise ValueError(f"{width}x{height} is not a multiple of {VAE_FACTOR}; size images with policy_size first")
    return width // VAE_FACTOR, height // VAE_FACTOR


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
