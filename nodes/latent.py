"""Empty latents on the Qwen-Image grid: the official aspect presets or a free size in whole DiT tokens."""

from __future__ import annotations

import comfy.model_management

from ..models import ASPECT_PRESETS, QWEN_IMAGE_LATENT
from .common import SAMPLING, Node, io, mappings, output, schema

# A pixel side must cover whole DiT tokens (the VAE factor times the DiT's patch).
SIZE_STEP = QWEN_IMAGE_LATENT.pixel_multiple
CUSTOM = "custom (width x height below)"


class EmptyLatent(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        size = {"default": 1024, "min": SIZE_STEP, "max": 8192, "step": SIZE_STEP}
        return schema(
            "EmptyLatent", "Empty Qwen-Image Latent", SAMPLING,
            "Makes the empty latent to sample into, at an official Qwen-Image aspect preset or a custom size.",
            inputs=[
                io.Combo.Input("preset", options=[*ASPECT_PRESETS, CUSTOM], default=next(iter(ASPECT_PRESETS)),
                               tooltip="An official Qwen-Image resolution (about 1.76 megapixels), or 'custom' to use "
                                       "the width and height below."),
                io.Int.Input("width", **size, tooltip=f"Width in pixels when the preset is 'custom'; a multiple of "
                                                      f"{SIZE_STEP}."),
                io.Int.Input("height", **size, tooltip=f"Height in pixels when the preset is 'custom'; a multiple of "
                                                       f"{SIZE_STEP}."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="How many images to generate at once."),
            ],
            outputs=[output(io.Latent, None, f"An all-zero latent batch (raw VAE space, {QWEN_IMAGE_LATENT.channels} "
                                             "channels) on the Qwen-Image grid.")])

    @classmethod
    def execute(cls, preset: str, width: int, height: int, batch_size: int) -> io.NodeOutput:
        if preset != CUSTOM:
            width, height = ASPECT_PRESETS[preset]
        if width % SIZE_STEP or height % SIZE_STEP:
            raise ValueError(f"Qwen-Image needs sides that are multiples of {SIZE_STEP} pixels; got {width}x{height}. "
                             f"Try {round(width / SIZE_STEP) * SIZE_STEP}x{round(height / SIZE_STEP) * SIZE_STEP}.")
        samples = QWEN_IMAGE_LATENT.empty(batch_size, width, height, comfy.model_management.intermediate_device())
        return io.NodeOutput({"samples": samples})


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(EmptyLatent)
