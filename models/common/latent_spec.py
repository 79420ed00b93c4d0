"""What a family's latents look like: one :class:`LatentSpec` per family, used wherever a latent is made, sized,
packed, normalised or previewed (in ``models/`` and in the nodes).

A family folder defines its spec (e.g. :data:`models.qwen_image.latent.QWEN_IMAGE_LATENT`); nothing outside the
family folders hard-codes channel counts, spatial factors or latent statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LatentSpec", "pack_latent", "unpack_latent"]


def pack_latent(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/p)(W/p), C*p*p]`` with channel ``c*p*p + dy*p + dx`` (the diffusers packing)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_latent(tokens: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`pack_latent` for a ``height x width`` latent."""
    b, _, packed = tokens.shape
    c = packed // (patch * patch)
    x = tokens.view(b, height // patch, width // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


@dataclass(frozen=True)
class LatentSpec:
    """The latent space of one model family.

    ``channels`` of the VAE latent, ``spatial_factor`` pixels per latent cell, ``patch_size`` latent cells per DiT
    token side, per-channel ``mean`` / ``std`` of raw latents (the diffusion model sees ``(z - mean) / std``),
    ``host_format`` the name of the host's latent format with the same statistics (``comfy.latent_formats``), and
    ``frame_axis``: host LATENTs of this family carry a frame axis of length 1 (``[B, C, 1, H, W]``).
    """

    family: str
    channels: int
    spatial_factor: int
    patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    host_format: str
    frame_axis: bool = False

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.family}: latent statistics must have {self.channels} entries")

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this (one DiT token)."""
        return self.spatial_factor * self.patch_size

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """Latent ``(width, height)`` of an image; sides must be multiples of :attr:`spatial_factor`."""
        if width % self.spatial_factor or height % self.spatial_factor:
            raise ValueError(f"image size {width}x{height} is not a multiple of {self.spatial_factor} on both sides")
        return width // self.spatial_factor, height // self.spatial_factor

    def image_tokens(self, latent_height: int, latent_width: int) -> int:
        """DiT tokens of a latent (patches of ``patch_size`` cells, rounded up)."""
        p = self.patch_size
        return -(-latent_height // p) * -(-latent_width // p)

    def empty(self, batch: int, width: int, height: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """An all-zero raw latent for ``width x height`` pixels (with the host's frame axis when the family has it)."""
        w, h = self.latent_size(width, height)
        shape = [batch, self.channels, 1, h, w] if self.frame_axis else [batch, self.channels, h, w]
        return torch.zeros(shape, device=device)

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.channels) + (1,) * (z.ndim - 2)
        mean = torch.tensor(self.mean, device=z.device, dtype=z.dtype).reshape(shape)
        std = torch.tensor(self.std, device=z.device, dtype=z.dtype).reshape(shape)
        return mean, std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (channels on dim 1, any rank) -> the diffusion model's space: ``(z - mean) / std``."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: ``z * std + mean``."""
        mean, std = self._stats(z)
        return z * std + mean

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> DiT tokens ``[B, (H/p)(W/p), C*p*p]``."""
        return pack_latent(z, self.patch_size)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """DiT tokens -> ``[B, C, height, width]``."""
        return unpack_latent(tokens, height, width, self.patch_size)
