"""What every image VAE of the family shares: encode / decode front ends with exact tiling and a memory policy.

A subclass describes its network through five hooks - :meth:`TiledVAE._channels` (the image channels it takes),
``_encode_local`` (the tileable convolutional front of the encoder) and ``_encode_finish`` (the global rest, to the
raw latent mean), ``_decode_trunk`` (the global front of the decoder) and ``_decode_tail`` (the tileable rest) -
and its geometry in class attributes (spatial factor, the receptive-field overlaps that make tiles exact, default
and smallest tiles).  The base runs an untiled call when the memory estimate fits, tiles with context margins
otherwise or when the device runs out of memory, and halves the tile on a tiled out-of-memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import Options
from .tiling import available_memory, plan_tiles, run_tiled

__all__ = ["TiledVAE", "Progress"]

Progress = Callable[[int, int], None]
_MEMORY_SAFETY = 0.85


class TiledVAE(nn.Module):
    """Base of single-image VAEs: ``encode([B, H, W, C] in 0..1) -> raw latent mean``, ``decode(latents) ->
    [B, H, W, C] in 0..1``.  Subclasses set ``z_dim``, ``dtype``, ``memory_budget`` and the attributes below."""

    spatial_factor: int
    encode_min_overlap: int  # pixels of context a tile needs for exact results
    decode_min_overlap: int  # latent cells likewise
    default_encode_tile: int  # pixels
    default_decode_tile: int  # latent cells
    min_encode_tile: int
    min_decode_tile: int

    # -- the network, as the subclass defines it -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def _channels(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode_local(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode_finish(self, features: torch.Tensor, options: Options | None) -> torch.Tensor:
        raise NotImplementedError

    def _decode_trunk(self, z: torch.Tensor, options: Options | None) -> torch.Tensor:
        raise NotImplementedError

    def _decode_tail(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def estimate_encode_bytes(self, batch: int, height: int, width: int) -> int:
        raise NotImplementedError

    def estimate_decode_bytes(self, batch: int, height: int, width: int) -> int:
        raise NotImplementedError

    def _budget(self, device: torch.device) -> int:
        if self.memory_budget is not None:
            return self.memory_budget(device)
        return int(available_memory(device) * _MEMORY_SAFETY)

    # -- encode ------------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, *, tiled: bool | None = None, tile_size: int | None = None,
               tile_overlap: int | None = None, progress: Progress | None = None,
               options: Options | None = None) -> torch.Tensor:
        """Images ``[B, H, W, C]`` in 0..1 (H, W multiples of the spatial factor) -> raw latent mean
        ``[B, z_dim, H / f, W / f]`` (float32).

        ``tiled``: ``None`` tiles only when the untiled call would not fit (or runs out of memory), ``True`` /
        ``False`` force it.  ``tile_size`` / ``tile_overlap`` in pixels: core size of a tile and the context it sees
        on every side; the overlap is raised to the receptive field, which makes tiled and untiled results equal.
        ``progress(done, total)`` is called per tile (or per batch chunk when untiled).  ``options``: run options
        for the attention (see :mod:`models.common.attention`).
        """
        factor = self.spatial_factor
        pixels = self._channels(images)
        batch, height, width = pixels.shape[:3]
        if batch == 0 or height < factor or width < factor:
            raise ValueError(f"VAE encode needs at least one image of at least {factor}x{factor} pixels, got {batch} "
                             f"of {width}x{height}; scale the image up first.")
        if height % factor or width % factor:
            raise ValueError(f"image size {width}x{height} is not a multiple of {factor} in both sides.")
        tile = _round_up(tile_size or self.default_encode_tile, factor)
        overlap = max(self.encode_min_overlap, _round_up(tile_overlap or 0, factor))
        with torch.no_grad():
            x = pixels.to(device=self.device, dtype=self.dtype).permute(0, 3, 1, 2)
            x = (x * 2 - 1).contiguous(memory_format=torch.channels_last)
            z = self._dispatch(
                x, tiled, tile, self.min_encode_tile, factor, progress,
                estimate=lambda n: self.estimate_encode_bytes(n, height, width),
                untiled=lambda image: self._encode_finish(self._encode_local(image), options),
                tiled_fn=lambda image, size, step: self._encode_tiled(image, size, overlap, step, options))
        return z.float().contiguous()

    def _encode_tiled(self, x: torch.Tensor, tile: int, overlap: int, step: Callable[[], None],
                      options: Options | None) -> torch.Tensor:
        tiles = plan_tiles(x.shape[2], x.shape[3], tile, overlap, self.spatial_factor)
        features = run_tiled(self._encode_local, x, tiles, (1, self.spatial_factor), step)
        return self._encode_finish(features, options)

    # -- decode ------------------------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, *, tiled: bool | None = None, tile_size: int | None = None,
               tile_overlap: int | None = None, progress: Progress | None = None,
               options: Options | None = None) -> torch.Tensor:
        """Raw latents ``[B, z_dim, h, w]`` (or ``[B, z_dim, 1, h, w]``) -> images ``[B, f h, f w, C]`` in 0..1
        (float32).  ``tiled`` as in :meth:`encode`; ``tile_size`` / ``tile_overlap`` in latent cells; the overlap
        is raised to the receptive field, which makes tiled and untiled results equal."""
        if z.ndim == 5:
            if z.shape[2] != 1:
                raise ValueError(f"expected image latents (one frame), got {z.shape[2]} frames.")
            z = z[:, :, 0]
        if z.ndim != 4 or z.shape[1] != self.z_dim:
            raise ValueError(f"latents must be [B, {self.z_dim}, h, w] (got shape {tuple(z.shape)}).")
        if 0 in z.shape:
            raise ValueError(f"VAE decode got an empty latent batch (shape {tuple(z.shape)}).")
        factor = self.spatial_factor
        height, width = z.shape[2] * factor, z.shape[3] * factor
        overlap = max(self.decode_min_overlap, tile_overlap or 0)
        with torch.no_grad():
            z = z.to(device=self.device, dtype=self.dtype).contiguous(memory_format=torch.channels_last)
            x = self._dispatch(
                z, tiled, tile_size or self.default_decode_tile, self.min_decode_tile, 1, progress,
                estimate=lambda n: self.estimate_decode_bytes(n, height, width),
                untiled=lambda latents: self._decode_tail(self._decode_trunk(latents, options)),
                tiled_fn=lambda latents, size, step: self._decode_tiled(latents, size, overlap, step, options))
            x = x.clamp_(-1.0, 1.0).add_(1.0).mul_(0.5)
        return x.permute(0, 2, 3, 1).float().contiguous()

    def _decode_tiled(self, z: torch.Tensor, tile: int, overlap: int, step: Callable[[], None],
                      options: Options | None) -> torch.Tensor:
        features = self._decode_trunk(z, options)
        tiles = plan_tiles(z.shape[2], z.shape[3], tile, overlap)
        return run_tiled(self._decode_tail, features, tiles, (self.spatial_factor, 1), step)

    # -- tiling policy -----------------------------------------------------------------------------------------
    def _dispatch(self, x: torch.Tensor, tiled: bool | None, tile: int, min_tile: int, align: int,
                  progress: Progress | None, *,
                  estimate: Callable[[int], int], untiled: Callable[[torch.Tensor], torch.Tensor],
                  tiled_fn: Callable[[torch.Tensor, int, Callable[[], None]], torch.Tensor]) -> torch.Tensor:
        """Run ``untiled`` on batch chunks that fit the memory budget, else ``tiled_fn`` image by image.

        Out of memory untiled falls back to tiling; out of memory tiled halves the tile size (down to
        ``min_tile``, keeping multiples of ``align``) and starts over.
        """
        batch = x.shape[0]
        if tiled is not True:
            per_call = batch
            if tiled is None:
                budget = self._budget(x.device)
                per_call = batch if estimate(batch) <= budget else (1 if estimate(1) <= budget else 0)
            if per_call:
                try:
                    return _in_chunks(untiled, x, per_call, progress)
                except RuntimeError as error:
                    if tiled is False or not _is_out_of_memory(error):
                        raise
                _release_cached_memory(x.device)
        while True:
            try:
                return self._tiled_batch(x, tile, tiled_fn, progress)
            except RuntimeError as error:
                if tile // 2 < min_tile or not _is_out_of_memory(error):
                    raise
            _release_cached_memory(x.device)
            tile = _round_up(tile // 2, align)

    @staticmethod
    def _tiled_batch(x: torch.Tensor, tile: int, tiled_fn, progress: Progress | None) -> torch.Tensor:
        """Tile each image of the batch; ``progress`` counts tiles over the whole batch."""
        per_image = len(plan_tiles(x.shape[2], x.shape[3], tile, 0))
        total, done = per_image * x.shape[0], 0

        def step() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        return torch.cat([tiled_fn(x[i:i + 1], tile, step) for i in range(x.shape[0])])


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int,
               progress: Progress | None) -> torch.Tensor:
    chunks = x.split(size)
    outputs = []
    for index, chunk in enumerate(chunks):
        outputs.append(fn(chunk))
        if progress is not None:
            progress(index + 1, len(chunks))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _is_out_of_memory(error: RuntimeError) -> bool:
    """torch.OutOfMemoryError (CUDA and other accelerators), or the CPU allocator's plain RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(error)


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
