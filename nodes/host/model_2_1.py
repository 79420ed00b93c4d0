"""Qwen-Image 2.1 in the host: our 2.1 DiT as the host's MODEL, its VAE and its Qwen3-VL encoder as host
components.

* MODEL: :class:`HostQwenImage21DiT` takes the host's calling convention (``x [B, 64, h, w]``, sigma, the prompt
  ``context``, ``ref_latents``, ``image_slots``, ``transformer_options``) and runs every attention call through
  the host's attention.  It is sampled as flow matching with our own default shift (the reference's for 1024x1024);
  the 2.1 Scheduler node gives the resolution-dependent schedule.
* Conditioning: the embeddings go as ``c_crossattn`` of exactly their shape (never the host's repeat-padding of
  cross-attention, which would break the text / image-slot layout), the image slots as a constant that only
  batches with an identical layout, the condition latents as a list.  So the host runs cond and uncond in one
  batch only when their layouts agree, and as separate calls otherwise (as the reference does).
* Prefix cache: the text and condition-image keys and values do not depend on the step (``causal_condition``);
  one :class:`models.PrefixCache` per sampling run holds them per conditioning (so per CFG branch), started by the
  patcher's ``pre_run``, emptied when hooks change the weights, dropped by ``cleanup``.  The Prefix Cache node
  keeps it on the compute device, offloads it to the CPU, or turns it off (``transformer_options``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_management as mm

from ...models import QWEN_IMAGE_2_1_LATENT, PrefixCache, QwenImage21DiT
from .attention import with_host_attention
from .components import HostTextEncoder, HostVAE, progress_bar
from .model import (ENTITIES_KEY, TEXT_ENCODER_KEY, QwenImageHostModel, QwenImageModelConfig, QwenImageModelPatcher,
                    under_host_wrappers)

logger = logging.getLogger("qwen_image")

# CONDITIONING option: the context's image slots (a tuple of bools, True at the encoder's <|image_pad|> positions).
IMAGE_SLOTS_KEY = "qip_image_slots"
# transformer_options entry the Prefix Cache node sets; its values.
PREFIX_CACHE_OPTION = "qip_prefix_cache"
CACHE_ON_DEVICE, CACHE_OFFLOADED, CACHE_OFF = "device", "cpu", "off"

# QwenImage21Pipeline's calculate_shift: mu linear in the image tokens, 0.5 at 256 tokens and 1.15 at 4096 (not
# clamped), applied as the exponential time shift without a terminal stretch.
BASE_TOKENS, MAX_TOKENS, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15
REFERENCE_RESOLUTION = 1024  # the pipelines' output_resolution: the default image is 1024 x 1024
SPATIAL_FACTOR = QWEN_IMAGE_2_1_LATENT.spatial_factor


def reference_shift(tokens: int) -> float:
    """The reference's ``mu`` for a target of ``tokens`` image tokens (its operation order, so bit for bit)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return tokens * slope + (BASE_SHIFT - slope * BASE_TOKENS)


def latent_tokens(latent: torch.Tensor) -> int:
    """Image tokens of a 2.1 latent ``[..., h, w]`` (one per latent cell)."""
    return QWEN_IMAGE_2_1_LATENT.image_tokens(latent.shape[-2], latent.shape[-1])


DEFAULT_SHIFT = reference_shift((REFERENCE_RESOLUTION // SPATIAL_FACTOR) ** 2)


class QwenImage21LatentFormat(getattr(comfy.latent_formats, QWEN_IMAGE_2_1_LATENT.host_format,
                                      comfy.latent_formats.LatentFormat)):
    """The host's 2.1 latent format where it has one (else a plain one) with the library's normalisation."""

    latent_channels = QWEN_IMAGE_2_1_LATENT.channels
    latent_dimensions = 2

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return QWEN_IMAGE_2_1_LATENT.normalize(latent)

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return QWEN_IMAGE_2_1_LATENT.denormalize(latent)


_warned: set[str] = set()


def _warn_unsupported(kinds: set[str]) -> None:
    """Say once per kind that a host model patch or a ControlNet reaches the 2.1 DiT, which ignores it."""
    for kind in sorted(kinds - _warned):
        _warned.add(kind)
        logger.warning("Qwen-Image 2.1: '%s' is not supported by the 2.1 DiT and is ignored.", kind)


@dataclass
class _Run:
    """The prefix cache of one sampling run, and how many model calls it served."""

    cache: PrefixCache = field(default_factory=PrefixCache)
    calls: int = 0
    reused: int = 0


class HostQwenImage21DiT(QwenImage21DiT):
    """The 2.1 DiT with the host's calling convention; parameters and maths are those of :class:`QwenImage21DiT`."""

    source = "(loaded by the library)"  # the file it came from, for messages; the loader node sets it
    _run: _Run | None = None  # set between the patcher's pre_run and cleanup

    @property
    def dtype(self) -> torch.dtype:  # the host reads diffusion_model.dtype to cast inputs
        return self.compute_dtype

    def start_run(self) -> None:
        self._run = _Run()

    def clear_prefix_cache(self) -> None:
        if self._run is not None:
            self._run.cache.clear()

    def end_run(self) -> None:
        run, self._run = self._run, None
        if run is not None and run.calls:
            logger.info("Qwen-Image 2.1 prefix cache: reused in %d of %d model calls (%.1f MiB, %s)", run.reused,
                        run.calls, run.cache.nbytes / 2 ** 20, run.cache.storage_device or "compute device")

    def _prefix_cache(self, mode: str) -> PrefixCache | None:
        if self._run is None or mode == CACHE_OFF or not self.config.causal_condition:
            return None
        storage = torch.device("cpu") if mode == CACHE_OFFLOADED else None
        if self._run.cache.storage_device != storage:
            self._run.cache.to(storage)
        return self._run.cache

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                ref_latents: list[torch.Tensor] | None = None, image_slots: tuple[bool, ...] | None = None,
                control=None, transformer_options: dict | None = None, **kwargs) -> torch.Tensor:
        """The host's call: :meth:`_forward` under the host's DIFFUSION_MODEL wrappers."""
        options = {} if transformer_options is None else transformer_options
        return under_host_wrappers(self, self._forward, (x, timesteps, context, ref_latents, image_slots, control),
                                   options, kwargs)

    def _forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
                 ref_latents: list[torch.Tensor] | None, image_slots: tuple[bool, ...] | None, control,
                 options: dict, **kwargs) -> torch.Tensor:
        if context is not None and context.shape[-1] != self.config.context_dim:
            encoder = kwargs.get(TEXT_ENCODER_KEY)
            made_by = f" (made by the text encoder {encoder})" if encoder else ""
            raise ValueError(
                f"The prompt conditioning is {context.shape[-1]} wide{made_by}, but the Qwen-Image 2.1 diffusion "
                f"model {self.source} reads {self.config.context_dim}-wide Qwen3-VL conditioning: encode with "
                "Qwen-Image 2.1 Encode and a Qwen3-VL text encoder (Load Qwen-Image 2.1 Text Encoder).")
        _warn_unsupported(set(options.get("patches") or {}) | set(options.get("patches_replace") or {})
                          | ({"ControlNet"} if control else set()))
        cache = self._prefix_cache(options.get(PREFIX_CACHE_OPTION, CACHE_ON_DEVICE))
        before = set(map(id, cache.entries)) if cache is not None else set()
        out = super().forward(x, timesteps, context, ref_latents=ref_latents, image_slots=image_slots,
                              options=with_host_attention(options), kv_cache=cache)
        if cache is not None:  # a call that filled no new entry took its prefix from the cache
            self._run.calls += 1
            self._run.reused += set(map(id, cache.entries)) <= before
        return out


class QwenImage21ModelConfig(QwenImageModelConfig):
    """What the host needs to know about the 2.1 model; the network itself is built by our loader."""

    sampling_settings = {"shift": DEFAULT_SHIFT}
    latent_format = QwenImage21LatentFormat
    # The 1.x factor per latent cell, times 4 (one token per cell instead of per 2x2 cells) and the wider stream
    # (4096 / 3072): an estimate, not a measurement.
    memory_usage_factor = QwenImageModelConfig.memory_usage_factor * 4 * 4096 / 3072


class QwenImage21HostModel(QwenImageHostModel):
    """The 1.x host model's conditioning (context, condition latents, encoder name) plus the image slots."""

    def extra_conds(self, **kwargs) -> dict:
        out = super().extra_conds(**kwargs)
        if kwargs.get(IMAGE_SLOTS_KEY) is not None:
            # A constant batches only with an equal layout (tuples compare by value).
            out["image_slots"] = comfy.conds.CONDConstant(kwargs[IMAGE_SLOTS_KEY])
        return out

    def extra_conds_shapes(self, **kwargs) -> dict:
        references = kwargs.get("reference_latents") or ()
        channels = QWEN_IMAGE_2_1_LATENT.channels
        tokens = sum(math.prod(r.shape) for r in references) // channels
        return {"ref_latents": [1, channels, tokens]} if tokens else {}


class QwenImage21ModelPatcher(QwenImageModelPatcher):
    """The ModelPatcher of a 2.1 MODEL: one prefix cache per sampling run (see the module docstring)."""

    def pre_run(self) -> None:
        self.model.diffusion_model.start_run()
        super().pre_run()

    def patch_hooks(self, hooks) -> None:
        self.model.diffusion_model.clear_prefix_cache()  # hooked weights change: cached keys are stale
        super().patch_hooks(hooks)

    def cleanup(self) -> None:
        super().cleanup()
        self.model.diffusion_model.end_run()


def wrap_diffusion_model_2_1(dit: HostQwenImage21DiT, weight_dtype: torch.dtype,
                             manual_cast_dtype: torch.dtype | None) -> QwenImage21ModelPatcher:
    """A ModelPatcher (the host's MODEL) around a loaded 2.1 DiT that sits on the offload device."""
    config = QwenImage21ModelConfig(QwenImage21ModelConfig.unet_config)
    config.set_inference_dtype(weight_dtype, manual_cast_dtype)
    model = QwenImage21HostModel(dit, config, device=mm.unet_offload_device())
    return QwenImage21ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


class HostVAE21(HostVAE):
    """The 2.1 VAE with the host VAE's interface: raw latents ``[B, 64, H/16, W/16]`` (no frame axis), RGBA images
    out (RGB in gets an opaque alpha), so core VAE Decode / VAE Encode work with it."""

    latent_channels = QWEN_IMAGE_2_1_LATENT.channels
    latent_dim = 2
    downscale_ratio = upscale_ratio = SPATIAL_FACTOR

    def spacial_compression_decode(self) -> int:
        return SPATIAL_FACTOR

    def spacial_compression_encode(self) -> int:
        return SPATIAL_FACTOR

    def vae_encode_crop_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Centre-crop to whole 16-pixel cells; an image smaller than one cell is left for the VAE to refuse."""
        keep = [side - side % SPATIAL_FACTOR for side in pixels.shape[1:3]]
        if 0 in keep:
            return pixels
        top, left = ((side - kept) // 2 for side, kept in zip(pixels.shape[1:3], keep))
        return pixels[:, top:top + keep[0], left:left + keep[1]]

    def decode(self, samples: torch.Tensor, tiled: bool | None = None, tile_size: int | None = None,
               tile_overlap: int | None = None) -> torch.Tensor:
        self._load(self.first_stage_model.estimate_decode_bytes(
            samples.shape[0], *(side * SPATIAL_FACTOR for side in samples.shape[-2:])))
        return self.first_stage_model.decode(samples, tiled=tiled, tile_size=tile_size, tile_overlap=tile_overlap,
                                             progress=progress_bar()).to(mm.intermediate_device())

    def encode(self, pixels: torch.Tensor, tiled: bool | None = None, tile_size: int | None = None,
               tile_overlap: int | None = None) -> torch.Tensor:
        pixels = self.vae_encode_crop_pixels(pixels[..., :self.output_channels])
        self._load(self.first_stage_model.estimate_encode_bytes(*pixels.shape[:3]))
        return self.first_stage_model.encode(pixels, tiled=tiled, tile_size=tile_size, tile_overlap=tile_overlap,
                                             progress=progress_bar()).to(mm.intermediate_device())


class HostTextEncoder21(HostTextEncoder):
    """The Qwen3-VL condition encoder with the host's model management."""

    def encode(self, prompt: str, images: list[torch.Tensor] | None = None, template: str = "default") -> tuple:
        """The library's ``Qwen3VLCondition`` (a NamedTuple) with float32 embeddings on the host's intermediate
        device and the image mask on the CPU."""
        mm.load_models_gpu([self.patcher])
        self.encoder.device = self.patcher.load_device
        condition = self.encoder.encode(prompt, images=images, template=template, options=with_host_attention(),
                                        progress=progress_bar())
        return condition._replace(embeds=condition.embeds.float().to(mm.intermediate_device()),
                                  image_mask=condition.image_mask.cpu())
