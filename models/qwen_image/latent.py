"""The Qwen-Image 1.x latent space: the Wan-2.1 VAE's 16 channels at 8x, packed 2x2 into 64-wide DiT tokens."""

from __future__ import annotations

from ..common.latent_spec import LatentSpec

__all__ = ["QWEN_IMAGE_LATENT", "ASPECT_PRESETS"]

QWEN_IMAGE_LATENT = LatentSpec(
    family="qwen_image",
    channels=16,
    spatial_factor=8,
    patch_size=2,
    # Per-channel statistics of the raw latents (diffusers config latents_mean / latents_std = Wan 2.1's).
    mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
          0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
    std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
         3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160),
    host_format="Wan21",
    frame_axis=True,
)

# The official Qwen-Image aspect buckets (width x height), about 1.76 megapixels each.
ASPECT_PRESETS: dict[str, tuple[int, int]] = {
    "1328x1328 (1:1)": (1328, 1328),
    "1664x928 (16:9)": (1664, 928),
    "928x1664 (9:16)": (928, 1664),
    "1472x1104 (4:3)": (1472, 1104),
    "1104x1472 (3:4)": (1104, 1472),
    "1584x1056 (3:2)": (1584, 1056),
    "1056x1584 (2:3)": (1056, 1584),
}
