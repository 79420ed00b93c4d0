"""Sampling as the reference does it: the resolution-aware schedule, a shift override and true CFG.

* Qwen-Image Scheduler (SIGMAS, for SamplerCustom / SamplerCustomAdvanced): the reference schedule exactly -
  exponential shift from the latent's size, last sigma stretched to 0.02.
* Qwen-Image Sampling Shift (MODEL): sets the shift the host's KSampler schedulers use, from a resolution or by hand.
* Qwen-Image True CFG (MODEL): the reference's CFG with per-token norm-preserving rescale.  The host's CFGNorm is
  different maths (norms of denoised images over the channels of each pixel, clamped to <= 1) - see the README.
"""

from __future__ import annotations

import torch

import comfy.model_sampling

from ..models import (QWEN_IMAGE_LATENT, TERMINAL_SIGMA, finish_schedule, flow_sigmas, layered_shift,
                      linear_timesteps, norm_preserving_cfg, resolution_shift)
from .common import CATEGORY, mappings

SHIFT_FROM_RESOLUTION = "from the latent's resolution"
SIZE_STEP = QWEN_IMAGE_LATENT.pixel_multiple
SHIFT_FROM_MODEL = "the model's current shift"


def _model_sigmas(model, steps: int, terminal: float | None) -> torch.Tensor:
    """The reference's linear timesteps through the model's own sampling (whatever patched it: our shift node,
    ModelSamplingAuraFlow / SD3 / Flux), then the terminal stretch."""
    sampling = model.get_model_object("model_sampling")
    timesteps = linear_timesteps(steps) * float(getattr(sampling, "multiplier", 1.0))
    return finish_schedule(sampling.sigma(timesteps).float(), terminal)


class Scheduler:
    NODE_ID = "Scheduler"
    DISPLAY_NAME = "Qwen-Image Scheduler"
    CATEGORY = CATEGORY
    FUNCTION = "sigmas"
    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The noise levels to sample through, ending at 0.",)
    DESCRIPTION = ("The reference Qwen-Image schedule: linear sigmas, exponentially shifted by an amount that grows "
                   "with the image size (for a layered latent, the Layered reference's shift), the last one "
                   "stretched to 0.02. Use with SamplerCustom(Advanced).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The Qwen-Image model (its shift is used when 'shift' says so)."}),
            "latent": ("LATENT", {"tooltip": "The latent to sample: its size sets the resolution-dependent shift."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                              "tooltip": "Number of sampling steps (reference: 50 for text-to-image, 40 for edit; "
                                         "4 or 8 with Lightning LoRAs)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Below 1, only the last part of a longer schedule is run "
                                             "(image-to-image)."}),
            "shift": ([SHIFT_FROM_RESOLUTION, SHIFT_FROM_MODEL], {
                "tooltip": "Where the time shift comes from: computed from the latent size like the reference, or "
                           "the model's own sampling (as set by Qwen-Image Sampling Shift, ModelSamplingAuraFlow...)."}),
            "terminal_sigma": ("FLOAT", {"default": TERMINAL_SIGMA, "min": 0.0, "max": 0.5, "step": 0.001,
                                         "tooltip": "The last non-zero sigma (reference 0.02); 0 turns the "
                                                    "stretch off."}),
        }}

    def sigmas(self, model, latent: dict, steps: int, denoise: float, shift: str, terminal_sigma: float):
        if denoise <= 0.0:
            return (torch.zeros(0),)
        total = steps if denoise >= 1.0 else int(steps / denoise)
        if shift == SHIFT_FROM_MODEL:
            sigmas = _model_sigmas(model, total, terminal_sigma or None)
        else:
            samples = latent["samples"]
            tokens = QWEN_IMAGE_LATENT.image_tokens(samples.shape[-2], samples.shape[-1])
            # A layered latent (several frames): the Layered reference shifts by its condition image's size.
            layered = samples.ndim == 5 and samples.shape[2] > 1
            mu = layered_shift(tokens) if layered else resolution_shift(tokens)
            sigmas = flow_sigmas(total, mu, terminal_sigma or None)
        return (sigmas[-(steps + 1):],)


class SamplingShift:
    NODE_ID = "SamplingShift"
    DISPLAY_NAME = "Qwen-Image Sampling Shift"
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the new shift; the host's KSampler schedulers use it.",)
    DESCRIPTION = ("Overrides the exponential time shift (mu) of the model's sampling: the reference value for a "
                   "resolution, or a value of your own. Higher shift spends more steps at high noise.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The Qwen-Image model to patch."}),
            "width": ("INT", {"default": 1328, "min": SIZE_STEP, "max": 8192, "step": SIZE_STEP,
                              "tooltip": "Image width the shift is computed for (ignored when shift > 0)."}),
            "height": ("INT", {"default": 1328, "min": SIZE_STEP, "max": 8192, "step": SIZE_STEP,
                               "tooltip": "Image height the shift is computed for (ignored when shift > 0)."}),
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                "tooltip": "0: the reference shift for width x height (0.5 at 256x256 up to 0.9 "
                                           "at 1448x1448). Above 0: this mu itself (the host's default is 1.15)."}),
        }}

    def patch(self, model, width: int, height: int, shift: float):
        factor = QWEN_IMAGE_LATENT.spatial_factor
        mu = shift if shift > 0 else resolution_shift(QWEN_IMAGE_LATENT.image_tokens(height // factor, width // factor))
        sampling = comfy.model_sampling.ModelSamplingFlux()
        sampling.set_parameters(shift=mu)
        patched = model.clone()
        patched.add_object_patch("model_sampling", sampling)
        return (patched,)


class TrueCFG:
    NODE_ID = "TrueCFG"
    DISPLAY_NAME = "Qwen-Image True CFG"
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the reference's guidance; the sampler's CFG value is the scale.",)
    DESCRIPTION = ("Classifier-free guidance as the reference pipeline does it: uncond + cfg * (cond - uncond), "
                   "then each 2x2 latent patch rescaled to the norm of the conditional prediction.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The Qwen-Image model to patch; set CFG (e.g. 4) on the sampler."}),
        }}

    def patch(self, model):
        def guidance(args: dict):
            # args["cond"] / ["uncond"] are sigma * velocity; the rescale is invariant to that common factor.
            return norm_preserving_cfg(args["cond"], args["uncond"], args["cond_scale"], QWEN_IMAGE_LATENT.patch_size)

        patched = model.clone()
        patched.set_model_sampler_cfg_function(guidance)
        return (patched,)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(Scheduler, SamplingShift, TrueCFG)
