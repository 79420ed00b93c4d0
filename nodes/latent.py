"""Empty latents on the Qwen-Image grid: the official aspect presets or a free size, multiples of 16 pixels."""

from __future__ import annotations

import torch

import comfy.model_management

from .common import CATEGORY, mappings

LATENT_CHANNELS = 16
VAE_FACTOR = 8
# A pixel side must be a multiple of the VAE factor times the DiT's 2x2 patch.
SIZE_STEP = VAE_FACTOR * 2
# The official Qwen-Image aspect buckets (width x height).
ASPECT_PRESETS: dict[str, tuple[int, int]] = {
    "1328x1328 (1:1)": (1328, 1328),
    "1664x928 (16:9)": (1664, 928),
    "928x1664 (9:16)": (928, 1664),
    "1472x1104 (4:3)": (1472, 1104),
    "1104x1472 (3:4)": (1104, 1472),
    "1584x1056 (3:2)": (1584, 1056),
    "1056x1584 (2:3)": (1056, 1584),
}
CUSTOM = "custom (width x height below)"


class EmptyLatent:
    NODE_ID = "EmptyLatent"
    DISPLAY_NAME = "Empty Latent"
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("An all-zero latent batch (raw VAE space, 16 channels) on the Qwen-Image grid.",)
    DESCRIPTION = "Makes the empty latent to sample into, at an official Qwen-Image aspect preset or a custom size."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "preset": ([*ASPECT_PRESETS, CUSTOM], {
                "default": next(iter(ASPECT_PRESETS)),
                "tooltip": "An official Qwen-Image resolution (about 1.76 megapixels), or 'custom' to use the "
                           "width and height below."}),
            "width": ("INT", {"default": 1024, "min": SIZE_STEP, "max": 8192, "step": SIZE_STEP,
                              "tooltip": "Width in pixels when the preset is 'custom'; a multiple of 16."}),
            "height": ("INT", {"default": 1024, "min": SIZE_STEP, "max": 8192, "step": SIZE_STEP,
                               "tooltip": "Height in pixels when the preset is 'custom'; a multiple of 16."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "How many images to generate at once."}),
        }}

    def generate(self, preset: str, width: int, height: int, batch_size: int) -> tuple[dict]:
        if preset != CUSTOM:
            width, height = ASPECT_PRESETS[preset]
        if width % SIZE_STEP or height % SIZE_STEP:
            raise ValueError(f"Qwen-Image needs sides that are multiples of {SIZE_STEP} pixels; got {width}x{height}. "
                             f"Try {round(width / SIZE_STEP) * SIZE_STEP}x{round(height / SIZE_STEP) * SIZE_STEP}.")
        samples = torch.zeros([batch_size, LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR],
                              device=comfy.model_management.intermediate_device())
        return ({"samples": samples},)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(EmptyLatent)
