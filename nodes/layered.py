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
from .common import DEFAULT_NEGATIVE, LAYERED, Node, TextEncoder, io, mappings, output, prompt_input, schema

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


ENCODE_NAME = "Qwen-Image Layered Encode"
DECODE_NAME = "Qwen-Image Layered Decode"


class LayeredEncode(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "LayeredEncode", ENCODE_NAME, LAYERED,
            "Prepares a Qwen-Image-Layered decomposition: the image through the RGBA VAE as the condition, its "
            "description through the text encoder, and a latent of layers + 1 frames.",
            inputs=[
                TextEncoder.Input("text_encoder", tooltip="From Load Qwen-Image Text Encoder."),
                io.Vae.Input("vae", tooltip="The Qwen-Image-Layered RGBA VAE."),
                io.Image.Input("image", tooltip="The image to decompose (the first of a batch)."),
                prompt_input("prompt", "A description of the whole image. The reference writes one with Qwen2.5-VL "
                                       "when none is given; here, describe it yourself for the best layers."),
                prompt_input("negative_prompt", "Used when CFG > 1; the reference default is a space.",
                             default=DEFAULT_NEGATIVE),
                io.Int.Input("layers", default=DEFAULT_LAYERS, min=1, max=MAX_LAYERS,
                             tooltip="How many RGBA layers to decompose into (reference: 4)."),
                io.Combo.Input("resolution", options=RESOLUTIONS, default=RESOLUTIONS[0],
                               tooltip="The reference's size buckets: the image is scaled to about resolution x "
                                       "resolution pixels, aspect kept, sides multiples of 32 (reference: 640)."),
                io.Mask.Input("alpha_mask", optional=True,
                              tooltip="The image's transparency (Load Image's MASK: 1 = transparent). Without it the "
                                      "image is opaque."),
            ],
            outputs=[
                output(io.Conditioning, "positive", "The description, with the image's latent as the condition."),
                output(io.Conditioning, "negative", "The negative prompt, with the same condition."),
                output(io.Latent, "latent", "The layered latent to sample into: the whole image, then the layers."),
                output(io.Image, "sized_image", "The RGBA image as the VAE saw it (resolution bucket size)."),
            ])

    @classmethod
    def execute(cls, text_encoder, vae, image, prompt: str, negative_prompt: str, layers: int, resolution: str,
                alpha_mask=None) -> io.NodeOutput:
        vae = _layered_vae(vae, ENCODE_NAME)
        width, height = layered_size(image.shape[2], image.shape[1], int(resolution))
        rgba = _rgba(image, alpha_mask, width, height)
        if not prompt.strip():
            logger.warning("Qwen-Image Layered Encode: no description given; the layers are better with one.")
        condition = [vae.encode(rgba)]
        positive = text_encoder.encode(prompt, template="t2i")
        negative = text_encoder.encode(negative_prompt, template="t2i")
        whole = QWEN_IMAGE_LATENT.empty(1, width, height, mm.intermediate_device())
        samples = whole.expand(-1, -1, layers + 1, -1, -1).contiguous()  # frame 0: the whole image
        return io.NodeOutput(text_encoder.conditioning(positive, reference_latents=condition),
                             text_encoder.conditioning(negative, reference_latents=condition),
                             {"samples": samples}, rgba)


class LayeredDecode(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "LayeredDecode", DECODE_NAME, LAYERED,
            "Decodes a Qwen-Image-Layered latent into its RGBA layers and the whole image.",
            inputs=[
                io.Vae.Input("vae", tooltip="The Qwen-Image-Layered RGBA VAE."),
                io.Latent.Input("samples", tooltip="The sampled layered latent (from Layered Encode's latent)."),
                io.Boolean.Input("whole_image_in_layers", default=False,
                                 tooltip="Also put the whole image first in the layers batch (the reference's and "
                                         "core's slot 0). Off: the layers only."),
            ],
            outputs=[output(io.Image, "layers", "The RGBA layers, one image each, in the model's order."),
                     output(io.Image, "whole_image", "The whole image the model generated alongside the layers "
                                                     "(RGBA).")])

    @classmethod
    def execute(cls, vae, samples: dict, whole_image_in_layers: bool) -> io.NodeOutput:
        vae = _layered_vae(vae, DECODE_NAME)
        latent = samples["samples"]
        if latent.ndim != 5 or latent.shape[2] < 2:
            raise ValueError(f"{DECODE_NAME}: expected a layered latent [B, C, layers + 1, h, w], got shape "
                             f"{tuple(latent.shape)}; sample the latent of Qwen-Image Layered Encode.")
        frames = latent.shape[2]
        images = vae.decode(latent).unflatten(0, (latent.shape[0], frames))  # [B, frames, H, W, 4]
        layers = images if whole_image_in_layers else images[:, 1:]
        return io.NodeOutput(layers.flatten(0, 1), images[:, 0])


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(LayeredEncode, LayeredDecode)
