"""The Qwen-Image 2.1 VAE (64 latent channels, 16x, RGBA) for single images, in pure torch.

It is Wan 2.2's residual VAE layout cut to one frame, with a temporal kernel of 1: five levels (widths
``base_dim * (1, 2, 4, 8, 8)`` in the encoder, ``decoder_base_dim * (8, 8, 4, 2, 1)`` in the decoder), each a
stack of residual blocks (channel RMS norm, SiLU, 3x3 convs) with a 2x resampling conv, plus a parameter-free
shortcut around the level: the encoder's folds 2x2 pixels into channels and averages channel groups, the decoder's
duplicates channels and unfolds them into 2x2 pixels.  The only attention is the single-head one in each middle
block.  Images are RGBA in and out (an RGB input gets an opaque alpha).

What the video design leaves on one frame: the temporal resampling convolutions (``time_conv``) never run on a
first frame, so they are not loaded; but the shortcuts of the levels that halved / doubled time still fold a time
axis.  Going down, the reference pads the frame with a zero frame in front, so those shortcuts average zeros in
(every other output channel is zero); going up, of the two frames a shortcut makes only the second is kept.  Both
are computed exactly so below.

Parameters carry the diffusers names (a Comfy-Org single file is renamed on load, see :mod:`.vae_keys`).

Public API::

    vae = load_vae_2_1(path, dtype=torch.float32, device="cpu", ops=None)
    z = vae.encode(images)          # [B, H, W, 3 or 4] in 0..1 -> [B, 64, H/16, W/16] latent mean (not normalized)
    images = vae.decode(z)          # -> [B, H, W, 4] in 0..1
    vae.normalize(z), vae.denormalize(z)

Large images are tiled (see :mod:`models.common.tiling`) automatically when the untiled call would not fit in the
free memory of the device or runs out of memory, or on request (``tiled=True``).  Only the convolutional part at
more than latent resolution is tiled, with a context margin that covers its receptive field; the rest (the levels at
latent resolution and the attention) runs on the whole latent, so tiled results equal untiled ones up to float
rounding (no seams).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..common.attention import Options
from ..common.ops import CastOps
from ..common.tiled_vae import TiledVAE
from ..io.loading import materialize, open_weights
from ..io.weights import WeightFileError, tensor_dtype, tensor_shape
from ..qwen_image.vae import AttentionBlock, RMSNorm, _layer_classes
from ..registry import identify, refusal
from .latent import QWEN_IMAGE_2_1_LATENT
from .vae_keys import diffusers_to_comfy

__all__ = ["QwenImage21VAE", "load_vae_2_1", "DECODE_MIN_OVERLAP", "ENCODE_MIN_OVERLAP"]

SPATIAL_FACTOR = QWEN_IMAGE_2_1_LATENT.spatial_factor
EXPECTED = "the Qwen-Image 2.1 VAE"
REQUIRED_KEYS = ("encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight", "quant_conv.weight",
                 "post_quant_conv.weight")

# Context each tile needs beyond its core so that tiling is exact: the receptive field of the tiled part.
# Decoder tail, walked back from the pixels (a nearest 2x upsampling halves a reach, rounding up): head + 6 convs at
# 16x, +1 (upsampling conv) -> 4 at 8x, +6+1 -> 6 at 4x, +6+1 -> 7 at 2x, +6+1 -> 7 at 1x, +6 -> 13 latent cells.
DECODE_MIN_OVERLAP = 13
# Encoder front, walked back from the latent: each stride-2 conv (zero pad right/bottom) maps a reach r to 2r + 1,
# each level adds 4 convs: 1 -> 5 at 1/8, 11 -> 15 at 1/4, 31 -> 35 at 1/2, 71 -> 75 (+1 conv_in) = 76 pixels,
# rounded up to whole latent cells.
ENCODE_MIN_OVERLAP = 80
DEFAULT_DECODE_TILE = 32   # latent cells (512 px cores)
DEFAULT_ENCODE_TILE = 512  # pixels
MIN_DECODE_TILE = 8
MIN_ENCODE_TILE = 128

# Peak activation bytes of an untiled call per (pixel x top-level width x element size), measured on scaled-down
# models (widths 16/24 and 32/48, fp32, CPU): tensors alive at once (torch.profiler) decode 5.0 (the last upsampling
# level hands twice the top width to the full-resolution level), encode 3.75; process RSS high-water 7.7-8.3 and
# 4.1-4.4 (oneDNN scratch, allocator fragmentation).  About 20% headroom on the latter: a CPU process that
# overshoots is killed, it gets no exception to fall back on.
_DECODE_BYTES_FACTOR = 10.0
_ENCODE_BYTES_FACTOR = 5.0


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """norm, SiLU, 3x3 conv, norm, SiLU, 3x3 conv, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_dim: int, out_dim: int, ops, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = RMSNorm(in_dim, (in_dim, 1, 1, 1), **factory)
        self.conv1 = ops.Conv2d(in_dim, out_dim, 3, padding=1, **factory)
        self.norm2 = RMSNorm(out_dim, (out_dim, 1, 1, 1), **factory)
        self.conv2 = ops.Conv2d(out_dim, out_dim, 3, padding=1, **factory)
        self.conv_shortcut = ops.Conv2d(in_dim, out_dim, 1, **factory) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h, inplace=True), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Resample(nn.Module):
    """2x resampling stored as ``resample.1``: down, zero pad right/bottom then a 3x3 stride-2 conv; up, nearest 2x
    then a 3x3 conv (one fused transposed conv, so position 0 holds nothing)."""

    def __init__(self, dim: int, up: bool, ops, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if up:
            _, upsample_conv = _layer_classes(ops)
            self.resample = nn.Sequential(nn.Identity(), upsample_conv(dim, dim, 3, **factory))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), ops.Conv2d(dim, dim, 3, stride=2, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


def _fold_down(x: torch.Tensor, out_channels: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """The encoder shortcut on one frame: [B, C, H, W] -> [B, out_channels, H / factor_s, W / factor_s].

    Folds each ``factor_s`` x ``factor_s`` patch into channels (``c * s * s + dy * s + dx``); a level that halved
    time also folds in the ``factor_t - 1`` zero frames the reference pads in front (channel order
    ``(c, t, dy, dx)``, the image at ``t = factor_t - 1``); then averages consecutive groups of channels down to
    ``out_channels``.
    """
    batch, channels, height, width = x.shape
    x = F.pixel_unshuffle(x, factor_s)
    if factor_t > 1:
        x = F.pad(x.reshape(batch, channels, 1, -1, *x.shape[2:]), (0, 0, 0, 0, 0, 0, factor_t - 1, 0))
    return x.reshape(batch, out_channels, -1, height // factor_s, width // factor_s).mean(2)


def _add_unfolded(out: torch.Tensor, x: torch.Tensor, factor_t: int) -> torch.Tensor:
    """Add the decoder shortcut of ``x`` [B, C, h, w] to ``out`` [B, O, 2h, 2w] in place, for one frame.

    The reference repeats every channel ``O * factor_t * 4 / C`` times and unfolds the result as ``(o, t, dy, dx)``;
    of the ``factor_t`` frames it makes, a first frame keeps the last.  So ``out[o]`` at offset ``(dy, dx)`` gets
    input channel ``(o * factor_t * 4 + (factor_t - 1) * 4 + dy * 2 + dx) // repeats``: one add per offset, on
    channels-last views (no full-size temporary).
    """
    channels = out.shape[1]
    repeats = channels * factor_t * 4 // x.shape[1]
    first = torch.arange(channels, device=x.device) * factor_t * 4 + (factor_t - 1) * 4
    target = out.permute(0, 2, 3, 1).unflatten(2, (-1, 2)).unflatten(1, (-1, 2))  # [B, h, dy, w, dx, O]
    source = x.permute(0, 2, 3, 1)
    for dy in range(2):
        for dx in range(2):
            target[:, :, dy, :, dx].add_(source.index_select(3, (first + dy * 2 + dx) // repeats))
    return out


class MidBlock(nn.Module):
    """Residual block, single-head attention over all pixels, residual block."""

    def __init__(self, dim: int, ops, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, ops, **factory), ResidualBlock(dim, dim, ops, **factory)])
        self.attentions = nn.ModuleList([AttentionBlock(dim, ops, **factory)])

    def forward(self, x: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x), options))


class DownBlock(nn.Module):
    """One encoder level's layers: residual blocks and an optional 2x downsampling (run by :class:`Encoder`)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool, ops,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.resnets = nn.ModuleList(ResidualBlock(in_dim if j == 0 else out_dim, out_dim, ops, **factory)
                                     for j in range(num_res_blocks))
        self.downsampler = Resample(out_dim, False, ops, **factory) if down else None
        self.out_dim, self.factor_t, self.factor_s = out_dim, 2 if temporal else 1, 2 if down else 1


class UpBlock(nn.Module):
    """One decoder level's layers: residual blocks and an optional 2x upsampling (run by :class:`Decoder`)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool, ops,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.resnets = nn.ModuleList(ResidualBlock(in_dim if j == 0 else out_dim, out_dim, ops, **factory)
                                     for j in range(num_res_blocks + 1))
        self.upsampler = Resample(out_dim, True, ops, **factory) if up else None
        self.factor_t = 2 if temporal else 1


def _head(norm: RMSNorm, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return conv(F.silu(norm(x, inplace=True), inplace=True))


class Encoder(nn.Module):
    """RGBA pixels -> 2 x z_dim moments at 1/16 resolution."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temporal, image_channels: int, ops,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        dims = [dim * m for m in (1, *dim_mult)]
        levels = len(dim_mult)
        self.conv_in = ops.Conv2d(image_channels, dims[0], 3, padding=1, **factory)
        self.down_blocks = nn.ModuleList(
            DownBlock(dims[i], dims[i + 1], num_res_blocks, i < levels - 1 and temporal[i], i < levels - 1, ops,
                      **factory) for i in range(levels))
        self.mid_block = MidBlock(dims[-1], ops, **factory)
        self.norm_out = RMSNorm(dims[-1], (dims[-1], 1, 1, 1), **factory)
        self.conv_out = ops.Conv2d(dims[-1], 2 * z_dim, 3, padding=1, **factory)

    def local_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B, C, H, W] -> latent-resolution features (the downsampling levels: tileable)."""
        return self._levels(self.conv_in(x), [block for block in self.down_blocks if block.downsampler is not None])

    def finish(self, x: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        """Latent-resolution features -> mean and log-variance (the last level, the middle with its attention)."""
        x = self._levels(x, [block for block in self.down_blocks if block.downsampler is None])
        return _head(self.norm_out, self.conv_out, self.mid_block(x, options))

    @staticmethod
    def _levels(x: torch.Tensor, blocks: list[DownBlock]) -> torch.Tensor:
        # One frame holds every level's tensors: a level's input is released as its first residual block runs
        # (its shortcut, smaller, is taken first).
        for block in blocks:
            shortcut = _fold_down(x, block.out_dim, block.factor_t, block.factor_s)
            for resnet in block.resnets:
                x = resnet(x)
            x = (x if block.downsampler is None else block.downsampler(x)).add_(shortcut)
        return x


class Decoder(nn.Module):
    """Latents -> RGBA pixels in [-1, 1] (before clamping)."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temporal, image_channels: int, ops,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        levels = len(dim_mult)
        self.conv_in = ops.Conv2d(z_dim, dims[0], 3, padding=1, **factory)
        self.mid_block = MidBlock(dims[0], ops, **factory)
        self.up_blocks = nn.ModuleList(
            UpBlock(dims[i], dims[i + 1], num_res_blocks, i < levels - 1 and temporal[i], i < levels - 1, ops,
                    **factory) for i in range(levels))
        self.norm_out = RMSNorm(dims[-1], (dims[-1], 1, 1, 1), **factory)
        self.conv_out = ops.Conv2d(dims[-1], image_channels, 3, padding=1, **factory)

    def trunk(self, z: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        """Latents -> latent-resolution features (contains the global attention)."""
        return self.mid_block(self.conv_in(z), options)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Latent-resolution features -> pixels (convolutions and shortcuts only: tileable)."""
        # One frame holds every level's tensors, so a level without upsampling keeps no copy of its input.
        for block in self.up_blocks:
            level_input = x if block.upsampler is not None else None
            for resnet in block.resnets:
                x = resnet(x)
            if level_input is not None:
                x = _add_unfolded(block.upsampler(x), level_input, block.factor_t)
        return _head(self.norm_out, self.conv_out, x)


# ---------------------------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------------------------
class QwenImage21VAE(TiledVAE):
    """Qwen-Image 2.1 VAE for single images, with diffusers parameter names.

    ``dtype`` is the compute dtype (inputs are cast to it; ``ops`` layers cast their weights to it, so weights may
    be stored in another dtype).  ``memory_budget`` (callable ``device -> bytes`` or ``None``) decides automatic
    tiling; by default the device's free memory (CUDA) or available RAM (CPU).  ``temporal_downsample``: which
    encoder levels halved time in the video design (it decides the shortcuts; the decoder mirrors it).
    """

    spatial_factor = SPATIAL_FACTOR
    encode_min_overlap, decode_min_overlap = ENCODE_MIN_OVERLAP, DECODE_MIN_OVERLAP
    default_encode_tile, default_decode_tile = DEFAULT_ENCODE_TILE, DEFAULT_DECODE_TILE
    min_encode_tile, min_decode_tile = MIN_ENCODE_TILE, MIN_DECODE_TILE

    def __init__(self, base_dim: int = 96, decoder_base_dim: int = 144, z_dim: int = 64,
                 dim_mult=(1, 2, 4, 8, 8), num_res_blocks: int = 2, temporal_downsample=(False, True, True, True),
                 image_channels: int = 4, ops=None, device=None, dtype=None):
        super().__init__()
        ops = ops or CastOps
        factory = {"device": device, "dtype": dtype}
        self.base_dim, self.decoder_base_dim, self.z_dim = base_dim, decoder_base_dim, z_dim
        self.image_channels, self.latent_width = image_channels, max(dim_mult) * max(base_dim, decoder_base_dim)
        self.dtype = dtype or torch.float32
        self.encoder = Encoder(base_dim, z_dim, dim_mult, num_res_blocks, temporal_downsample, image_channels, ops,
                               **factory)
        self.quant_conv = ops.Conv2d(2 * z_dim, 2 * z_dim, 1, **factory)
        self.post_quant_conv = ops.Conv2d(z_dim, z_dim, 1, **factory)
        self.decoder = Decoder(decoder_base_dim, z_dim, dim_mult, num_res_blocks, tuple(temporal_downsample)[::-1],
                               image_channels, ops, **factory)
        self.memory_budget: Callable[[torch.device], int] | None = None

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    # -- latent normalisation ----------------------------------------------------------------------------------
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the diffusion model's latent space: ``(z - mean) / std`` per channel (dim 1)."""
        return QWEN_IMAGE_2_1_LATENT.normalize(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: ``z * std + mean``."""
        return QWEN_IMAGE_2_1_LATENT.denormalize(z)

    # -- memory estimates --------------------------------------------------------------------------------------
    def _estimate_bytes(self, batch: int, height: int, width: int, per_pixel: float) -> int:
        """``per_pixel`` elements at full resolution plus ~10 latent-resolution tensors of the widest level."""
        element = torch.empty((), dtype=self.dtype).element_size()
        pixels = batch * height * width
        return int((per_pixel + 10 * self.latent_width / SPATIAL_FACTOR ** 2) * pixels) * element

    def estimate_decode_bytes(self, batch: int, height: int, width: int) -> int:
        """Peak activation bytes of an untiled decode to ``batch`` images of ``height`` x ``width`` pixels."""
        return self._estimate_bytes(batch, height, width, _DECODE_BYTES_FACTOR * self.decoder_base_dim)

    def estimate_encode_bytes(self, batch: int, height: int, width: int) -> int:
        """Peak activation bytes of an untiled encode of ``batch`` images of ``height`` x ``width`` pixels."""
        return self._estimate_bytes(batch, height, width, _ENCODE_BYTES_FACTOR * self.base_dim)

    # -- the network's parts, for the tiled front ends of TiledVAE ---------------------------------------------
    def _channels(self, images: torch.Tensor) -> torch.Tensor:
        """RGBA as the VAE takes it: an RGB image gets an opaque alpha channel."""
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ValueError(f"images must be [B, H, W, 3 or 4] (got shape {tuple(images.shape)}).")
        if images.shape[-1] == 3:
            return torch.cat([images, torch.ones_like(images[..., :1])], dim=-1)
        return images

    def _encode_local(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.local_features(x)

    def _encode_finish(self, features: torch.Tensor, options: Options | None) -> torch.Tensor:
        return self.quant_conv(self.encoder.finish(features, options))[:, :self.z_dim]

    def _decode_trunk(self, z: torch.Tensor, options: Options | None) -> torch.Tensor:
        return self.decoder.trunk(self.post_quant_conv(z), options)

    def _decode_tail(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder.tail(features)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
class _FrameAxisDropped(Mapping):
    """A checkpoint whose 5-D convolution weights with a temporal axis of length 1 (Comfy-Org files) read as the
    2-D weights they are; other tensors pass through.  Keeps the lazy ``shape`` / ``dtype`` queries."""

    def __init__(self, tensors: Mapping):
        self._tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        return tensor[:, :, 0] if tensor.ndim == 5 and tensor.shape[2] == 1 else tensor

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tensor_shape(self._tensors, name)
        return shape[:2] + shape[3:] if len(shape) == 5 and shape[2] == 1 else shape

    def dtype(self, name: str) -> torch.dtype:
        return tensor_dtype(self._tensors, name)


def load_vae_2_1(path: str | Path, dtype: torch.dtype = torch.float32, *, device: str | torch.device = "cpu",
                 ops=None) -> QwenImage21VAE:
    """Load the Qwen-Image 2.1 VAE from a diffusers ``vae`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``, or the pipeline folder holding it), a single file with diffusers names,
    or a Comfy-Org single file (Wan 2.2 names, see :mod:`.vae_keys`).  :func:`models.load_vae` dispatches 2.1
    files here.

    Weights are stored and computed in ``dtype`` (bf16 / fp16 / fp32 files accepted).  ``ops`` is the layer
    namespace (default :class:`models.common.ops.CastOps`).  Other files are refused with a
    :class:`~models.io.weights.WeightFileError` naming what they are.
    """
    weights = open_weights(path, "vae")
    identity = identify(weights.tensors)
    if (identity.family, identity.role) != ("qwen_image_2_1", "vae"):
        raise refusal(weights.source, identity, EXPECTED, REQUIRED_KEYS)
    return _build(weights.tensors, identity.prefix, dtype, device, ops, weights.source)


def _build(tensors: Mapping, prefix: str, dtype: torch.dtype, device: str | torch.device, ops,
           source: str) -> QwenImage21VAE:
    """The VAE from a checkpoint of either layout, its configuration read from tensor names and shapes."""
    view = _FrameAxisDropped(tensors)
    comfy = f"{prefix}encoder.conv1.weight" in tensors
    res_blocks = 0

    def stored(name: str) -> str:
        """The checkpoint's name of a model tensor (Comfy names of resample blocks depend on ``res_blocks``)."""
        return prefix + (diffusers_to_comfy(name, res_blocks) if comfy else name)

    def shape(name: str) -> tuple[int, ...] | None:
        return view.shape(stored(name)) if stored(name) in tensors else None

    while shape(f"encoder.down_blocks.0.resnets.{res_blocks}.norm1.gamma") is not None:
        res_blocks += 1
    missing = [stored(name) for name in REQUIRED_KEYS + ("decoder.conv_out.weight",) if shape(name) is None]
    if missing:
        raise WeightFileError(f"{source}: an incomplete Qwen-Image 2.1 VAE: {', '.join(missing)} missing.")
    conv_in = shape("encoder.conv_in.weight")
    widths = []
    while (level := shape(f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight")) is not None:
        widths.append(level[0])
    dim_mult = tuple(width // conv_in[0] for width in widths)
    config = {
        "base_dim": conv_in[0],
        "decoder_base_dim": shape("decoder.conv_out.weight")[1] // dim_mult[0],
        "z_dim": shape("post_quant_conv.weight")[0],
        "dim_mult": dim_mult,
        "num_res_blocks": res_blocks,
        "temporal_downsample": tuple(shape(f"encoder.down_blocks.{i}.downsampler.time_conv.weight") is not None
                                     for i in range(len(widths) - 1)),
        "image_channels": conv_in[1],
    }
    with torch.device("meta"):
        model = QwenImage21VAE(**config, ops=ops, dtype=dtype)
    # Comfy-Org names -> the model's; the temporal resampling convolutions never run on one frame: not loaded.
    renamed = {stored(name): name for name, _ in model.named_parameters()} if comfy else None

    def rename(name: str) -> str | None:
        if ".time_conv." in name:
            return None
        if not name.startswith(prefix):
            return name  # reported as unexpected by assign_weights
        return renamed.get(name, name) if renamed is not None else name[len(prefix):]

    return materialize(model, view, dtype=dtype, device=device, rename=rename,
                       what=f"{source} (loaded as {EXPECTED}, {'Comfy-Org' if comfy else 'diffusers'} names)")
