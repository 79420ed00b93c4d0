"""The Qwen-Image 2.1 diffusion transformer (single stream, block-causal, prefix KV cache) in plain PyTorch.

Parameter names equal diffusers' ``QwenImage21Transformer2DModel`` (``txt_in.text_norm``, ``modulation.1``,
``transformer_blocks.N.attn.to_q``, ``transformer_blocks.N.img_mlp.gate_layer`` ...), so checkpoints and LoRAs map
one to one.  The maths follows diffusers 0.42.1:

* one joint sequence: the text encoder's hidden states with each condition image's latent tokens put where the
  encoder reserved its image slots (one slot stands for a 2x2 group of latent tokens), then the target image;
* single-stream blocks: LayerNorm without affine, ``x * (1 + scale)``, attention with per-head q/k RMSNorm and RoPE
  (:mod:`.rope`), residual ``x + tanh(gate) * out``; the same for a SwiGLU MLP (``out(silu(gate_layer(x)) *
  proj(x))``).  One modulation ``Linear(SiLU(temb)) -> (scale1, gate1, scale2, gate2)`` is shared by all blocks;
* ``causal_condition``: the prefix (text and condition images) takes the modulation of ``t = 0``;
* block-causal attention: a text token sees every earlier token, a condition image sees everything before it and
  all of itself, the target sees everything; padded text positions are never attended to;
* text projection: zero-centred RMSNorm (the stored weight is ``scale - 1``) -> Linear -> GELU(tanh) -> Linear;
  timestep: ``sinusoid(1000 * sigma)`` (256, cos first) -> Linear -> SiLU -> Linear; ``norm_out``: LayerNorm times
  ``1 + Linear(SiLU(temb))`` (scale, no shift); no biases anywhere.

The prefix and the target run as two tensors through every block.  The prefix never attends to the target, so
its keys and values can be kept: with a :class:`.prefix_cache.PrefixCache` the first step stores them and later
steps run the target tokens only.  Prefix attention is one call per run (text runs causal, image blocks
bidirectional), the target one call over all keys: exact, with masks no larger than a text run.

The model computes in ``compute_dtype``; its layers come from an injectable ``ops`` namespace (fp8 weights stay
fp8, a host's casting and weight patches apply) and every attention call goes through
:func:`models.common.attention.attention` with the caller's ``options``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..common.attention import Options, attention
from ..common.latent_spec import pack_latent, unpack_latent
from ..common.ops import CastOps
from ..qwen_image.rope import apply_rope, split_rope
from .prefix_cache import KV, PrefixCache, PrefixKey
from .rope import sequence_rope

__all__ = ["DiT21Config", "QwenImage21DiT", "Piece", "prefix_layout", "SLOT_TOKENS"]

SLOT_TOKENS = 4  # latent tokens per image slot of the text encoder (a 2x2 group)
_TIMESTEP_DIM = 256


@dataclass(frozen=True)
class DiT21Config:
    """Shape of a Qwen-Image 2.1 DiT (defaults: the released model)."""

    depth: int = 32
    heads: int = 32
    head_dim: int = 128
    in_channels: int = 64
    out_channels: int = 64
    context_dim: int = 4096
    mlp_ratio: int = 3
    axes_dim: tuple[int, int, int] = (16, 56, 56)
    causal_condition: bool = True  # prefix modulated from t = 0 (what makes the prefix cacheable)
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


class Piece(NamedTuple):
    """A run of the prefix: text tokens ``context[:, start:start + length]`` (``image == -1``), or condition image
    ``image`` on a latent ``grid`` (h, w) of ``length = h * w`` tokens, put at the slots from ``start``."""

    image: int
    start: int
    length: int
    grid: tuple[int, int] = (0, 0)


def prefix_layout(context_len: int, slots: Sequence[bool] | None,
                  grids: Sequence[tuple[int, int]]) -> tuple[Piece, ...]:
    """The prefix's runs, in order, for a context of ``context_len`` positions whose image ``slots`` (True where the
    encoder placed an image token) take the condition images of latent ``grids`` in order.

    Images are told apart by their slot counts (``h * w / 4`` each), not by runs of slots: two images with no text
    between them are still two blocks.  Raises ``ValueError`` when slots and images do not add up.
    """
    if context_len < 1:
        raise ValueError("the context is empty: Qwen-Image 2.1 needs the text encoder's hidden states.")
    for index, (h, w) in enumerate(grids):
        if h * w == 0 or (h * w) % SLOT_TOKENS:
            raise ValueError(f"condition image {index}: a {h}x{w} latent is not a whole number of the encoder's image "
                             f"slots ({SLOT_TOKENS} latent tokens each); latent sides must be even.")
    slots = list(slots or ())
    if not any(slots):
        if grids:
            raise ValueError(f"{len(grids)} condition latent(s) given but the context holds no image slots: pass "
                             "image_slots (where the text encoder placed each condition image) with the context.")
        return (Piece(-1, 0, context_len),)
    if not grids:
        raise ValueError(f"the context holds {sum(slots)} image slots but no condition latents were given.")
    pieces, image, start = [], 0, 0
    for is_slot, group in itertools.groupby(slots):
        run = len(list(group))
        if not is_slot:
            pieces.append(Piece(-1, start, run))
        left = run if is_slot else 0
        while left:
            if image == len(grids):
                raise ValueError(f"the context holds image slots for more than the {len(grids)} condition latent(s).")
            h, w = grids[image]
            need = h * w // SLOT_TOKENS
            if need > left:
                raise ValueError(f"condition image {image}: its {h}x{w} latent needs {need} image slots, the context "
                                 f"has {left} left in its run; the encoder saw the image at another size than the "
                                 "VAE.")
            pieces.append(Piece(image, start + run - left, h * w, (h, w)))
            left -= need
            image += 1
        start += run
    if image != len(grids):
        raise ValueError(f"{len(grids)} condition latents but the context holds image slots for {image}.")
    return tuple(pieces)


def sigma_sinusoid(sigma: torch.Tensor) -> torch.Tensor:
    """``[cos, sin]`` of ``(1000 * sigma) * 10000 ** (-k / 128)``, float32 ``[N, 256]``; this operation order (not
    1.x's ``(sigma * f) * 1000``) is the 2.1 reference's, which matters at angles up to 1000 rad."""
    half = _TIMESTEP_DIM // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    angle = (1000.0 * sigma.float())[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)


class Modulation(NamedTuple):
    """The shared modulation as one token group reads it, each ``[rows, 1, width]``."""

    scale1: torch.Tensor  # 1 + scale before attention
    gate1: torch.Tensor  # tanh(gate) of the attention residual
    scale2: torch.Tensor
    gate2: torch.Tensor


@dataclass
class AttentionPlan:
    """The masks of one forward, shared by every block.  ``segments``: prefix query runs ``(start, end, mask,
    causal)`` attending to the keys ``[:end]`` (empty when the prefix comes from the cache); ``target_mask``: the
    target queries' key mask over ``[prefix, target]`` (``None``: nothing padded)."""

    segments: list[tuple[int, int, torch.Tensor | None, bool]]
    target_mask: torch.Tensor | None


def attention_plan(pieces: Sequence[Piece], key_valid: torch.Tensor | None, target_len: int,
                   device: torch.device, with_prefix: bool) -> AttentionPlan:
    """Masks for the prefix ``pieces`` with ``key_valid [B, P]`` (False at padded text; ``None``: no padding)."""
    target_mask = None
    if key_valid is not None:
        target_mask = torch.cat([key_valid, key_valid.new_ones(key_valid.shape[0], target_len)], 1)[:, None, None]
    segments = []
    start = 0
    for piece in pieces if with_prefix else ():
        end = start + piece.length
        if piece.image >= 0:
            segments.append((start, end, None if key_valid is None else key_valid[:, None, None, :end], False))
        elif key_valid is None and start == 0:
            segments.append((start, end, None, True))
        else:
            keys = torch.arange(end, device=device)[None, :]
            queries = torch.arange(start, end, device=device)[:, None]
            mask = (keys <= queries)[None]
            if key_valid is not None:
                # A padded query also sees itself, so no row is empty (NaN); its output never reaches a valid token.
                mask = mask & (key_valid[:, None, :end] | (keys == queries))
            segments.append((start, end, mask[:, None], False))
        start = end
    return AttentionPlan(segments, target_mask)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, ops, device=None, dtype=None):
        super().__init__()
        self.linear_1 = ops.Linear(_TIMESTEP_DIM, width, bias=False, device=device, dtype=dtype)
        self.linear_2 = ops.Linear(width, width, bias=False, device=device, dtype=dtype)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(sinusoid)))


class TextProjection(nn.Module):
    """``txt_in``: zero-centred RMSNorm -> ``in_layer`` -> GELU(tanh) -> ``out_layer``."""

    def __init__(self, context_dim: int, width: int, eps: float, ops, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.text_norm = ops.RMSNorm(context_dim, eps=eps, device=device, dtype=dtype)
        self.in_layer = ops.Linear(context_dim, width, bias=False, device=device, dtype=dtype)
        self.out_layer = ops.Linear(width, width, bias=False, device=device, dtype=dtype)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """``[B, L, context_dim] -> [B, L, width]``."""
        x = context.float()
        # The file stores scale - 1: rms(x) * (w + 1) = rms(x) * w + rms(x), with the stored weight going through
        # the layer itself so a host's casting and patches apply.  fp32 like the reference.
        normed = self.text_norm(x) + F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.out_layer(F.gelu(self.in_layer(normed.to(context.dtype)), approximate="tanh"))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int, ops, device=None, dtype=None):
        super().__init__()
        self.proj = ops.Linear(width, hidden, bias=False, device=device, dtype=dtype)
        self.gate_layer = ops.Linear(width, hidden, bias=False, device=device, dtype=dtype)
        self.out = ops.Linear(hidden, width, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.gate_layer(x)) * self.proj(x))


class Attention(nn.Module):
    """Block-causal self-attention of the prefix and the target (``to_q/k/v``, ``to_out.0``, q/k RMSNorm)."""

    def __init__(self, config: DiT21Config, ops, device=None, dtype=None):
        super().__init__()
        width = config.width
        self.heads = config.heads

        def linear():
            return ops.Linear(width, width, bias=False, device=device, dtype=dtype)

        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        self.to_out = nn.ModuleList([linear()])
        self.norm_q = ops.RMSNorm(config.head_dim, eps=config.eps, device=device, dtype=dtype)
        self.norm_k = ops.RMSNorm(config.head_dim, eps=config.eps, device=device, dtype=dtype)

    def qkv(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys (normed, rotated) and values of ``x [B, L, width]``, each ``[B, heads, L, head_dim]``."""
        batch, length, width = x.shape
        heads = (self.heads, -1)
        q = x.new_empty(batch, self.heads, length, width // self.heads)
        k = torch.empty_like(q)
        apply_rope(self.norm_q(self.to_q(x).unflatten(-1, heads)), rope, q.transpose(1, 2))
        apply_rope(self.norm_k(self.to_k(x).unflatten(-1, heads)), rope, k.transpose(1, 2))
        return q, k, self.to_v(x).unflatten(-1, heads).transpose(1, 2)

    def _out(self, heads_first: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](heads_first.transpose(1, 2).flatten(2))

    def forward(self, target: torch.Tensor, prefix: torch.Tensor | None, rope_target: torch.Tensor,
                rope_prefix: torch.Tensor, plan: AttentionPlan, cached: KV | None, options: Options | None,
                prefix_out: bool) -> tuple[torch.Tensor, torch.Tensor | None, KV]:
        """Attention outputs of the target ``[B, T, width]`` and (when ``prefix`` is given and ``prefix_out``) of
        the prefix ``[B, P, width]``, and the prefix keys and values; without ``prefix`` they come from
        ``cached``."""
        q_t, k_t, v_t = self.qkv(target, rope_target)
        if prefix is not None:
            q_p, k_p, v_p = self.qkv(prefix, rope_prefix)
        else:
            k_p, v_p = cached
        keys, values = torch.cat([k_p, k_t], dim=2), torch.cat([v_p, v_t], dim=2)
        out_target = self._out(attention(q_t, keys, values, mask=plan.target_mask, options=options))
        del keys, values
        out_prefix = None
        if prefix is not None and prefix_out:
            parts = [attention(q_p[:, :, start:end], k_p[:, :, :end], v_p[:, :, :end], mask=mask, causal=causal,
                               options=options) for start, end, mask, causal in plan.segments]
            out_prefix = self._out(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
        return out_target, out_prefix, (k_p, v_p)


class SingleStreamBlock(nn.Module):
    def __init__(self, config: DiT21Config, ops, device=None, dtype=None):
        super().__init__()
        self.eps = config.eps
        self.attn = Attention(config, ops, device=device, dtype=dtype)
        self.img_mlp = SwiGLU(config.width, config.width * config.mlp_ratio, ops, device=device, dtype=dtype)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps)

    def _residuals(self, x: torch.Tensor, attn_out: torch.Tensor, mod: Modulation) -> torch.Tensor:
        """``x`` updated in place with the gated attention output, then the gated MLP."""
        x.addcmul_(mod.gate1, attn_out)
        x.addcmul_(mod.gate2, self.img_mlp(self._norm(x) * mod.scale2))
        if x.dtype == torch.float16:  # Qwen activations exceed the fp16 range
            x.clamp_(-65504, 65504)
        return x

    def forward(self, target: torch.Tensor, prefix: torch.Tensor | None, mod_target: Modulation,
                mod_prefix: Modulation, rope_target: torch.Tensor, rope_prefix: torch.Tensor, plan: AttentionPlan,
                cached: KV | None, options: Options | None = None,
                prefix_out: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, KV]:
        """One block on the target ``[B, T, width]`` and the prefix ``[B, P, width]`` (or ``None`` with its
        ``cached`` keys and values); both are updated in place.  Returns ``(target, prefix, prefix (k, v))``;
        ``prefix`` is ``None`` when not ``prefix_out`` (the last block: only its keys and values matter)."""
        prefix_in = None if prefix is None else self._norm(prefix) * mod_prefix.scale1
        out_t, out_p, kv = self.attn(self._norm(target) * mod_target.scale1, prefix_in, rope_target, rope_prefix,
                                     plan, cached, options, prefix_out)
        del prefix_in
        target = self._residuals(target, out_t, mod_target)
        prefix = self._residuals(prefix, out_p, mod_prefix) if out_p is not None else None
        return target, prefix, kv


class OutputNorm(nn.Module):
    """``norm_out``: LayerNorm times ``1 + linear(SiLU(temb))`` (scale only)."""

    def __init__(self, width: int, eps: float, ops, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.linear = ops.Linear(width, width, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, silu_temb: torch.Tensor) -> torch.Tensor:
        scale = self.linear(silu_temb)[:, None, :]
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps) * (1 + scale)


def _batched(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] != 1:
        raise ValueError(f"{what} batch {tensor.shape[0]} does not match the latent batch {batch}")
    return tensor.expand(batch, *tensor.shape[1:])


def _slots_row(image_slots: torch.Tensor | Sequence[bool] | None, context_len: int) -> list[bool] | None:
    """The image slots of every sample (``[L]`` or ``[B, L]``, all rows equal) as one list."""
    if image_slots is None:
        return None
    slots = torch.as_tensor(image_slots).to(torch.bool)
    slots = slots[None] if slots.ndim == 1 else slots
    if slots.ndim != 2 or slots.shape[1] != context_len:
        raise ValueError(f"image_slots of shape {tuple(slots.shape)} do not match a context of {context_len} "
                         "positions ([L] or [B, L] expected)")
    if not bool((slots == slots[:1]).all()):
        raise ValueError("the samples of a batch must hold their image slots at the same positions")
    return slots[0].tolist()


class QwenImage21DiT(nn.Module):
    """Qwen-Image 2.1 DiT.  Call ``dit(x, timestep, context, context_mask=None, ref_latents=None,
    image_slots=None, options=None, kv_cache=None)`` (see :meth:`forward`).

    Build on ``device="meta"`` and fill with :func:`models.io.loading.materialize` (see
    :func:`models.qwen_image_2_1.dit_loader.load_diffusion_model_2_1`).
    """

    def __init__(self, config: DiT21Config, compute_dtype: torch.dtype = torch.float32, ops=CastOps,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if sum(config.axes_dim) != config.head_dim:
            raise ValueError(f"RoPE axes {config.axes_dim} do not add up to the head dimension {config.head_dim}")
        self.config = config
        self.compute_dtype = compute_dtype
        factory = {"device": device, "dtype": dtype}
        width = config.width
        self.time_text_embed = nn.ModuleDict({"timestep_embedder": TimestepEmbedder(width, ops, **factory)})
        self.txt_in = TextProjection(config.context_dim, width, config.eps, ops, **factory)
        self.img_in = ops.Linear(config.in_channels, width, bias=False, **factory)
        self.modulation = nn.Sequential(nn.SiLU(), ops.Linear(width, 4 * width, bias=False, **factory))
        self.transformer_blocks = nn.ModuleList(SingleStreamBlock(config, ops, **factory)
                                                for _ in range(config.depth))
        self.norm_out = OutputNorm(width, config.eps, ops, **factory)
        self.proj_out = ops.Linear(width, config.out_channels, bias=False, **factory)

    def _modulations(self, silu_temb: torch.Tensor, batch: int) -> tuple[Modulation, Modulation]:
        """(target, prefix) modulations from ``silu_temb`` rows ``[samples..., t=0 row if causal_condition]``."""
        scale1, gate1, scale2, gate2 = self.modulation[1](silu_temb)[:, None, :].chunk(4, dim=-1)
        rows = Modulation(1 + scale1, gate1.tanh(), 1 + scale2, gate2.tanh())
        target = Modulation(*(p[:batch] for p in rows))
        return target, Modulation(*(p[batch:] for p in rows)) if self.config.causal_condition else target

    def _prefix_tokens(self, pieces: Sequence[Piece], context: torch.Tensor,
                       refs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The prefix ``[B, P, width]``: projected text runs and condition images in sequence order."""
        parts = [self.txt_in(context[:, p.start:p.start + p.length]) if p.image < 0
                 else self.img_in(pack_latent(refs[p.image], 1)) for p in pieces]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    @staticmethod
    def _key_valid(pieces: Sequence[Piece], keep: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, P]`` False at padded text positions, from the context's ``keep [B, L]`` (``None``: no padding)."""
        if keep is None:
            return None
        return torch.cat([keep[:, p.start:p.start + p.length] if p.image < 0
                          else keep.new_ones(keep.shape[0], p.length) for p in pieces], dim=1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor,
                context_mask: torch.Tensor | None = None, ref_latents: Sequence[torch.Tensor] | None = None,
                image_slots: torch.Tensor | Sequence[bool] | None = None, options: Options | None = None,
                kv_cache: PrefixCache | None = None) -> torch.Tensor:
        """Velocity ``[B, C, H, W]`` (in ``x``'s dtype) for the normalized target latent ``x [B, C, H, W]``.

        ``timestep``: sigma in [0, 1], ``[B]`` or scalar.  ``context [B or 1, L, context_dim]``: the text encoder's
        hidden states, image slots included; ``context_mask [B or 1, L]`` (1 keep, 0 padding).  ``ref_latents``:
        condition latents ``[B or 1, C, h_i, w_i]`` (even sides), in the order the encoder saw the images;
        ``image_slots [L]`` or ``[B, L]`` (bool): True at the encoder's image-pad positions, ``h_i * w_i / 4`` of
        them per image, the same for every sample.  ``options``: run options threaded to every attention call.
        ``kv_cache``: a :class:`PrefixCache`; the first call for a prefix fills it, later calls with the same
        prefix inputs run the target tokens only (requires ``causal_condition``).
        """
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise ValueError(f"expected a latent [B, {config.in_channels}, H, W], got shape {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != config.context_dim:
            raise ValueError(f"expected a context [B, L, {config.context_dim}], got shape {tuple(context.shape)}")
        batch, _, height, width = x.shape
        device, dtype = x.device, self.compute_dtype
        refs = []
        for index, ref in enumerate(ref_latents or ()):
            if ref.ndim != 4 or ref.shape[1] != config.in_channels:
                raise ValueError(f"condition latent {index}: expected [B, {config.in_channels}, h, w], got shape "
                                 f"{tuple(ref.shape)}")
            refs.append(_batched(ref, batch, f"condition latent {index}").to(device=device, dtype=dtype))
        context = _batched(context, batch, "context").to(device=device, dtype=dtype)
        pieces = prefix_layout(context.shape[1], _slots_row(image_slots, context.shape[1]),
                               [tuple(ref.shape[-2:]) for ref in refs])
        keep = None
        if context_mask is not None:
            keep = _batched(context_mask.reshape(-1, context.shape[1]), batch, "context_mask").to(device, torch.bool)
            keep = None if bool(keep.all()) else keep

        entry = filling = None
        if kv_cache is not None:
            if not config.causal_condition:
                raise ValueError("a prefix cache needs causal_condition: without it the text and condition tokens "
                                 "depend on the timestep.")
            key = PrefixKey((id(self), pieces, batch, dtype), (context, keep, *refs))
            entry = kv_cache.lookup(key)
            filling = kv_cache.new_entry(key) if entry is None else None

        sigma = torch.as_tensor(timestep, device=device, dtype=torch.float32).reshape(-1).expand(batch)
        if config.causal_condition:
            sigma = torch.cat([sigma, sigma.new_zeros(1)])
        silu_temb = F.silu(self.time_text_embed["timestep_embedder"](sigma_sinusoid(sigma).to(dtype)))
        mod_target, mod_prefix = self._modulations(silu_temb, batch)

        prefix_len = sum(p.length for p in pieces)
        runs = [p.length if p.image < 0 else p.grid for p in pieces] + [(height, width)]
        rope_prefix, rope_target = split_rope(sequence_rope(runs, config.axes_dim, config.rope_theta, device, dtype),
                                              prefix_len)
        plan = attention_plan(pieces, self._key_valid(pieces, keep), height * width, device, entry is None)
        target = self.img_in(pack_latent(x.to(dtype), 1))
        prefix = self._prefix_tokens(pieces, context, refs) if entry is None else None

        last = len(self.transformer_blocks) - 1
        for index, block in enumerate(self.transformer_blocks):
            cached = entry.kv(index, device) if entry is not None else None
            target, prefix, kv = block(target, prefix, mod_target, mod_prefix, rope_target, rope_prefix, plan,
                                       cached, options, prefix_out=index < last)
            if filling is not None:
                filling.add(*kv)
        if filling is not None:
            kv_cache.add(filling)

        out = self.proj_out(self.norm_out(target, silu_temb[:batch]))
        return unpack_latent(out, height, width, 1).to(x.dtype)
