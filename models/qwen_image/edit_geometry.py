"""One size policy for Qwen-Image editing: the vision-language image, the VAE references and the output latent.

Every branch goes through :func:`policy_size` - aspect kept, a target area, sides multiples of ``multiple`` (32
by default, as the reference pipelines) - and :func:`models.common.image_sizing.resize_images`.  With
``multiple`` a multiple of one DiT token (16 px: 8x VAE, 2x2 patches) every latent side is even, so no padding
ever happens.
"""

from __future__ import annotations

from ..common.image_sizing import aspect_size
from .latent import QWEN_IMAGE_LATENT

__all__ = ["REFERENCE_AREA", "EDIT_PLUS_VL_AREA", "policy_size", "latent_size"]

REFERENCE_AREA = 1024 * 1024
EDIT_PLUS_VL_AREA = 384 * 384  # the Edit-2509 pipeline's vision-language image area
_TOKEN_PIXELS = QWEN_IMAGE_LATENT.pixel_multiple


def policy_size(width: int, height: int, area: int | None = REFERENCE_AREA, multiple: int = 32) -> tuple[int, int]:
    """``(width, height)`` with the input's aspect ratio, about ``area`` pixels (``None``: the input's own area),
    each side rounded to the nearest multiple of ``multiple`` (at least one multiple), as the reference does."""
    if multiple < _TOKEN_PIXELS or multiple % _TOKEN_PIXELS:
        raise ValueError(f"the size multiple must be a multiple of {_TOKEN_PIXELS} (one DiT token), got {multiple}")
    return aspect_size(width, height, area, multiple)


def latent_size(width: int, height: int) -> tuple[int, int]:
    """Latent ``(width, height)`` of an image of this size (the policy guarantees divisibility)."""
    return QWEN_IMAGE_LATENT.latent_size(width, height)
