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

import torch

import comfy.model_management as mm

from ..models import (EDIT_PLUS_VL_AREA, QWEN_IMAGE_LATENT, REFERENCE_AREA, lanczos_resize, policy_size,
                      resize_images, resize_mask)
from .common import CATEGORY, DEFAULT_NEGATIVE, IMAGE_LIST_TYPE, TEXT_ENCODER_TYPE, mappings

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


class EditEncode:
    NODE_ID = "EditEncode"
    DISPLAY_NAME = "Qwen-Image Edit Encode"
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT", "IMAGE")
    RETURN_NAMES = ("positive", "negative", "latent", "sized_images")
    OUTPUT_TOOLTIPS = ("Instruction + images (VL) and the images' latents as references.",
                       "The negative prompt with the same images.",
                       "The target latent on the grid of the chosen image (with the mask, if given).",
                       "The images as the VAE saw them (policy size), for inspection.")
    DESCRIPTION = ("Dual encoding for Qwen-Image-Edit: each image goes to Qwen2.5-VL with the instruction and "
                   "through the VAE as a reference latent, all sized by one policy (no zoom, no shift).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "text_encoder": (TEXT_ENCODER_TYPE, {"tooltip": "From Load Qwen-Image Text Encoder (Qwen2.5-VL)."}),
                "vae": ("VAE", {"tooltip": "The Qwen-Image VAE: encodes the images as reference latents."}),
                "image": ("IMAGE", {"tooltip": "The image to edit (a batch counts as several images)."}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                      "tooltip": "The edit instruction, e.g. 'Replace the sky with a sunset'. With "
                                                 "several images, refer to them as Picture 1, Picture 2, ..."}),
                "negative_prompt": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                               "default": DEFAULT_NEGATIVE,
                                               "tooltip": "What to avoid (used when CFG > 1), encoded with the "
                                                          "same images."}),
                "mode": ([MODE_EDIT_PLUS, MODE_EDIT], {
                    "tooltip": "Edit-2509/2511 take any number of images ('Picture i:' prompt); the original "
                               "Qwen-Image-Edit takes exactly one."}),
                "area": (list(AREAS), {"default": "1024x1024 (reference)", "tooltip": AREA_TOOLTIP}),
                "vl_area": ([VL_REFERENCE, VL_SAME, VL_EDIT_PLUS], {"tooltip": VL_TOOLTIP}),
                "size_multiple": ("INT", {"default": 32, "min": SIZE_STEP, "max": 128, "step": SIZE_STEP,
                                          "tooltip": MULTIPLE_TOOLTIP}),
                "latent_from": (list(LATENT_FROM), {
                    "tooltip": "Which image's grid the output latent takes (the reference uses the last)."}),
            },
            "optional": {
                "image2": ("IMAGE", {"tooltip": "A second image (Edit-2509/2511)."}),
                "image3": ("IMAGE", {"tooltip": "A third image (Edit-2509/2511)."}),
                "more_images": (IMAGE_LIST_TYPE, {"tooltip": "Any number of further images, from Qwen-Image Image "
                                                             "List nodes."}),
                "mask": ("MASK", {"tooltip": "Edit only inside this mask (1 = edit); the outside is kept from the "
                                             "latent_from image at every step."}),
            },
        }

    def encode(self, text_encoder, vae, image, prompt: str, negative_prompt: str, mode: str, area: str,
               vl_area: str, size_multiple: int, latent_from: str, image2=None, image3=None, more_images=None,
               mask=None):
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
        return (text_encoder.conditioning(positive, reference_latents=latents),
                text_encoder.conditioning(negative, reference_latents=latents),
                _target_latent(references[chosen], mask, latents[chosen]), torch.cat(sized))


class EditLatent:
    NODE_ID = "EditLatent"
    DISPLAY_NAME = "Qwen-Image Edit Latent"
    CATEGORY = CATEGORY
    FUNCTION = "latent"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The target latent on the image's policy grid (the image's latent + mask when masked).",)
    DESCRIPTION = "The empty (or masked) target latent on the same grid as an edit reference image."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The reference image whose grid the output takes (first of a batch)."}),
                "area": (list(AREAS), {"default": "1024x1024 (reference)", "tooltip": AREA_TOOLTIP}),
                "size_multiple": ("INT", {"default": 32, "min": SIZE_STEP, "max": 128, "step": SIZE_STEP,
                                          "tooltip": MULTIPLE_TOOLTIP}),
            },
            "optional": {
                "vae": ("VAE", {"tooltip": "Needed with a mask: the unmasked area is kept from this image."}),
                "mask": ("MASK", {"tooltip": "Edit only inside this mask (1 = edit)."}),
            },
        }

    def latent(self, image, area: str, size_multiple: int, vae=None, mask=None):
        if image.shape[0] == 0:
            raise ValueError(f"image: {EMPTY_BATCH}")
        reference = _sized(image[:1, ..., :3], AREAS[area], size_multiple)
        samples = vae.encode(reference) if mask is not None and vae is not None else None
        return (_target_latent(reference, mask, samples),)


class ImageList:
    NODE_ID = "ImageList"
    DISPLAY_NAME = "Qwen-Image Image List"
    CATEGORY = CATEGORY
    FUNCTION = "append"
    RETURN_TYPES = (IMAGE_LIST_TYPE,)
    OUTPUT_TOOLTIPS = ("The images so far, for Edit Encode's more_images (chain as many as you need).",)
    DESCRIPTION = "Collects edit images of any sizes into a list, so an edit can use more than three images."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE", {"tooltip": "Image(s) to append (a batch appends each one)."})},
                "optional": {"images": (IMAGE_LIST_TYPE, {"tooltip": "A list to extend (from another Image List)."})}}

    def append(self, image, images=None):
        return (list(images or []) + _image_list(image),)


class RestoreSize:
    NODE_ID = "RestoreSize"
    DISPLAY_NAME = "Qwen-Image Restore Size"
    CATEGORY = CATEGORY
    FUNCTION = "restore"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The edited image at the original image's exact size.",)
    DESCRIPTION = ("Scales an edit result back to the input image's exact pixel size with the same centre-aligned "
                   "kernel the policy used, so the result overlays the input without a shift.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The decoded edit result."}),
            "original": ("IMAGE", {"tooltip": "The input image whose size to restore."}),
        }}

    def restore(self, image, original):
        return (resize_images(image, original.shape[2], original.shape[1]),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(EditEncode, EditLatent, ImageList, RestoreSize)
