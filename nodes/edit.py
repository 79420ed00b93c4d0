"""Instruction editing: dual encoding of one or many input images, with one size policy for every branch.

Each input image goes to Qwen2.5-VL together with the instruction (semantics) and through the VAE (appearance:
reference latents in the conditioning, read by the DiT as extra tokens with their own frame index).  Every image
is sized by :func:`models.edit_geometry.policy_size` - aspect kept, a target area, sides multiples of 32 - and the
target latent sits on the grid of the chosen reference, so nothing zooms or shifts; Restore Size maps the result
back to the input's exact pixel size.

The vision-language image follows the reference pipeline of the mode by default: the original Edit shows it the
edit image itself, Edit-2509/2511 a 384x384-area copy resized like the reference (Pillow's Lanczos).  The vision
tower runs once per image for both prompts, and each image is VAE-encoded once (the masked target reuses it).
"""

from __future__ import annotations

import logging

import torch

import comfy.model_management as mm

from ..models import (EDIT_PLUS_VL_AREA, QWEN_IMAGE_LATENT, REFERENCE_AREA, lanczos_resize, policy_size,
                      resize_images, resize_mask)
from .common import DEFAULT_NEGATIVE, EDIT, ImageList, Node, TextEncoder, io, mappings, output, prompt_input, schema
from .host.previews import temp_previews

MODE_EDIT = "Qwen-Image-Edit (one image)"
MODE_EDIT_PLUS = "Qwen-Image-Edit-2509 / 2511 (one or more images)"
AREAS = {"1024x1024 (reference)": REFERENCE_AREA, "native (the input's own size)": None,
         "512x512": 512 * 512, "768x768": 768 * 768, "1328x1328": 1328 * 1328}
# Saved workflows store these strings: keep the older two as they are.
VL_REFERENCE = "reference (per mode)"
VL_SAME = "same as the references"
VL_EDIT_PLUS = "384x384 (Edit-2509 reference)"
LATENT_FROM = ("last image", "first image")
EMPTY_BATCH = "the batch holds no picture (an empty IMAGE); connect an image to edit."

AREA_TOOLTIP = ("Pixel area every image is scaled to, aspect kept, sides multiples of the size multiple. "
                "'native' keeps each image's own area (only rounding).")
# Sizes are whole DiT tokens: the size multiple is a multiple of one token's side in pixels.
SIZE_STEP = QWEN_IMAGE_LATENT.pixel_multiple
MULTIPLE_TOOLTIP = f"Every side is a multiple of this (32 like the reference; must be a multiple of {SIZE_STEP})."
VL_TOOLTIP = ("Size of the images Qwen2.5-VL sees. 'reference' follows the mode's reference pipeline: the original "
              "Edit sees the edit image itself (the area above), Edit-2509/2511 a 384x384-area copy (sides multiples "
              "of 32, resized like the reference), which is also 7x fewer VL tokens than 1024x1024. 'same as the "
              "references': the VAE images' size. '384x384': that area at the size multiple, with this pack's resize.")


def _image_list(image: torch.Tensor, more: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """All input images as ``[1,H,W,3]`` tensors, in order: the batch of ``image``, then the list."""
    images = [frame[None, ..., :3] for frame in image] if image is not None else []
    return images + list(more or [])


def _sized(image: torch.Tensor, area: int | None, multiple: int) -> torch.Tensor:
    width, height = policy_size(image.shape[2], image.shape[1], area, multiple)
    return resize_images(image, width, height)


def _target_latent(reference: torch.Tensor, mask: torch.Tensor | None = None,
                   samples: torch.Tensor | None = None) -> dict:
    """The LATENT to sample into, on the grid of ``reference`` (an already policy-sized image).

    Without a mask: zeros.  With a mask: ``samples`` (the reference's own latent) plus a noise mask, so the host's
    samplers blend the outside back in at every step and only the masked area is edited.
    """
    if mask is None:
        return {"samples": QWEN_IMAGE_LATENT.empty(1, reference.shape[2], reference.shape[1], mm.intermediate_device())}
    if samples is None:
        raise ValueError("a mask needs the VAE (the unmasked area is kept from the image's latent)")
    width, height = QWEN_IMAGE_LATENT.latent_size(reference.shape[2], reference.shape[1])
    # one mask for the batch, on the latent grid, with the samples' axes: [1, 1, (frame,) height, width]
    noise_mask = resize_mask(mask, width, height)[:1].reshape(1, 1, *samples.shape[2:])
    return {"samples": samples, "noise_mask": noise_mask}


def _vl_images(images: list[torch.Tensor], references: list[torch.Tensor], mode: str, vl_area: str,
               size_multiple: int) -> list[torch.Tensor]:
    """The ``[H,W,3]`` images Qwen2.5-VL sees, by the ``vl_area`` choice (see ``VL_TOOLTIP``)."""
    if vl_area == VL_SAME or (vl_area == VL_REFERENCE and mode == MODE_EDIT):
        sized = references
    elif vl_area == VL_EDIT_PLUS:
        sized = [_sized(img, EDIT_PLUS_VL_AREA, size_multiple) for img in images]
    else:  # diffusers' Edit-2509/2511: 384x384 area, sides multiples of 32, Lanczos from the input image
        sized = [lanczos_resize(img, *policy_size(img.shape[2], img.shape[1], EDIT_PLUS_VL_AREA)) for img in images]
    return [img[0] for img in sized]


def _seen_ui(vl: list[torch.Tensor], vae: list[torch.Tensor]) -> dict | None:
    """What the model saw, for the node after a run: every ``[H,W,3]`` image the vision tower and the VAE received,
    as temp PNG previews (``images``, shown by the host's frontend) and their true sizes (``qip_sizes``, in the
    same order: the VL images, then the VAE images; web/js/qwen_image.js writes them on the node).  None when the
    previews cannot be written: they never fail the encode."""
    try:
        sizes = [{"role": role, "index": index, "width": int(image.shape[1]), "height": int(image.shape[0])}
                 for role, batch in (("vl", vl), ("vae", vae)) for index, image in enumerate(batch)]
        return {"images": temp_previews(vl + vae, "qip_seen"), "qip_sizes": sizes}
    except Exception as e:  # noqa: BLE001
        logging.getLogger("qwen_image").debug("no Edit Encode previews (%s: %s)", type(e).__name__, e)
        return None


def _size_inputs() -> list[io.Input]:
    """The area and size_multiple every edit node sizes its images with."""
    return [io.Combo.Input("area", options=list(AREAS), default="1024x1024 (reference)", tooltip=AREA_TOOLTIP),
            io.Int.Input("size_multiple", default=32, min=SIZE_STEP, max=128, step=SIZE_STEP,
                         tooltip=MULTIPLE_TOOLTIP)]


class EditEncode(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        area, size_multiple = _size_inputs()
        return schema(
            "EditEncode", "Qwen-Image Edit Encode", EDIT,
            "Dual encoding for Qwen-Image-Edit: each image goes to Qwen2.5-VL with the instruction and through the VAE "
            "as a reference latent, all sized by one policy (no zoom, no shift).",
            inputs=[
                TextEncoder.Input("text_encoder", tooltip="From Load Qwen-Image Text Encoder (Qwen2.5-VL)."),
                io.Vae.Input("vae", tooltip="The Qwen-Image VAE: encodes the images as reference latents."),
                io.Image.Input("image", tooltip="The image to edit (a batch counts as several images)."),
                prompt_input("prompt", "The edit instruction, e.g. 'Replace the sky with a sunset'. With several "
                                       "images, refer to them as Picture 1, Picture 2, ..."),
                prompt_input("negative_prompt", "What to avoid (used when CFG > 1), encoded with the same images.",
                             default=DEFAULT_NEGATIVE),
                io.Combo.Input("mode", options=[MODE_EDIT_PLUS, MODE_EDIT],
                               tooltip="Edit-2509/2511 take any number of images ('Picture i:' prompt); the original "
                                       "Qwen-Image-Edit takes exactly one."),
                area,
                io.Combo.Input("vl_area", options=[VL_REFERENCE, VL_SAME, VL_EDIT_PLUS], tooltip=VL_TOOLTIP),
                size_multiple,
                io.Combo.Input("latent_from", options=list(LATENT_FROM),
                               tooltip="Which image's grid the output latent takes (the reference uses the last)."),
                io.Image.Input("image2", optional=True, tooltip="A second image (Edit-2509/2511)."),
                io.Image.Input("image3", optional=True, tooltip="A third image (Edit-2509/2511)."),
                ImageList.Input("more_images", optional=True,
                                tooltip="Any number of further images, from Qwen-Image Image List nodes."),
                io.Mask.Input("mask", optional=True, tooltip="Edit only inside this mask (1 = edit); the outside is "
                                                             "kept from the latent_from image at every step."),
            ],
            outputs=[
                output(io.Conditioning, "positive", "Instruction + images (VL) and the images' latents as references."),
                output(io.Conditioning, "negative", "The negative prompt with the same images."),
                output(io.Latent, "latent", "The target latent on the grid of the chosen image (with the mask, if "
                                            "given)."),
                output(io.Image, "sized_images", "The images as the VAE saw them (policy size), for inspection."),
            ])

    @classmethod
    def execute(cls, text_encoder, vae, image, prompt: str, negative_prompt: str, mode: str, area: str,
                vl_area: str, size_multiple: int, latent_from: str, image2=None, image3=None, more_images=None,
                mask=None) -> io.NodeOutput:
        images = _image_list(image) + _image_list(image2) + _image_list(image3) + list(more_images or [])
        if not images:
            raise ValueError(f"image: {EMPTY_BATCH}")
        if mode == MODE_EDIT and len(images) != 1:
            raise ValueError(f"Qwen-Image-Edit takes exactly one image, got {len(images)}; choose the "
                             "Edit-2509 / 2511 mode for several.")
        template = "edit" if mode == MODE_EDIT else "edit_plus"
        references = [_sized(img, AREAS[area], size_multiple) for img in images]
        latents = [vae.encode(ref) for ref in references]
        vl = _vl_images(images, references, mode, vl_area, size_multiple)
        positive, negative = text_encoder.encode_prompts([prompt, negative_prompt], images=vl, template=template)
        chosen = -1 if latent_from == LATENT_FROM[0] else 0
        sized = references if len({r.shape for r in references}) == 1 else [references[chosen]]
        return io.NodeOutput(text_encoder.conditioning(positive, reference_latents=latents),
                             text_encoder.conditioning(negative, reference_latents=latents),
                             _target_latent(references[chosen], mask, latents[chosen]), torch.cat(sized),
                             ui=_seen_ui(vl, [ref[0] for ref in references]))


class EditLatent(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "EditLatent", "Qwen-Image Edit Latent", EDIT,
            "The empty (or masked) target latent on the same grid as an edit reference image.",
            inputs=[
                io.Image.Input("image", tooltip="The reference image whose grid the output takes (first of a batch)."),
                *_size_inputs(),
                io.Vae.Input("vae", optional=True, tooltip="Needed with a mask: the unmasked area is kept from this "
                                                           "image."),
                io.Mask.Input("mask", optional=True, tooltip="Edit only inside this mask (1 = edit)."),
            ],
            outputs=[output(io.Latent, None, "The target latent on the image's policy grid (the image's latent + mask "
                                             "when masked).")])

    @classmethod
    def execute(cls, image, area: str, size_multiple: int, vae=None, mask=None) -> io.NodeOutput:
        if image.shape[0] == 0:
            raise ValueError(f"image: {EMPTY_BATCH}")
        reference = _sized(image[:1, ..., :3], AREAS[area], size_multiple)
        samples = vae.encode(reference) if mask is not None and vae is not None else None
        return io.NodeOutput(_target_latent(reference, mask, samples))


class ImageListNode(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "ImageList", "Qwen-Image Image List", EDIT,
            "Collects edit images of any sizes into a list, so an edit can use more than three images.",
            inputs=[io.Image.Input("image", tooltip="Image(s) to append (a batch appends each one)."),
                    ImageList.Input("images", optional=True, tooltip="A list to extend (from another Image List).")],
            outputs=[output(ImageList, None, "The images so far, for Edit Encode's more_images (chain as many as you "
                                             "need).")])

    @classmethod
    def execute(cls, image, images=None) -> io.NodeOutput:
        return io.NodeOutput(list(images or []) + _image_list(image))


class RestoreSize(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "RestoreSize", "Qwen-Image Restore Size", EDIT,
            "Scales an edit result back to the input image's exact pixel size with the same centre-aligned kernel the "
            "policy used, so the result overlays the input without a shift.",
            inputs=[io.Image.Input("image", tooltip="The decoded edit result."),
                    io.Image.Input("original", tooltip="The input image whose size to restore.")],
            outputs=[output(io.Image, None, "The edited image at the original image's exact size.")])

    @classmethod
    def execute(cls, image, original) -> io.NodeOutput:
        return io.NodeOutput(resize_images(image, original.shape[2], original.shape[1]))


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(EditEncode, EditLatent, ImageListNode, RestoreSize)
