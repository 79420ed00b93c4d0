"""The Qwen-Image VAE (Wan 2.1 architecture) for single images, in pure torch.

The Wan VAE is a causal video VAE; Qwen-Image only ever feeds it one frame, and a batch of images is a batch of
independent one-frame videos (never one video: the host's own VAE gets that wrong).  For one frame every causal
3D convolution sees ``kernel_t - 1`` zero frames in front of the data, so it equals a 2D convolution with the last
temporal slice of its kernel; the temporal down/upsampling convolutions (``time_conv``) are skipped for the first
frame of a video and never run.  This module computes exactly that in 2D (channels-last), while keeping every
parameter with the name and shape stored in the checkpoints (original Wan names, as in ComfyUI's
``qwen_image_vae.safetensors``), so files map 1:1 and a host's weight patching / offloading applies unchanged.
Memory: the unused temporal taps stay loaded (3x3x3 kernels are kept whole and the ``time_conv`` weights too: 82 M
of the 127 M parameters, ~314 MB in fp32 / ~157 MB in bf16); the slice is taken at compute time (a copy of one
layer's slice at a time).

Public API::

    vae = load_vae(path, dtype=torch.float32, device="cpu", ops=None)
    z = vae.encode(images)          # [B, H, W, 3] in 0..1 -> [B, 16, H/8, W/8] latent mean (not normalized)
    images = vae.decode(z)          # -> [B, H, W, 3] in 0..1  (RGBA: 4 channels in and out, the Layered VAE)
    vae.normalize(z), vae.denormalize(z)

Large images are tiled (see :mod:`models.common.tiling`): automatically when the untiled call would not fit in the
free memory of the device or runs out of memory, or on request (``tiled=True``).  Only the convolutional part is
tiled, with a context margin that covers its receptive field; the attention runs on the whole latent, so tiled
results equal untiled ones up to float rounding (no seams).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..common.attention import Options, attention
from ..common.ops import CastOps
from ..common.tiled_vae import TiledVAE
from ..io.loading import materialize, open_weights
from ..io.weights import WeightFileError
from ..registry import identify
from .latent import QWEN_IMAGE_LATENT
from .vae_keys import diffusers_to_wan

__all__ = ["QwenImageVAE", "load_vae"]

SPATIAL_FACTOR = QWEN_IMAGE_LATENT.spatial_factor
EXPECTED_FILE = "qwen_image_vae.safetensors in models/vae"

# Context each tile needs beyond its core so that tiling is exact: the receptive field of the local (tiled) part.
# Decoder tail (latent units): 6 convs at 1x, 1+6 at 2x, 1+6 at 4x, 1+6+1 at 8x -> 6 + 3.5 + 1.75 + 1 = 12.25.
DECODE_MIN_OVERLAP = 13
# Encoder front (pixels): 5 convs at 1x, then 4 per level at 2x/4x/8x, each stride-2 conv halving the damage
# (plus the one-pixel right/bottom zero pad): at most 9 latent rows = 72 px (tiles are bitwise equal from there).
ENCODE_MIN_OVERLAP = 72
DEFAULT_DECODE_TILE = 64   # latent units (512 px cores)
DEFAULT_ENCODE_TILE = 512  # pixels
MIN_DECODE_TILE = 16
MIN_ENCODE_TILE = 128

# Peak activation bytes of an untiled call, per (pixel x base_dim x element size): bench/bench_vae.py measured
# 2.9 (latent stage included) for decode at 1328 and 2048 px and encode at 2048 px (fp32, CPU); 4 leaves headroom
# (a CPU process that overshoots is killed, it gets no exception to fall back on).
_ACTIVATION_BYTES_FACTOR = 4.0
# Attention scores of one query chunk are kept under this many elements (bounded memory whatever the backend).
_ATTENTION_SCORE_ELEMENTS = 1 << 28



# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------
_LAYER_CLASSES: dict[int, tuple[type, type]] = {}


def _layer_classes(ops) -> tuple[type, type]:
    """The single-frame causal conv and the fused upsampling conv, built on ``ops`` (cached per namespace).

    Both override ``_conv_forward(x, weight, bias)``: torch's and ComfyUI's conv layers cast / patch / offload
    the weight in ``forward`` and then call it, so the host's machinery keeps working.
    """
    key = id(ops)
    if key not in _LAYER_CLASSES:

        class FrameConv(ops.Conv3d):
            """A causal 3D conv applied to one frame: a 2D conv with the kernel's last temporal slice."""

            def __init__(self, in_ch: int, out_ch: int, kernel: int, padding: int = 0, **factory):
                super().__init__(in_ch, out_ch, kernel, **factory)
                self.spatial_padding = padding

            def _conv_forward(self, x, weight, bias):
                return F.conv2d(x, weight[:, :, -1], bias, 1, self.spatial_padding)

        class UpsampleConv(ops.Conv2d):
            """Nearest 2x upsampling followed by a 3x3 conv (padding 1), fused into one stride-2 transposed conv.

            Along each axis, output ``2i`` sees ``w0 x[i-1] + (w1 + w2) x[i]`` and ``2i+1`` sees
            ``(w0 + w1) x[i] + w2 x[i+1]``: a 4-tap transposed-conv kernel ``[w2, w1+w2, w0+w1, w0]``.  Same maths
            (up to float summation order), 4/9 of the multiply-adds, and no 4x-sized upsampled tensor in memory.
            """

            def _conv_forward(self, x, weight, bias):
                combine = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
                                       device=weight.device)
                kernel = torch.einsum("ai,bj,ocij->coab", combine, combine, weight.float()).to(x.dtype)
                return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)

        _LAYER_CLASSES[key] = (FrameConv, UpsampleConv)
    return _LAYER_CLASSES[key]


class RMSNorm(nn.Module):
    """L2-normalise over channels, times ``sqrt(C) * gamma`` (per pixel: no spatial statistics)."""

    def __init__(self, dim: int, gamma_shape: tuple[int, ...], device=None, dtype=None):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.empty(gamma_shape, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        # The norm in fp32 (as the reference does for half types); eps as F.normalize.
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        inverse = (self.scale / norm.clamp_min_(1e-12)).to(x.dtype)
        gamma = self.gamma.to(device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
        return (x.mul_(inverse) if inplace else x * inverse).mul_(gamma)


class ResidualBlock(nn.Module):
    """norm, SiLU, conv, norm, SiLU, conv, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_dim: int, out_dim: int, ops, device=None, dtype=None):
        super().__init__()
        conv, _ = _layer_classes(ops)
        factory = {"device": device, "dtype": dtype}
        # Indexed like the original nn.Sequential(norm, SiLU, conv, norm, SiLU, Dropout, conv): the stored names
        # are residual.{0,2,3,6}; positions 1, 4, 5 hold no weights.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, (in_dim, 1, 1, 1), **factory), nn.SiLU(), conv(in_dim, out_dim, 3, padding=1, **factory),
            RMSNorm(out_dim, (out_dim, 1, 1, 1), **factory), nn.SiLU(), nn.Identity(),
            conv(out_dim, out_dim, 3, padding=1, **factory))
        self.shortcut = conv(in_dim, out_dim, 1, **factory) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x), inplace=True))
        h = conv2(F.silu(norm2(h, inplace=True), inplace=True))
        return h.add_(x if self.shortcut is None else self.shortcut(x))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Options | None) -> torch.Tensor:
    """Single-head softmax attention [B, N, C], queries in chunks so the score matrix stays bounded."""
    q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    chunk = max(1, _ATTENTION_SCORE_ELEMENTS // k.shape[2])
    if chunk >= q.shape[2]:
        return attention(q, k, v, options=options).squeeze(1)
    out = q.new_empty(q.shape)
    for start in range(0, q.shape[2], chunk):
        out[:, :, start:start + chunk] = attention(q[:, :, start:start + chunk], k, v, options=options)
    return out.squeeze(1)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels of one frame, with a residual connection."""

    def __init__(self, dim: int, ops, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(dim, (dim, 1, 1), device=device, dtype=dtype)
        self.to_qkv = ops.Conv2d(dim, dim * 3, 1, device=device, dtype=dtype)
        self.proj = ops.Conv2d(dim, dim, 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        # Channels-last: q, k, v are strided views of one [B, N, 3C] tensor; attention reads them without copies.
        qkv = self.to_qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, 3 * c)
        out = _attention(*qkv.chunk(3, dim=-1), options).reshape(b, h, w, c).permute(0, 3, 1, 2)
        del qkv
        return self.proj(out).add_(x)


class Resample(nn.Module):
    """Spatial 2x down- or upsampling.  ``*3d`` modes also hold a ``time_conv``, which a first frame never uses."""

    def __init__(self, dim: int, mode: str, ops, device=None, dtype=None):
        super().__init__()
        _, upsample_conv = _layer_classes(ops)
        factory = {"device": device, "dtype": dtype}
        self.upsample = mode.startswith("up")
        # Stored as resample.1; position 0 was the nn.Upsample / nn.ZeroPad2d of the original.
        if self.upsample:
            self.resample = nn.Sequential(nn.Identity(), upsample_conv(dim, dim // 2, 3, **factory))
        else:
            self.resample = nn.Sequential(nn.Identity(), ops.Conv2d(dim, dim, 3, stride=2, **factory))
        if mode == "upsample3d":
            self.time_conv = ops.Conv3d(dim, dim * 2, (3, 1, 1), **factory)
        elif mode == "downsample3d":
            self.time_conv = ops.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            return self.resample[1](x)
        # Zero pad right and bottom by one, then a 3x3 stride-2 conv without padding.
        return self.resample[1](F.pad(x, (0, 1, 0, 1)))


def _middle(dim: int, ops, factory: dict) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, ops, **factory), AttentionBlock(dim, ops, **factory),
                         ResidualBlock(dim, dim, ops, **factory))


def _run_middle(middle: nn.Sequential, x: torch.Tensor, options: Options | None) -> torch.Tensor:
    first, attend, last = middle
    return last(attend(first(x), options))


def _head(dim: int, out_ch: int, ops, factory: dict) -> nn.Sequential:
    conv, _ = _layer_classes(ops)
    # Stored as head.0 (norm) and head.2 (conv); position 1 was the SiLU.
    return nn.Sequential(RMSNorm(dim, (dim, 1, 1, 1), **factory), nn.SiLU(), conv(dim, out_ch, 3, padding=1, **factory))


def _run_head(head: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    norm, _, conv = head
    return conv(F.silu(norm(x, inplace=True), inplace=True))


class Encoder(nn.Module):
    """Pixels -> 2 x z_dim moments at 1/8 resolution: residual levels with stride-2 downsampling, middle, head."""

    def __init__(self, dim: int, out_ch: int, dim_mult, num_res_blocks: int, temporal, ops, image_channels: int = 3,
                 device=None, dtype=None):
        super().__init__()
        conv, _ = _layer_classes(ops)
        factory = {"device": device, "dtype": dtype}
        dims = [dim * m for m in [1, *dim_mult]]
        self.conv1 = conv(image_channels, dims[0], 3, padding=1, **factory)
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, ops, **factory))
                in_dim = out_dim
            if level != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temporal[level] else "downsample2d", ops, **factory))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1], ops, factory)
        self.head = _head(dims[-1], out_ch, ops, factory)

    def local_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] -> features at latent resolution (convolutions only: tileable)."""
        x = self.conv1(x)
        for block in self.downsamples:
            x = block(x)
        return x

    def finish(self, x: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        """Latent-resolution features -> mean and log-variance (contains the global attention)."""
        return _run_head(self.head, _run_middle(self.middle, x, options))


class Decoder(nn.Module):
    """Latents -> pixels: middle, residual levels with 2x upsampling, head."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temporal, ops, image_channels: int = 3,
                 device=None, dtype=None):
        super().__init__()
        conv, _ = _layer_classes(ops)
        factory = {"device": device, "dtype": dtype}
        dims = [dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv1 = conv(z_dim, dims[0], 3, padding=1, **factory)
        self.middle = _middle(dims[0], ops, factory)
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2  # the previous upsampler halved the channels
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, ops, **factory))
                in_dim = out_dim
            if level != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal[level] else "upsample2d", ops, **factory))
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], image_channels, ops, factory)

    def trunk(self, z: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        """Latents -> latent-resolution features (contains the global attention)."""
        return _run_middle(self.middle, self.conv1(z), options)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Latent-resolution features -> pixels in [-1, 1]-ish (convolutions only: tileable)."""
        for block in self.upsamples:
            x = block(x)
        return _run_head(self.head, x)


# ---------------------------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------------------------
class QwenImageVAE(TiledVAE):
    """Qwen-Image / Wan 2.1 VAE for single images.  Parameters carry the original Wan names.

    ``dtype`` is the compute dtype (inputs are cast to it; ``ops`` layers cast their weights to it, so weights may
    be stored in another dtype).  ``memory_budget`` (callable ``device -> bytes`` or ``None``) decides automatic
    tiling; by default the device's free memory (CUDA) or available RAM (CPU).  ``image_channels``: 3 (RGB), or 4
    for the Qwen-Image-Layered RGBA VAE.
    """

    spatial_factor = SPATIAL_FACTOR
    encode_min_overlap, decode_min_overlap = ENCODE_MIN_OVERLAP, DECODE_MIN_OVERLAP
    default_encode_tile, default_decode_tile = DEFAULT_ENCODE_TILE, DEFAULT_DECODE_TILE
    min_encode_tile, min_decode_tile = MIN_ENCODE_TILE, MIN_DECODE_TILE

    def __init__(self, base_dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 temporal_downsample=(False, True, True), ops=None, device=None, dtype=None, image_channels: int = 3):
        super().__init__()
        ops = ops or CastOps
        conv, _ = _layer_classes(ops)
        factory = {"device": device, "dtype": dtype}
        self.base_dim, self.z_dim, self.image_channels = base_dim, z_dim, image_channels
        self.dtype = dtype or torch.float32
        self.encoder = Encoder(base_dim, 2 * z_dim, dim_mult, num_res_blocks, temporal_downsample, ops,
                               image_channels, **factory)
        self.conv1 = conv(2 * z_dim, 2 * z_dim, 1, **factory)
        self.conv2 = conv(z_dim, z_dim, 1, **factory)
        self.decoder = Decoder(base_dim, z_dim, dim_mult, num_res_blocks, temporal_downsample[::-1], ops,
                               image_channels, **factory)
        self.memory_budget: Callable[[torch.device], int] | None = None

    # -- placement ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    # -- latent normalisation ----------------------------------------------------------------------------------
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the diffusion model's latent space: ``(z - mean) / std`` per channel (dim 1)."""
        return QWEN_IMAGE_LATENT.normalize(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: ``z * std + mean``."""
        return QWEN_IMAGE_LATENT.denormalize(z)

    # -- memory estimates --------------------------------------------------------------------------------------
    def _element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _latent_stage_bytes(self, batch: int, height: int, width: int) -> int:
        """Activations of the global (latent-resolution) part: ~10 tensors of 4 x base_dim channels."""
        pixels = batch * (height // SPATIAL_FACTOR) * (width // SPATIAL_FACTOR)
        return 10 * 4 * self.base_dim * pixels * self._element_size()

    def _estimate_bytes(self, batch: int, height: int, width: int) -> int:
        local = _ACTIVATION_BYTES_FACTOR * self.base_dim * batch * height * width * self._element_size()
        return int(local) + self._latent_stage_bytes(batch, height, width)

    def estimate_decode_bytes(self, batch: int, height: int, width: int) -> int:
        """Peak activation bytes of an untiled decode to ``batch`` images of ``height`` x ``width`` pixels."""
        return self._estimate_bytes(batch, height, width)

    def estimate_encode_bytes(self, batch: int, height: int, width: int) -> int:
        """Peak activation bytes of an untiled encode of ``batch`` images of ``height`` x ``width`` pixels."""
        return self._estimate_bytes(batch, height, width)

    # -- the network's parts, for the tiled front ends of TiledVAE ---------------------------------------------
    def _channels(self, images: torch.Tensor) -> torch.Tensor:
        """The image channels this VAE encodes: RGB, or RGBA (an RGB image gets an opaque alpha channel)."""
        if images.ndim != 4 or images.shape[-1] < 3:
            raise ValueError(f"images must be [B, H, W, 3] (got shape {tuple(images.shape)}).")
        if self.image_channels == 4 and images.shape[-1] == 3:
            return torch.cat([images, torch.ones_like(images[..., :1])], dim=-1)
        return images[..., :self.image_channels]

    def _encode_local(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.local_features(x)

    def _encode_finish(self, features: torch.Tensor, options: Options | None) -> torch.Tensor:
        return self.conv1(self.encoder.finish(features, options))[:, :self.z_dim]

    def _decode_trunk(self, z: torch.Tensor, options: Options | None) -> torch.Tensor:
        return self.decoder.trunk(self.conv2(z), options)

    def _decode_tail(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder.tail(features)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, *, device: str | torch.device = "cpu",
             ops=None) -> QwenImageVAE:
    """Load the Qwen-Image VAE from a ComfyUI single file (original Wan names), a diffusers ``vae`` folder
    (``config.json`` + ``diffusion_pytorch_model.safetensors``, or the pipeline folder holding it) or a single
    diffusers-named file (the 1.x family's loader; :func:`models.load_vae` loads either family).

    Weights are stored and computed in ``dtype`` (bf16 / fp16 / fp32 files accepted).  ``ops`` is the layer
    namespace (default :class:`models.common.ops.CastOps`).  Other VAEs (SD / SDXL / Flux, Wan 2.2, the RGBA and
    2.1 VAEs) and non-VAE files are refused with a :class:`~models.io.weights.WeightFileError` naming them.
    """
    weights = open_weights(path, "vae")
    identity = identify(weights.tensors)
    if not (identity.family == "qwen_image" and identity.role == "vae" and identity.supported):
        found = identity.description if identity.role == "vae" else f"no VAE tensors ({identity.description})"
        raise WeightFileError(
            f"{weights.source}: found {found}. This loader needs the Qwen-Image VAE (Wan 2.1 architecture, "
            f"{QWEN_IMAGE_LATENT.channels} latent channels, 3D convolutions): {EXPECTED_FILE}, a diffusers "
            "'vae' folder of Qwen-Image, or the Qwen-Image-Layered RGBA VAE. Pick that file instead.")
    prefix = identity.prefix

    def rename(name: str) -> str | None:
        if not name.startswith(prefix):
            return name  # reported as unexpected by assign_weights
        name = name[len(prefix):]
        return diffusers_to_wan(name) if identity.layout == "diffusers" else name

    wan_shapes = {rename(name): weights.tensors.shape(name) for name in weights.tensors}
    config = {
        "image_channels": wan_shapes["encoder.conv1.weight"][1],
        "base_dim": wan_shapes["encoder.conv1.weight"][0],
        "z_dim": wan_shapes["conv2.weight"][0],
        "temporal_downsample": tuple(f"encoder.downsamples.{i}.time_conv.weight" in wan_shapes for i in (2, 5, 8)),
    }
    with torch.device("meta"):
        model = QwenImageVAE(**config, ops=ops, dtype=dtype)
    materialize(model, weights.tensors, dtype=dtype, rename=rename,
                what=f"{weights.source} (loaded as the Qwen-Image VAE, expected {EXPECTED_FILE})")
    return model.to(device)
