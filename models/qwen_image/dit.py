"""The Qwen-Image diffusion transformer (MMDiT with MSRoPE) in plain PyTorch.

Parameter names equal the diffusers ``QwenImageTransformer2DModel`` names (``transformer_blocks.N.attn.to_q``,
``img_mlp.net.0.proj``, ``norm_out.linear`` ...), so checkpoints and LoRAs map one to one.  The maths follows
diffusers (the reference the Qwen team recommends):

* double-stream blocks: per stream AdaLN modulation ``(shift, scale, gate) x 2`` from ``SiLU(temb)``, LayerNorm
  without affine (eps 1e-6), joint attention over ``[text, image]`` with per-head q/k RMSNorm and MSRoPE, GELU(tanh)
  MLPs;
* ``norm_out`` modulation is ``(scale, shift)``;
* timestep embedding: ``sinusoid(1000 * sigma)`` (256 dims, cos first) -> Linear -> SiLU -> Linear;
* Edit-2511 ``zero_cond_t``: reference-image tokens are modulated with the embedding of ``t = 0``;
* Layered (``additional_t_cond`` + ``layer3d_rope``): an embedding of a condition index is added to the timestep
  embedding, the target latent has several frames (the whole image, then the layers), and the condition image
  (the last reference) sits at frame -1 of the RoPE.

fp16: Qwen's residual streams reach about 2e7, far beyond fp16's 65504 (black images when clamped or overflowed).
In fp16 the matmuls, norms' inputs and attention run in fp16 while the residual streams, the modulation and the
gated additions stay in fp32 (:attr:`QwenImageDiT.stream_dtype`); in bf16 / fp32 both are the compute dtype.

The model runs in ``compute_dtype``; layers come from an injectable ``ops`` namespace that casts stored weights
per layer (fp8 weights stay fp8 in memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..common.attention import Options, attention
from ..common.latent_spec import pack_latent, unpack_latent
from ..common.ops import CastOps
from .eligen import Entities, entity_attention_mask, entity_rope, region_tokens
from .rope import MSRoPE, apply_rope, split_rope

__all__ = ["DiTConfig", "DoubleStreamTrunk", "QwenImageDiT", "pack_latent", "unpack_latent", "joint_attention_mask",
           "BlockPatch", "BlockCall", "BLOCK_HOOK"]

_EPS = 1e-6
# ``patch(block_index, target_image_tokens) -> residual or None``, run after each DiT block.
BlockPatch = Callable[[int, torch.Tensor], "torch.Tensor | None"]
# Run-options key of a block hook: ``hook(call: BlockCall) -> (img, txt)`` runs instead of every block call, so a
# host can replace, wrap or follow blocks (ComfyUI's patches_replace / double_block patches).
BLOCK_HOOK = "qip_block_hook"


@dataclass
class BlockCall:
    """One block's call as a hook sees it.  ``run(img, txt, temb, rope) -> (img, txt)`` runs the block (it updates
    ``img`` and ``txt`` in place); ``temb`` is SiLU of the timestep embedding ``vec`` (one row block per token
    segment; the modulation layers read ``temb``), ``rope`` the rotation table of the joint sequence."""

    index: int
    img: torch.Tensor
    txt: torch.Tensor
    temb: torch.Tensor
    rope: torch.Tensor
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    vec: torch.Tensor | None = None


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a Qwen-Image DiT (defaults: the real 20 B model)."""

    depth: int = 60
    heads: int = 24
    head_dim: int = 128
    in_channels: int = 64
    out_channels: int = 16
    joint_dim: int = 3584
    axes_dim: tuple[int, int, int] = (16, 56, 56)
    zero_cond_t: bool = False
    additional_t_cond: bool = False  # Layered: Embedding(2, width) of a condition index added to the timestep's
    layer3d_rope: bool = False  # Layered: frames are layers, the last reference is the condition at frame -1
    patch_size: int = 2
    rope_theta: float = 10000.0

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


def timestep_sinusoid(sigma: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """``[cos, sin]`` of ``1000 * sigma * 10000 ** (-k / (dim/2))`` in float32 (reference operation order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    angle = (sigma.float()[:, None] * freqs[None, :]) * 1000.0
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)


def joint_attention_mask(context_mask: torch.Tensor | None, image_tokens: int,
                         device: torch.device) -> torch.Tensor | None:
    """Boolean SDPA mask ``[B, 1, 1, L_text + image_tokens]`` hiding padded text tokens (``context_mask`` 1 keep,
    0 padding); ``None`` when nothing is padded."""
    if context_mask is None:
        return None
    keep = context_mask.to(device=device, dtype=torch.bool)
    if bool(keep.all()):
        return None
    return torch.cat([keep, keep.new_ones(keep.shape[0], image_tokens)], dim=1)[:, None, None, :]


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, ops, device=None, dtype=None):
        super().__init__()
        self.linear_1 = ops.Linear(256, width, bias=True, device=device, dtype=dtype)
        self.linear_2 = ops.Linear(width, width, bias=True, device=device, dtype=dtype)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(sinusoid)))


class TimeTextEmbed(nn.Module):
    """Container that keeps the reference names ``time_text_embed.timestep_embedder`` and (Layered)
    ``time_text_embed.addition_t_embedding``."""

    def __init__(self, width: int, ops, additional_t_cond: bool = False, device=None, dtype=None):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(width, ops, device=device, dtype=dtype)
        if additional_t_cond:
            self.addition_t_embedding = ops.Embedding(2, width, device=device, dtype=dtype)


class GeluProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, ops, device=None, dtype=None):
        super().__init__()
        self.proj = ops.Linear(dim_in, dim_out, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``net.0.proj`` (GELU tanh) -> ``net.2``; index 1 (dropout in the reference) holds no weights."""

    def __init__(self, width: int, ops, device=None, dtype=None):
        super().__init__()
        self.net = nn.ModuleDict({
            "0": GeluProjection(width, 4 * width, ops, device=device, dtype=dtype),
            "2": ops.Linear(4 * width, width, bias=True, device=device, dtype=dtype),
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net["2"](self.net["0"](x))


class JointAttention(nn.Module):
    """Joint attention of the text and image streams, each with its own projections and q/k RMSNorm."""

    def __init__(self, config: DiTConfig, ops, device=None, dtype=None):
        super().__init__()
        width, head_dim = config.width, config.head_dim
        self.heads = config.heads

        def linear():
            return ops.Linear(width, width, bias=True, device=device, dtype=dtype)

        def rms():
            return ops.RMSNorm(head_dim, eps=_EPS, device=device, dtype=dtype)

        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        self.add_q_proj, self.add_k_proj, self.add_v_proj = linear(), linear(), linear()
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = rms(), rms(), rms(), rms()
        self.to_out = nn.ModuleList([linear()])
        self.to_add_out = linear()

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                options: Options | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, text_len, image_len = img.shape[0], txt.shape[1], img.shape[1]
        heads = (self.heads, -1)
        # q, k, v are written straight into [B, H, L, D] buffers (SDPA is fastest on contiguous heads-first
        # inputs), text first; RoPE is applied while writing, so no separate concatenation pass is needed.
        q, k, v = (img.new_empty(batch, self.heads, text_len + image_len, img.shape[-1] // self.heads)
                   for _ in range(3))
        q_view, k_view, v_view = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        txt_rope, img_rope = split_rope(rope, text_len)
        apply_rope(self.norm_added_q(self.add_q_proj(txt).unflatten(-1, heads)), txt_rope, q_view[:, :text_len])
        apply_rope(self.norm_q(self.to_q(img).unflatten(-1, heads)), img_rope, q_view[:, text_len:])
        apply_rope(self.norm_added_k(self.add_k_proj(txt).unflatten(-1, heads)), txt_rope, k_view[:, :text_len])
        apply_rope(self.norm_k(self.to_k(img).unflatten(-1, heads)), img_rope, k_view[:, text_len:])
        v_view[:, :text_len] = self.add_v_proj(txt).unflatten(-1, heads)
        v_view[:, text_len:] = self.to_v(img).unflatten(-1, heads)
        del q_view, k_view, v_view
        out = attention(q, k, v, mask=mask, options=options).transpose(1, 2)  # [B, L, H, D]
        del q, k, v
        return self.to_out[0](out[:, text_len:].flatten(2)), self.to_add_out(out[:, :text_len].flatten(2))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with one ``(shift, scale)`` row per token segment (``scale`` holds 1 + scale)."""
    if len(sizes) == 1:
        return torch.addcmul(shift[0], x, scale[0])
    parts = x.split(list(sizes), dim=1)
    return torch.cat([torch.addcmul(sh, part, sc) for part, sh, sc in zip(parts, shift, scale)], dim=1)


def _gated_add_(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, sizes: Sequence[int]) -> None:
    """``x += gate * y`` in place, one gate row per token segment."""
    if len(sizes) == 1:
        x.addcmul_(gate[0], y)
        return
    for x_part, g, y_part in zip(x.split(list(sizes), dim=1), gate, y.split(list(sizes), dim=1)):
        x_part.addcmul_(g, y_part)


def _mod_params(linear: nn.Module, silu_temb: torch.Tensor, segments: int,
                stream_dtype: torch.dtype) -> list[torch.Tensor]:
    """``Linear(SiLU(temb))`` split into ``shift1, 1+scale1, gate1, shift2, 1+scale2, gate2``, each
    ``[segments, B, 1, D]`` in ``stream_dtype`` (rows of ``temb`` are segment-major)."""
    params = linear(silu_temb).to(stream_dtype)
    params = params.view(segments, params.shape[0] // segments, 1, params.shape[-1])
    shift1, scale1, gate1, shift2, scale2, gate2 = params.chunk(6, dim=-1)
    return [shift1, scale1 + 1, gate1, shift2, scale2 + 1, gate2]


class DoubleStreamBlock(nn.Module):
    def __init__(self, config: DiTConfig, ops, device=None, dtype=None):
        super().__init__()
        width = config.width
        self.img_mod = nn.Sequential(nn.SiLU(), ops.Linear(width, 6 * width, bias=True, device=device, dtype=dtype))
        self.txt_mod = nn.Sequential(nn.SiLU(), ops.Linear(width, 6 * width, bias=True, device=device, dtype=dtype))
        self.attn = JointAttention(config, ops, device=device, dtype=dtype)
        self.img_mlp = FeedForward(width, ops, device=device, dtype=dtype)
        self.txt_mlp = FeedForward(width, ops, device=device, dtype=dtype)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, silu_temb: torch.Tensor, img_sizes: Sequence[int],
                rope: torch.Tensor, mask: torch.Tensor | None,
                options: Options | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Update ``img`` and ``txt`` in place and return them.  ``silu_temb`` holds one row block per image
        token segment (``img_sizes``); the text uses the first.  ``options``: run options (attention kernel).

        The layers compute in ``silu_temb``'s dtype; ``img`` / ``txt`` (the residual streams) may be wider (fp32
        streams around fp16 layers, see the module docstring)."""
        batch, width = txt.shape[0], img.shape[-1]
        compute, stream = silu_temb.dtype, img.dtype
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = _mod_params(self.img_mod[1], silu_temb,
                                                                                len(img_sizes), stream)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = _mod_params(self.txt_mod[1], silu_temb[:batch], 1,
                                                                                stream)
        txt_sizes = (txt.shape[1],)

        img_in = _modulate(F.layer_norm(img, (width,), eps=_EPS), i_shift1, i_scale1, img_sizes).to(compute)
        txt_in = _modulate(F.layer_norm(txt, (width,), eps=_EPS), t_shift1, t_scale1, txt_sizes).to(compute)
        img_attn, txt_attn = self.attn(img_in, txt_in, rope, mask, options)
        del img_in, txt_in
        _gated_add_(img, i_gate1, img_attn, img_sizes)
        _gated_add_(txt, t_gate1, txt_attn, txt_sizes)
        del img_attn, txt_attn

        img_in = _modulate(F.layer_norm(img, (width,), eps=_EPS), i_shift2, i_scale2, img_sizes).to(compute)
        _gated_add_(img, i_gate2, self.img_mlp(img_in), img_sizes)
        del img_in
        txt_in = _modulate(F.layer_norm(txt, (width,), eps=_EPS), t_shift2, t_scale2, txt_sizes).to(compute)
        _gated_add_(txt, t_gate2, self.txt_mlp(txt_in), txt_sizes)
        return img, txt


class OutputNorm(nn.Module):
    """AdaLN before ``proj_out``; its modulation chunks are ``(scale, shift)``."""

    def __init__(self, width: int, ops, device=None, dtype=None):
        super().__init__()
        self.linear = ops.Linear(width, 2 * width, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, silu_temb: torch.Tensor) -> torch.Tensor:
        """In ``silu_temb``'s (the compute) dtype; ``x`` may be a wider residual stream."""
        scale, shift = self.linear(silu_temb)[:, None, :].to(x.dtype).chunk(2, dim=-1)
        return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=_EPS), scale + 1).to(silu_temb.dtype)


class DoubleStreamTrunk(nn.Module):
    """What the DiT and the ControlNet share: timestep and text embedding, the image input projection, the
    double-stream blocks and MSRoPE (parameter names as in the checkpoints)."""

    def __init__(self, config: DiTConfig, compute_dtype: torch.dtype = torch.float32, ops=CastOps,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        factory = {"device": device, "dtype": dtype}
        self.time_text_embed = TimeTextEmbed(config.width, ops, config.additional_t_cond, **factory)
        self.txt_norm = ops.RMSNorm(config.joint_dim, eps=_EPS, **factory)
        self.img_in = ops.Linear(config.in_channels, config.width, bias=True, **factory)
        self.txt_in = ops.Linear(config.joint_dim, config.width, bias=True, **factory)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(config, ops, **factory)
                                                for _ in range(config.depth))
        self.rope = MSRoPE(config.axes_dim, config.rope_theta, layer3d=config.layer3d_rope)

    @property
    def stream_dtype(self) -> torch.dtype:
        """The residual streams' dtype: fp32 around fp16 layers (Qwen's activations exceed fp16), else the compute
        dtype."""
        return torch.float32 if self.compute_dtype == torch.float16 else self.compute_dtype

    def timestep_embedding(self, sigma: torch.Tensor, condition_index: int = 0) -> torch.Tensor:
        """The timestep embedding of ``sigma [N]`` (before SiLU); Layered models add the embedding of
        ``condition_index`` (0 for the reference's RGBA decomposition)."""
        sinusoid = timestep_sinusoid(sigma).to(self.compute_dtype)
        embedding = self.time_text_embed.timestep_embedder(sinusoid)
        if self.config.additional_t_cond:
            index = torch.full(sigma.shape, condition_index, dtype=torch.long, device=sigma.device)
            extra = self.time_text_embed.addition_t_embedding(index, out_dtype=self.compute_dtype)
            embedding = embedding + extra.to(self.compute_dtype)
        return embedding

    def time_embedding(self, sigma: torch.Tensor, condition_index: int = 0) -> torch.Tensor:
        """SiLU of :meth:`timestep_embedding` (what every modulation Linear reads)."""
        return F.silu(self.timestep_embedding(sigma, condition_index))

    def image_tokens(self, packed: torch.Tensor) -> torch.Tensor:
        """The image stream: ``img_in`` of the packed latent tokens, in :attr:`stream_dtype`."""
        return self.img_in(packed).to(self.stream_dtype)

    def text_tokens(self, context: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The text stream, in :attr:`stream_dtype`."""
        return self.txt_in(self.txt_norm(context.to(device=device, dtype=self.compute_dtype))).to(self.stream_dtype)


class QwenImageDiT(DoubleStreamTrunk):
    """Qwen-Image MMDiT.  Call ``dit(x, timestep, context, context_mask=None, ref_latents=None, control=None)``;
    a Layered model takes ``x [B, 16, F, H, W]`` (F frames: the whole image, then the layers) and the condition
    image's latent as the last ``ref_latents`` entry.

    Build on ``device="meta"`` and fill with :func:`models.io.weights.assign_weights` (see
    :func:`models.qwen_image.dit_loader.load_diffusion_model`).
    """

    def __init__(self, config: DiTConfig, compute_dtype: torch.dtype = torch.float32, ops=CastOps,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(config, compute_dtype, ops, device, dtype)
        factory = {"device": device, "dtype": dtype}
        self.norm_out = OutputNorm(config.width, ops, **factory)
        self.proj_out = ops.Linear(config.width, config.patch_size ** 2 * config.out_channels, bias=True,
                                   **factory)

    def _pack(self, latent: torch.Tensor, batch: int) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.config.patch_size
        if latent.ndim != 4 or latent.shape[1] * p * p != self.config.in_channels:
            raise ValueError(f"expected a latent [B, {self.config.in_channels // (p * p)}, H, W], "
                             f"got shape {tuple(latent.shape)}")
        if latent.shape[0] != batch:
            if latent.shape[0] != 1:
                raise ValueError(f"latent batch {latent.shape[0]} does not match the batch {batch}")
            latent = latent.expand(batch, -1, -1, -1)
        return pack_latent(latent.to(self.compute_dtype), p), (latent.shape[2] // p, latent.shape[3] // p)

    def _targets(self, x: torch.Tensor, refs: bool) -> list[torch.Tensor]:
        """The target latent as a list of ``[B, C, H, W]`` frames (one, or the Layered model's several)."""
        if self.config.layer3d_rope and not refs:
            raise ValueError("this is a Qwen-Image-Layered DiT: it decomposes an image into layers and needs the "
                             "image's latent as its condition (use Qwen-Image Layered Encode, not text-to-image).")
        if x.ndim == 4:
            return [x]
        if x.ndim != 5 or not self.config.layer3d_rope:
            raise ValueError(f"a latent of shape {tuple(x.shape)} (several frames) needs a Qwen-Image-Layered DiT; "
                             "this diffusion model takes [B, C, H, W] latents.")
        return list(x.unbind(2))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor,
                context_mask: torch.Tensor | None = None, ref_latents: Sequence[torch.Tensor] | None = None,
                control: Sequence[torch.Tensor | None] | None = None,
                block_patches: Sequence[BlockPatch] | None = None, options: Options | None = None,
                condition_index: int = 0, entities: Entities | None = None) -> torch.Tensor:
        """Velocity ``[B, 16, H, W]`` (``[B, 16, F, H, W]`` for a Layered model), in ``x``'s dtype, for the target
        latent ``x``.

        ``timestep``: sigma in [0, 1], ``[B]`` or scalar.  ``context [B, L, joint_dim]`` with an optional
        ``context_mask [B, L]`` (1 keep, 0 padding).  ``ref_latents``: edit references ``[B or 1, 16, h, w]``
        (even sizes), appended after the target tokens (a Layered model's condition image is the last).
        ``control``: residuals ``[B, N_target_tokens, width]``, sample ``i // ceil(depth / len(control))`` added to
        the target tokens after block ``i``.  ``block_patches``: callables ``patch(i, target_tokens) -> residual
        or None`` run after block ``i`` (before ``control``); a residual is added to the target tokens (DiffSynth
        blockwise control works this way).  ``options``: run options threaded to every block (a host's attention
        kernel, see :mod:`models.common.attention`).  ``condition_index``: the Layered model's additional timestep
        condition (0, as the reference pipeline).  ``entities``: EliGen entity prompts and regions
        (:mod:`.eligen`), whose text tokens precede ``context``'s under the entity attention mask.
        """
        targets = self._targets(x, bool(ref_latents))
        batch, _, height, width = targets[0].shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent height and width must be multiples of {p}, got {height}x{width}")
        for ref in ref_latents or ():
            if ref.shape[-2] % p or ref.shape[-1] % p:
                raise ValueError(f"reference latent sizes must be multiples of {p}, got {tuple(ref.shape)}")
        if len(targets) > 1 and (control or block_patches or entities):
            raise ValueError("ControlNets, control patches and EliGen entities work on single images, not on "
                             "Layered latents.")
        device, dtype = x.device, self.compute_dtype

        packed = [self._pack(frame, batch) for frame in targets]
        target_tokens = sum(tokens.shape[1] for tokens, _ in packed)
        packed += [self._pack(ref.to(device), batch) for ref in ref_latents or ()]
        img = torch.cat([tokens for tokens, _ in packed], dim=1) if len(packed) > 1 else packed[0][0]
        grids = [grid for _, grid in packed]
        zero_cond = self.config.zero_cond_t and img.shape[1] > target_tokens
        # Token segments with their own modulation; Edit-2511 modulates the references with t = 0.
        img_sizes = [target_tokens, img.shape[1] - target_tokens] if zero_cond else [img.shape[1]]

        sigma = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)
        if zero_cond:
            sigma = torch.cat([sigma, torch.zeros_like(sigma)])
        vec = self.timestep_embedding(sigma, condition_index)
        silu_temb = F.silu(vec)

        img = self.image_tokens(img)
        txt = self.text_tokens(context, device)
        if entities is None:
            rope = self.rope(grids, txt.shape[1], device, dtype)
            mask = joint_attention_mask(context_mask, img.shape[1], device)
        else:
            # EliGen: the entity prompts' tokens first, each prompt attending to its own tokens and region only
            lengths = [c.shape[1] for c in entities.contexts] + [txt.shape[1]]
            txt = torch.cat([self.text_tokens(c, device).expand(batch, -1, -1) for c in entities.contexts]
                            + [txt], dim=1)
            rope = entity_rope(self.rope(grids, max(lengths), device, dtype), lengths)
            regions = region_tokens([m.to(device) for m in entities.masks], (height, width), p, grids[1:])
            mask = entity_attention_mask(lengths, regions, context_mask)

        interval = math.ceil(len(self.transformer_blocks) / len(control)) if control else 0
        hook = options.get(BLOCK_HOOK) if options else None
        for index, block in enumerate(self.transformer_blocks):
            if hook is None:
                img, txt = block(img, txt, silu_temb, img_sizes, rope, mask, options)
            else:
                def run(img_, txt_, temb_, rope_, block=block):
                    return block(img_, txt_, temb_, img_sizes, rope_, mask, options)

                img, txt = hook(BlockCall(index, img, txt, silu_temb, rope, run, vec))
            for patch in block_patches or ():
                residual = patch(index, img[:, :target_tokens])
                if residual is not None:
                    img[:, :target_tokens] += residual.to(device=device, dtype=img.dtype)
            if control:
                residual = control[index // interval]
                if residual is not None:
                    img[:, :target_tokens] += residual.to(device=device, dtype=img.dtype)

        out = self.proj_out(self.norm_out(img[:, :target_tokens], silu_temb[:batch]))
        frames = [unpack_latent(part, height, width, p) for part in out.split(target_tokens // len(targets), dim=1)]
        return (torch.stack(frames, dim=2) if x.ndim == 5 else frames[0]).to(x.dtype)
