"""Qwen-Image-Layered's pipeline facts (diffusers ``QwenImageLayeredPipeline``): the resolution buckets the
image is sized to, the number of layers, and the time shift, which follows the condition image's token count.

A layered latent is ``[B, 16, layers + 1, h, w]``: frame 0 is the whole image, frames 1.. the RGBA layers; the
condition is the input image's latent, the DiT's last reference (see :class:`models.qwen_image.dit.QwenImageDiT`).
"""

from __future__ import annotations

import math

from ..common.image_sizing import aspect_size
from .latent import QWEN_IMAGE_LATENT

__all__ = ["LAYERED_RESOLUTIONS", "DEFAULT_LAYERS", "layered_size", "layered_shift"]

LAYERED_RESOLUTIONS = (640, 1024)  # the reference's buckets: the image's area is resolution x resolution
DEFAULT_LAYERS = 4
_BASE_TOKENS = 256  # the token count at which the shift is 1 (a 256 x 256 image)


def layered_size(width: int, height: int, resolution: int = LAYERED_RESOLUTIONS[0]) -> tuple[int, int]:
    """``(width, height)`` of the condition image and the layers: the input's aspect at ``resolution ** 2`` pixels,
    sides multiples of 32 (the reference's ``calculate_dimensions``)."""
    if resolution not in LAYERED_RESOLUTIONS:
        raise ValueError(f"resolution must be one of {LAYERED_RESOLUTIONS} (the reference's buckets), got {resolution}")
    return aspect_size(width, height, resolution * resolution, 2 * QWEN_IMAGE_LATENT.pixel_multiple)


def layered_shift(condition_tokens: int) -> float:
    """The exponential time shift ``mu`` of a layered generation: ``sqrt(tokens / 256)`` of the condition image."""
    return math.sqrt(condition_tokens / _BASE_TOKENS)
