"""Empty latents on the Qwen-Image grid: the official aspect presets or a free size in whole DiT tokens."""

from __future__ import annotations

import comfy.model_management

from ..models import ASPECT_PRESETS, QWEN_IMAGE_LATENT
from .common import CATEGORY, mappings

# A pixel side must cover whole DiT tokens (the VAE factor times the DiT's patch).
SIZE_STEP = QWEN_IMAGE_LATENT.pixel_multiple
CUSTOM = "custom (width x height below)"


class EmptyLatent:
    NODE_ID = "EmptyLatent"
    DISPLAY_NAME = "Empty Latent"
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = (f"An all-zero latent batch (raw VAE space, {QWEN_IMAGE_LATENT.channels} channels) on the "
                       "Qwen-Image grid.",)
    DESCRIPTION = "Makes the empty latent to sample into, at an official Qwen-Image aspect preset or a custom size."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "preset": ([*ASPECT_PRESETS, CUSTOM], {
                "default": next(iter(ASPECT_PRESETS)),
                "tooltip": "An official Qwen-Image resolution (about 1.76 megapixels), or 'custom' to use the "
                           "width and height below."}),
            "width": ("INT", {"default": 1024, "min": SIZE_STEP, "max": 8192, "step": SIZE_STEP,
                              "tooltip": f"Width in pixels when the preset is 'custom'; a multiple of {SIZE_STEP}."}),
            "height": ("INT", {"default": 1024, "min": SIZE_STEP, "max": 8192, "step": SIZE_STEP,
                               "tooltip": f"Height in pixels when the preset is 'custom'; a multiple of {SIZE_STEP}."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "How many images to generate at once."}),
        }}

    def generate(self, preset: str, width: int, height: int, batch_size: int) -> tuple[dict]:
        if preset != CUSTOM:
            width, height = ASPECT_PRESETS[preset]
        if width % SIZE_STEP or height % SIZE_STEP:
            raise ValueError(f"Qwen-Image needs sides that are multiples of {SIZE_STEP} pixels; got {width}x{height}. "
                             f"Try {round(width / SIZE_STEP) * SIZE_STEP}x{round(height / SIZE_STEP) * SIZE_STEP}.")
        samples = QWEN_IMAGE_LATENT.empty(batch_size, width, height, comfy.model_management.intermediate_device())
        return ({"samples": samples},)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(EmptyLatent)
