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
from .common import SAMPLING, Node, denoise_input, io, mappings, output, schema

SHIFT_FROM_RESOLUTION = "from the latent's resolution"
SIZE_STEP = QWEN_IMAGE_LATENT.pixel_multiple
SHIFT_FROM_MODEL = "the model's current shift"


def _model_sigmas(model, steps: int, terminal: float | None) -> torch.Tensor:
    """The reference's linear timesteps through the model's own sampling (whatever patched it: our shift node,
    ModelSamplingAuraFlow / SD3 / Flux), then the terminal stretch."""
    sampling = model.get_model_object("model_sampling")
    timesteps = linear_timesteps(steps) * float(getattr(sampling, "multiplier", 1.0))
    return finish_schedule(sampling.sigma(timesteps).float(), terminal)


class Scheduler(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "Scheduler", "Qwen-Image Scheduler", SAMPLING,
            "The reference Qwen-Image schedule: linear sigmas, exponentially shifted by an amount that grows with the "
            "image size (for a layered latent, the Layered reference's shift), the last one stretched to 0.02. Use "
            "with SamplerCustom(Advanced).",
            inputs=[
                io.Model.Input("model", tooltip="The Qwen-Image model (its shift is used when 'shift' says so)."),
                io.Latent.Input("latent", tooltip="The latent to sample: its size sets the resolution-dependent "
                                                  "shift."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Number of sampling steps (reference: 50 for text-to-image, 40 for edit; 4 or 8 "
                                     "with Lightning LoRAs)."),
                denoise_input(),
                io.Combo.Input("shift", options=[SHIFT_FROM_RESOLUTION, SHIFT_FROM_MODEL],
                               tooltip="Where the time shift comes from: computed from the latent size like the "
                                       "reference, or the model's own sampling (as set by Qwen-Image Sampling Shift, "
                                       "ModelSamplingAuraFlow...)."),
                io.Float.Input("terminal_sigma", default=TERMINAL_SIGMA, min=0.0, max=0.5, step=0.001,
                               tooltip="The last non-zero sigma (reference 0.02); 0 turns the stretch off."),
            ],
            outputs=[output(io.Sigmas, None, "The noise levels to sample through, ending at 0.")])

    @classmethod
    def execute(cls, model, latent: dict, steps: int, denoise: float, shift: str,
                terminal_sigma: float) -> io.NodeOutput:
        if denoise <= 0.0:
            return io.NodeOutput(torch.zeros(0))
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
        return io.NodeOutput(sigmas[-(steps + 1):])


class SamplingShift(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        size = {"default": 1328, "min": SIZE_STEP, "max": 8192, "step": SIZE_STEP}
        return schema(
            "SamplingShift", "Qwen-Image Sampling Shift", SAMPLING,
            "Overrides the exponential time shift (mu) of the model's sampling: the reference value for a "
            "resolution, or a value of your own. Higher shift spends more steps at high noise.",
            inputs=[
                io.Model.Input("model", tooltip="The Qwen-Image model to patch."),
                io.Int.Input("width", **size,
                             tooltip="Image width the shift is computed for (ignored when shift > 0)."),
                io.Int.Input("height", **size,
                             tooltip="Image height the shift is computed for (ignored when shift > 0)."),
                io.Float.Input("shift", default=0.0, min=0.0, max=10.0, step=0.01,
                               tooltip="0: the reference shift for width x height (0.5 at 256x256 up to 0.9 at "
                                       "1448x1448). Above 0: this mu itself (the host's default is 1.15)."),
            ],
            outputs=[output(io.Model, None, "The model with the new shift; the host's KSampler schedulers use it.")])

    @classmethod
    def execute(cls, model, width: int, height: int, shift: float) -> io.NodeOutput:
        factor = QWEN_IMAGE_LATENT.spatial_factor
        mu = shift if shift > 0 else resolution_shift(QWEN_IMAGE_LATENT.image_tokens(height // factor, width // factor))
        sampling = comfy.model_sampling.ModelSamplingFlux()
        sampling.set_parameters(shift=mu)
        patched = model.clone()
        patched.add_object_patch("model_sampling", sampling)
        return io.NodeOutput(patched)


class TrueCFG(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "TrueCFG", "Qwen-Image True CFG", SAMPLING,
            "Classifier-free guidance as the reference pipeline does it: uncond + cfg * (cond - uncond), then each "
            "2x2 latent patch rescaled to the norm of the conditional prediction.",
            inputs=[io.Model.Input("model", tooltip="The Qwen-Image model to patch; set CFG (e.g. 4) on the sampler.")],
            outputs=[output(io.Model, None, "The model with the reference's guidance; the sampler's CFG value is the "
                                            "scale.")])

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        def guidance(args: dict):
            # args["cond"] / ["uncond"] are sigma * velocity; the rescale is invariant to that common factor.
            return norm_preserving_cfg(args["cond"], args["uncond"], args["cond_scale"], QWEN_IMAGE_LATENT.patch_size)

        patched = model.clone()
        patched.set_model_sampler_cfg_function(guidance)
        return io.NodeOutput(patched)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(Scheduler, SamplingShift, TrueCFG)
