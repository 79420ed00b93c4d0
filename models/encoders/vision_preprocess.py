"""Image preprocessing for the Qwen-VL vision towers (what the Qwen2-VL image processor does; Qwen3-VL uses the
same processor class with other settings).

Steps: size rounded to multiples of ``patch x merge`` (Qwen2.5-VL: 14 x 2 = 28; Qwen3-VL: 16 x 2 = 32) within
``min_pixels`` / ``max_pixels`` (:func:`smart_resize`), resize if the size changed, mean/std normalisation (defaults:
OpenAI CLIP, Qwen2.5-VL's), patches, each patch duplicated into the temporal pair (a still image is a 2-frame
clip), patches flattened as ``(channel, frame, row, col)`` and ordered merge-window by merge-window (row-major over
2x2 windows, then row-major inside).  The defaults are Qwen2.5-VL's.

Resize kernel (only when the size is not already a valid multiple of 28): antialiased bicubic (half-pixel
centres) on uint8, exactly as the HF processor does it (transformers 5, torchvision backend on CPU: torch's native
uint8 antialiased bicubic kernel): the image is rounded to uint8, resized on the CPU, and scaled back to 0..1.
For uint8-valued inputs (PNG/JPEG loads, PIL images) the result equals the HF processor's; for other float images
the only extra error is the rounding to 1/255.  This matters in practice: the Edit pipelines hand the processor
images whose sides are multiples of 32 (e.g. 384 -> 392), so the processor resizes them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "MIN_PIXELS", "MAX_PIXELS", "smart_resize", "preprocess_image"]

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56  # 3136, Qwen2.5-VL preprocessor_config.json
MAX_PIXELS = 28 * 28 * 16384  # 12845056


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Nearest size with both sides multiples of ``factor`` and area within [min_pixels, max_pixels]."""
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be below 200, got {height}x{width}")
    new_h = round(height / factor) * factor
    new_w = round(width / factor) * factor
    if new_h * new_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / shrink / factor) * factor)
        new_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * grow / factor) * factor
        new_w = math.ceil(width * grow / factor) * factor
    return new_h, new_w


def _resize_like_hf(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of a ``[3, H, W]`` 0..1 image through uint8, as the HF processor does it."""
    pixels = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu()
    resized = F.interpolate(pixels[None], size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return resized[0].to(device=x.device, dtype=torch.float32) / 255.0


def preprocess_image(image: torch.Tensor, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                     min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                     mean: tuple[float, float, float] = IMAGE_MEAN, std: tuple[float, float, float] = IMAGE_STD
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[H, W, 3]`` float image in 0..1 -> (patches ``[gh * gw, 3 * T * p * p]`` fp32, patch grid ``(gh, gw)``).

    ``mean`` / ``std``: per-channel normalisation of the 0..1 values."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image of shape [H, W, 3], got {tuple(image.shape)}")
    x = image.permute(2, 0, 1).to(torch.float32)  # [3, H, W]
    height, width = x.shape[-2:]
    new_h, new_w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    if (new_h, new_w) != (height, width):
        x = _resize_like_hf(x, new_h, new_w)
    x = (x - torch.tensor(mean, device=x.device)[:, None, None]) / torch.tensor(std, device=x.device)[:, None, None]

    grid_h, grid_w = new_h // patch_size, new_w // patch_size
    rows, cols = grid_h // merge_size, grid_w // merge_size
    # [C, rows, merge, p, cols, merge, p] -> [rows, cols, merge(r), merge(c), C, p, p]
    x = x.reshape(3, rows, merge_size, patch_size, cols, merge_size, patch_size).permute(1, 4, 2, 5, 0, 3, 6)
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal_patch_size, -1, -1)  # the frame pair
    patches = x.reshape(grid_h * grid_w, 3 * temporal_patch_size * patch_size * patch_size)
    return patches, (grid_h, grid_w)
