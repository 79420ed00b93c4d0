"""Qwen-Image-Layered: decompose an image into editable RGBA layers.

* Layered Encode: the image (with its transparency, from an optional mask) sized to the reference's resolution
  bucket, through the RGBA VAE as the condition and with a description through the text encoder, plus the LATENT
  to sample into: ``layers + 1`` frames, the whole image first, then the layers.
* Layered Decode: the sampled LATENT to the layers as one RGBA IMAGE batch, and the whole image.

Sample with the Layered DiT through the usual nodes; Qwen-Image Scheduler follows the reference's Layered shift
for such latents.  Reference defaults: 4 layers, resolution 640, true CFG 4, 50 steps.
"""

from __future__ import annotations

import logging

import torch

import comfy.model_management as mm

from ..models import DEFAULT_LAYERS, LAYERED_RESOLUTIONS, QWEN_IMAGE_LATENT, layered_size, resize_images, resize_mask
from .common import CATEGORY, DEFAULT_NEGATIVE, TEXT_ENCODER_TYPE, mappings

logger = logging.getLogger("qwen_image")

RESOLUTIONS = [str(r) for r in LAYERED_RESOLUTIONS]
MAX_LAYERS = 16


def _rgba(image: torch.Tensor, alpha_mask: torch.Tensor | None, width: int, height: int) -> torch.Tensor:
    """``[1, height, width, 4]``: the first image resized, with alpha ``1 - mask`` (LoadImage's mask is 1 where the
    file is transparent), opaque without a mask."""
    rgb = resize_images(image[:1, ..., :3].float(), width, height)
    if alpha_mask is None:
        alpha = torch.ones_like(rgb[..., :1])
    else:
        alpha = 1.0 - resize_mask(alpha_mask[:1], width, height)[..., None].to(rgb.device)
    return torch.cat([rgb, alpha], dim=-1)


def _layered_vae(vae, node: str):
    if getattr(vae, "output_channels", 3) != 4:
        raise ValueError(f"{node}: this VAE has no alpha channel. Qwen-Image-Layered needs its RGBA VAE (load the "
                         "Layered VAE with Load Qwen-Image VAE).")
    return vae


class LayeredEncode:
    NODE_ID = "LayeredEncode"
    DISPLAY_NAME = "Qwen-Image Layered Encode"
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT", "IMAGE")
    RETURN_NAMES = ("positive", "negative", "latent", "sized_image")
    OUTPUT_TOOLTIPS = ("The description, with the image's latent as the condition.",
                       "The negative prompt, with the same condition.",
                       "The layered latent to sample into: the whole image, then the layers.",
                       "The RGBA image as the VAE saw it (resolution bucket size).")
    DESCRIPTION = ("Prepares a Qwen-Image-Layered decomposition: the image through the RGBA VAE as the condition, "
                   "its description through the text encoder, and a latent of layers + 1 frames.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "text_encoder": (TEXT_ENCODER_TYPE, {"tooltip": "From Load Qwen-Image Text Encoder."}),
                "vae": ("VAE", {"tooltip": "The Qwen-Image-Layered RGBA VAE."}),
                "image": ("IMAGE", {"tooltip": "The image to decompose (the first of a batch)."}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                      "tooltip": "A description of the whole image. The reference writes one with "
                                                 "Qwen2.5-VL when none is given; here, describe it yourself for "
                                                 "the best layers."}),
                "negative_prompt": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                               "default": DEFAULT_NEGATIVE,
                                               "tooltip": "Used when CFG > 1; the reference default is a space."}),
                "layers": ("INT", {"default": DEFAULT_LAYERS, "min": 1, "max": MAX_LAYERS,
                                   "tooltip": "How many RGBA layers to decompose into (reference: 4)."}),
                "resolution": (RESOLUTIONS, {"default": RESOLUTIONS[0],
                                             "tooltip": "The reference's size buckets: the image is scaled to about "
                                                        "resolution x resolution pixels, aspect kept, sides "
                                                        "multiples of 32 (reference: 640)."}),
            },
            "optional": {
                "alpha_mask": ("MASK", {"tooltip": "The image's transparency (Load Image's MASK: 1 = transparent). "
                                                   "Without it the image is opaque."}),
            },
        }

    def encode(self, text_encoder, vae, image, prompt: str, negative_prompt: str, layers: int, resolution: str,
               alpha_mask=None):
        vae = _layered_vae(vae, self.DISPLAY_NAME)
        width, height = layered_size(image.shape[2], image.shape[1], int(resolution))
        rgba = _rgba(image, alpha_mask, width, height)
        if not prompt.strip():
            logger.warning("Qwen-Image Layered Encode: no description given; the layers are better with one.")
        condition = [vae.encode(rgba)]
        positive = text_encoder.encode(prompt, template="t2i")
        negative = text_encoder.encode(negative_prompt, template="t2i")
        whole = QWEN_IMAGE_LATENT.empty(1, width, height, mm.intermediate_device())
        samples = whole.expand(-1, -1, layers + 1, -1, -1).contiguous()  # frame 0: the whole image
        return (text_encoder.conditioning(positive, reference_latents=condition),
                text_encoder.conditioning(negative, reference_latents=condition),
                {"samples": samples}, rgba)


class LayeredDecode:
    NODE_ID = "LayeredDecode"
    DISPLAY_NAME = "Qwen-Image Layered Decode"
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("layers", "whole_image")
    OUTPUT_TOOLTIPS = ("The RGBA layers, one image each, in the model's order.",
                       "The whole image the model generated alongside the layers (RGBA).")
    DESCRIPTION = "Decodes a Qwen-Image-Layered latent into its RGBA layers and the whole image."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae": ("VAE", {"tooltip": "The Qwen-Image-Layered RGBA VAE."}),
            "samples": ("LATENT", {"tooltip": "The sampled layered latent (from Layered Encode's latent)."}),
            "whole_image_in_layers": ("BOOLEAN", {
                "default": False,
                "tooltip": "Also put the whole image first in the layers batch (the reference's and core's slot 0). "
                           "Off: the layers only."}),
        }}

    def decode(self, vae, samples: dict, whole_image_in_layers: bool):
        vae = _layered_vae(vae, self.DISPLAY_NAME)
        latent = samples["samples"]
        if latent.ndim != 5 or latent.shape[2] < 2:
            raise ValueError(f"{self.DISPLAY_NAME}: expected a layered latent [B, C, layers + 1, h, w], got shape "
                             f"{tuple(latent.shape)}; sample the latent of Qwen-Image Layered Encode.")
        frames = latent.shape[2]
        images = vae.decode(latent).unflatten(0, (latent.shape[0], frames))  # [B, frames, H, W, 4]
        layers = images if whole_image_in_layers else images[:, 1:]
        return (layers.flatten(0, 1), images[:, 0])


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(LayeredEncode, LayeredDecode)
