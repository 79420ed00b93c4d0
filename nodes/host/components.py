"""Our VAE and text encoder as host-managed components.

* :class:`HostVAE` is a drop-in for the host's VAE object (``decode`` / ``encode`` / tiled variants and the size
  queries core nodes use), so the host's VAE Decode / VAE Encode nodes work with it; LATENTs are the host's own
  single-frame ``[B,C,1,H,W]`` raw latents, 4-D latents are accepted too.
* :class:`HostTextEncoder` couples our Qwen2.5-VL encoder with a ModelPatcher so the host loads it to the device
  before encoding and offloads / frees it like its own models; :func:`host_tokenizer_dir` is where its tokenizer
  files come from.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ...models import QWEN_IMAGE_LATENT, QwenImageVAE, TextEncoder
from .attention import with_host_attention
from .model import TEXT_ENCODER_KEY

SPATIAL_FACTOR = QWEN_IMAGE_LATENT.spatial_factor


class _Managed(nn.Module):
    """What the ModelPatcher moves: it sets bookkeeping attributes (``device``, ...) on its module, which must not
    collide with our models' own read-only properties."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def progress_bar(total_hint: int = 1) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback driving the host's progress bar of the running node; it raises the
    host's interrupt exception when the user cancels."""
    bar = comfy.utils.ProgressBar(total_hint)

    def update(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return update


class HostVAE:
    """The Qwen-Image VAE with the host VAE's interface."""

    latent_channels = QWEN_IMAGE_LATENT.channels
    latent_dim = 3 if QWEN_IMAGE_LATENT.frame_axis else 2  # spatial axes plus the host's frame axis of length 1
    downscale_ratio = SPATIAL_FACTOR
    upscale_ratio = SPATIAL_FACTOR

    def __init__(self, vae: QwenImageVAE):
        self.first_stage_model = vae
        self.output_channels = vae.image_channels  # 4 for the Layered (RGBA) VAE
        self.device = mm.vae_device()
        self.patcher = comfy.model_patcher.ModelPatcher(_Managed(vae), load_device=self.device,
                                                        offload_device=mm.vae_offload_device())

    # -- what core nodes ask -----------------------------------------------------------------------------------
    def spacial_compression_decode(self) -> int:
        return SPATIAL_FACTOR

    def spacial_compression_encode(self) -> int:
        return SPATIAL_FACTOR

    def temporal_compression_decode(self):
        return None

    def temporal_compression_encode(self):
        return None

    def vae_encode_crop_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Centre-crop to whole latent cells like the host does (our edit nodes size images exactly instead); an
        image smaller than one cell is left as it is, for the VAE to refuse with its real size."""
        height = (pixels.shape[1] // SPATIAL_FACTOR) * SPATIAL_FACTOR
        width = (pixels.shape[2] // SPATIAL_FACTOR) * SPATIAL_FACTOR
        if height == 0 or width == 0:
            return pixels
        top, left = (pixels.shape[1] - height) // 2, (pixels.shape[2] - width) // 2
        return pixels[:, top:top + height, left:left + width, :]

    def get_sd(self) -> dict:
        """The weights under the original Wan names (what VAE Save / checkpoint saving write)."""
        return self.first_stage_model.state_dict()

    # -- work --------------------------------------------------------------------------------------------------
    def _load(self, memory_required: int) -> None:
        # Ask the host for room for the activations too, so it offloads other models first; whatever still does
        # not fit is handled by the VAE's own automatic tiling.
        mm.load_models_gpu([self.patcher], memory_required=memory_required)

    def decode(self, samples: torch.Tensor, tiled: bool | None = None, tile_size: int | None = None,
               tile_overlap: int | None = None) -> torch.Tensor:
        """Images ``[B, H, W, C]``; a latent with several frames (a layered latent) gives ``B * frames`` images,
        frame by frame."""
        if samples.ndim == 5:
            samples = samples.movedim(2, 1).flatten(0, 1)  # [B, C, F, h, w] -> [B * F, C, h, w]
        self._load(self.first_stage_model.estimate_decode_bytes(
            samples.shape[0], samples.shape[-2] * SPATIAL_FACTOR, samples.shape[-1] * SPATIAL_FACTOR))
        images = self.first_stage_model.decode(samples, tiled=tiled, tile_size=tile_size, tile_overlap=tile_overlap,
                                               progress=progress_bar(), options=with_host_attention())
        return images.to(mm.intermediate_device())

    def encode(self, pixels: torch.Tensor, tiled: bool | None = None, tile_size: int | None = None,
               tile_overlap: int | None = None) -> torch.Tensor:
        pixels = self.vae_encode_crop_pixels(pixels[..., :self.output_channels])
        self._load(self.first_stage_model.estimate_encode_bytes(pixels.shape[0], pixels.shape[1], pixels.shape[2]))
        latent = self.first_stage_model.encode(pixels, tiled=tiled, tile_size=tile_size, tile_overlap=tile_overlap,
                                               progress=progress_bar(), options=with_host_attention())
        if QWEN_IMAGE_LATENT.frame_axis:
            latent = latent.unsqueeze(2)
        return latent.to(mm.intermediate_device())

    def decode_tiled(self, samples: torch.Tensor, tile_x: int = 64, tile_y: int = 64, overlap: int = 16,
                     **_ignored) -> torch.Tensor:
        return self.decode(samples, tiled=True, tile_size=max(tile_x, tile_y), tile_overlap=overlap)

    def encode_tiled(self, pixels: torch.Tensor, tile_x: int = 512, tile_y: int = 512, overlap: int = 64,
                     **_ignored) -> torch.Tensor:
        return self.encode(pixels, tiled=True, tile_size=max(tile_x, tile_y), tile_overlap=overlap)


def host_tokenizer_dir() -> str:
    """The Qwen2.5 tokenizer files every ComfyUI that supports Qwen ships (tokenizer data is never bundled with us)."""
    return os.path.join(os.path.dirname(comfy.utils.__file__), "text_encoders", "qwen25_tokenizer")


class HostTextEncoder:
    """A loaded :class:`TextEncoder` plus the ModelPatcher through which the host manages its weights."""

    def __init__(self, encoder: TextEncoder, load_device: torch.device, offload_device: torch.device,
                 name: str = ""):
        self.encoder = encoder
        self.name = name or os.path.basename(encoder.source)
        self.patcher = comfy.model_patcher.ModelPatcher(_Managed(encoder.model), load_device=load_device,
                                                        offload_device=offload_device)

    def encode(self, prompt: str, images: list[torch.Tensor] | None = None, template: str = "t2i") -> torch.Tensor:
        """Embeddings ``[1, L, hidden]`` (float32, on the host's intermediate device)."""
        return self.encode_prompts([prompt], images, template)[0]

    def encode_prompts(self, prompts: list[str], images: list[torch.Tensor] | None = None,
                       template: str = "t2i") -> list[torch.Tensor]:
        """:meth:`encode` for several prompts with the same images, the vision tower running once per image; a
        progress bar over the decoder layers, and the host's interrupt honoured after every layer."""
        mm.load_models_gpu([self.patcher])
        self.encoder.device = self.patcher.load_device
        encoded = self.encoder.encode_prompts(prompts, images=images, template=template, progress=progress_bar(),
                                              options=with_host_attention())
        return [emb.float().to(mm.intermediate_device()) for emb, _ in encoded]

    def conditioning(self, embeddings: torch.Tensor, **options) -> list:
        """The host's CONDITIONING for embeddings of this encoder; it carries the encoder's file name, so a diffusion
        model of another width can say which file does not fit."""
        return [[embeddings, {TEXT_ENCODER_KEY: self.name, **options}]]
