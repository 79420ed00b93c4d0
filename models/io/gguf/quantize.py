"""Quantizing float tensors to ggml block formats in torch.

* Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: the reference "round to nearest" recipes, bit-exact with gguf-py's
  ``gguf.quants.quantize`` (same fp32 operations in the same order, round-half-away-from-zero for Q8_0).
* Q4_K, Q5_K, Q6_K: our own quantizers for the K formats (gguf-py cannot quantize them).  Each 32-element
  (Q4_K/Q5_K) or 16-element (Q6_K) sub-block gets a scale (and min) chosen by a small search that refits scale
  and min by least squares for several candidate roundings and keeps the lowest squared error; the 6/8-bit
  sub-block scales are then quantized against the super-block's fp16 scales and the values re-rounded with the
  scales exactly as stored, so what a reader decodes is what was optimised.
* F32 / F16 / BF16: plain casts (round to nearest even).

:func:`quantize` returns the stored bytes ``uint8 [*shape[:-1], row_bytes]`` (see :mod:`models.io.gguf.writer`);
:func:`dit_tensor_type` picks a DiT tensor's type from a preset and its family's :class:`DitRules` (:data:`DIT_RULES`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .names import QWEN_IMAGE_2_1_ARCH, QWEN_IMAGE_ARCH
from .reader import QUANT_BLOCKS, GGMLType, GGUFError

__all__ = ["quantize", "QUANTIZABLE_TYPES", "DIT_PRESETS", "DitRules", "DIT_RULES", "QWEN_IMAGE_RULES",
           "QWEN_IMAGE_2_1_RULES", "dit_tensor_type", "fitting_type"]

_CHUNK_ELEMENTS = 1 << 17  # per step: temporaries of ~0.5 MB stay cheap to allocate and in cache
_FLOAT_TYPES = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d == 0 (an all-zero block quantizes to zeros)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, written so no fp32 rounding happens on the way (matches C's roundf)."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + (2 * (a - floored)).floor())


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).view(torch.uint8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``[..., 2, k]`` 4-bit values -> ``[..., k]`` bytes (first half in the low nibble)."""
    return q[..., 0, :].bitwise_or(q[..., 1, :].bitwise_left_shift(4))


def _pack_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    """``[..., m, k]`` values of ``width`` bits -> ``[..., k]`` bytes, value i at bit ``i * width``."""
    out = torch.zeros(bits.shape[:-2] + bits.shape[-1:], dtype=torch.uint8, device=bits.device)
    for i in range(bits.shape[-2]):
        out.bitwise_or_(bits[..., i, :].bitwise_left_shift(i * width))
    return out


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude (first one on ties), sign kept: ``[n, 1]``."""
    return torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))


# -- legacy formats (bit-exact with gguf-py) ---------------------------------------------------------------------

def _q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=-1, keepdim=True) / 127
    q = _round_away(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=-1)


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    d = _signed_absmax(x) / -8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q.view(-1, 2, 16))], dim=-1)


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    hi, lo = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q.view(-1, 2, 16))], dim=-1)


def _q5_pack(q: torch.Tensor) -> torch.Tensor:
    """5-bit values ``[n, 32]`` -> qh (4 bytes, bit i = bit 4 of value i) + qs (16 bytes of nibbles)."""
    qh = _pack_bits(q.bitwise_right_shift(4).view(-1, 4, 8).transpose(1, 2), 1)
    return torch.cat([qh, _pack_nibbles(q.bitwise_and(0x0F).view(-1, 2, 16))], dim=-1)


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    d = _signed_absmax(x) / -16
    q = torch.trunc(x * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _q5_pack(q)], dim=-1)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    hi, lo = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
    d = (hi - lo) / 31
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _q5_pack(q)], dim=-1)


# -- K formats (our own search; any valid encoding decodes identically everywhere) -------------------------------

_SEARCH_STEPS = (-0.5, -0.3, -0.15, 0.0, 0.15, 0.3, 0.5, 0.8)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b).unsqueeze(-1)


def _fit_scale_min(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x [m, k]``: (scale >= 0, offset <= 0) minimising ||x - (scale * q + offset)||^2 with integer
    q in [0, nmax].  Candidate roundings of the plain min/max fit are each refit by least squares; the squared
    error of a fit is computed from the same sums (no extra pass over the data)."""
    k = x.shape[-1]
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    span = (x.amax(dim=-1, keepdim=True) - lo).clamp(min=1e-30)
    shifted = x - lo
    sx, sxx = x.sum(-1, keepdim=True), _dot(x, x)
    best_scale, best_min, best_err = span / nmax, lo, None
    for step in _SEARCH_STEPS:
        q = torch.round(shifted * ((nmax + step) / span)).clamp_(0, nmax)
        sq, sqq, sqx = q.sum(-1, keepdim=True), _dot(q, q), _dot(q, x)
        det = k * sqq - sq * sq
        safe = torch.where(det > 0, det, torch.ones_like(det))
        scale = (k * sqx - sq * sx) / safe
        offset = (sqq * sx - sq * sqx) / safe
        # the offset must stay <= 0 (it is stored as a positive "min"): if clipped, refit the scale alone
        clipped = offset > 0
        scale = torch.where(clipped, sqx / sqq.clamp(min=1e-30), scale)
        offset = offset.clamp(max=0)
        err = scale * scale * sqq + 2 * scale * offset * sq + k * offset * offset \
            - 2 * scale * sqx - 2 * offset * sx + sxx
        usable = (det > 0) & (scale > 0)
        if best_err is None:
            best_err = torch.where(usable, err, torch.full_like(err, float("inf")))
            best_scale = torch.where(usable, scale, best_scale)
            best_min = torch.where(usable, offset, best_min)
            continue
        better = usable & (err < best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, offset, best_min)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_min


def _six_bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Super-block fp16 factor and 6-bit multipliers for non-negative per-sub-block ``values [n, 8]``."""
    factor = (values.amax(dim=-1, keepdim=True) / 63).to(torch.float16).to(torch.float32)
    levels = torch.round(values * _inverse(factor)).clamp(0, 63).to(torch.uint8)
    return factor, levels


def _pack_k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins -> the 12 packed bytes of Q4_K / Q5_K."""
    low = sc[:, :4].bitwise_or(sc[:, 4:].bitwise_right_shift(4).bitwise_left_shift(6))
    mid = mn[:, :4].bitwise_or(mn[:, 4:].bitwise_right_shift(4).bitwise_left_shift(6))
    high = sc[:, 4:].bitwise_and(0x0F).bitwise_or(mn[:, 4:].bitwise_and(0x0F).bitwise_left_shift(4))
    return torch.cat([low, mid, high], dim=-1)


def _k_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared part of Q4_K / Q5_K: header bytes (d, dmin, scales) and the integer values ``[n, 8, 32]``."""
    n = x.shape[0]
    sub = x.view(n * 8, 32)
    scale, offset = _fit_scale_min(sub, nmax)
    d, sc = _six_bit(scale.view(n, 8))
    dmin, mn = _six_bit((-offset).view(n, 8))
    eff_scale = (d * sc).view(n, 8, 1)
    eff_min = (dmin * mn).view(n, 8, 1)
    q = torch.round((x.view(n, 8, 32) + eff_min) * _inverse(eff_scale)).clamp(0, nmax).to(torch.uint8)
    header = torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn)], dim=-1)
    return header, q


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    header, q = _k_quants(x, 15)
    return torch.cat([header, _pack_nibbles(q.view(-1, 4, 2, 32)).view(-1, 128)], dim=-1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    header, q = _k_quants(x, 31)
    qh = _pack_bits(q.bitwise_right_shift(4), 1)  # [n, 32]: bit s of byte k = bit 4 of value 32*s + k
    qs = _pack_nibbles(q.bitwise_and(0x0F).view(-1, 4, 2, 32)).view(-1, 128)
    return torch.cat([header, qh, qs], dim=-1)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.view(n * 16, 16)
    # symmetric: the largest-magnitude element maps to -32 (the wider end of [-32, 31]); try a few stretches
    amax = _signed_absmax(sub)
    sxx = _dot(sub, sub)
    best_scale, best_err = None, None
    for stretch in (32.0, 31.5, 31.0, 30.5, 30.0, 29.0):
        scale = amax / -stretch
        q = torch.round(sub * _inverse(scale)).clamp_(-32, 31)
        err = scale * scale * _dot(q, q) - 2 * scale * _dot(q, sub) + sxx
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = torch.where(better, scale, best_scale), torch.where(better, err, best_err)
    scales = best_scale.view(n, 16)
    big = _signed_absmax(scales)
    d = (big / -128).to(torch.float16).to(torch.float32)
    sc = torch.round(scales * _inverse(d)).clamp(-128, 127)
    eff = (d * sc).view(n, 16, 1)
    q = (torch.round(sub.view(n, 16, 16) * _inverse(eff)).clamp(-32, 31) + 32).to(torch.uint8).view(n, 256)
    ql = _pack_nibbles(q.bitwise_and(0x0F).view(n, 2, 2, 64)).view(n, 128)
    qh = _pack_bits(q.bitwise_right_shift(4).view(n, 2, 4, 32), 2).view(n, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)], dim=-1)


_QUANTIZERS: dict[GGMLType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLType.Q8_0: _q8_0, GGMLType.Q4_0: _q4_0, GGMLType.Q4_1: _q4_1, GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1, GGMLType.Q4_K: _q4_k, GGMLType.Q5_K: _q5_k, GGMLType.Q6_K: _q6_k,
}
QUANTIZABLE_TYPES = frozenset(_QUANTIZERS) | frozenset(_FLOAT_TYPES)


def quantize(x: torch.Tensor, qtype: GGMLType | int) -> torch.Tensor:
    """Encode float tensor ``x`` as ``qtype``: returns the stored bytes ``uint8 [*x.shape[:-1], row_bytes]``."""
    qtype = GGMLType(qtype)
    if qtype in _FLOAT_TYPES:
        return x.detach().to(_FLOAT_TYPES[qtype]).contiguous().view(torch.uint8)
    if qtype not in _QUANTIZERS:
        raise GGUFError(f"quantizing to {qtype.name} is not supported (supported: "
                        f"{', '.join(sorted(t.name for t in QUANTIZABLE_TYPES))}).")
    block, type_size = QUANT_BLOCKS[qtype]
    if x.ndim == 0 or x.shape[-1] % block:
        raise GGUFError(f"cannot quantize a tensor of shape {list(x.shape)} to {qtype.name}: rows must be a "
                        f"multiple of {block}.")
    blocks = x.detach().to(torch.float32).reshape(-1, block)
    out = torch.empty(blocks.shape[0], type_size, dtype=torch.uint8, device=x.device)
    chunk = max(1, _CHUNK_ELEMENTS // block) if x.device.type == "cpu" else blocks.shape[0]
    for start in range(0, blocks.shape[0], chunk):
        out[start:start + chunk] = _QUANTIZERS[qtype](blocks[start:start + chunk].contiguous())
    return out.view(*x.shape[:-1], x.shape[-1] // block * type_size)


# -- Qwen-Image DiT presets (1.x and 2.1) ---------------------------------------------------------------------------

# preset -> (base type, type for the sensitive tensors: first/last block, V projections, FFN-down)
DIT_PRESETS: dict[str, tuple[GGMLType, GGMLType]] = {
    "Q8_0": (GGMLType.Q8_0, GGMLType.Q8_0), "Q6_K": (GGMLType.Q6_K, GGMLType.Q8_0),
    "Q5_K_M": (GGMLType.Q5_K, GGMLType.Q6_K), "Q5_K_S": (GGMLType.Q5_K, GGMLType.Q5_K),
    "Q4_K_M": (GGMLType.Q4_K, GGMLType.Q5_K), "Q4_K_S": (GGMLType.Q4_K, GGMLType.Q4_K),
    "Q5_1": (GGMLType.Q5_1, GGMLType.Q8_0), "Q5_0": (GGMLType.Q5_0, GGMLType.Q8_0),
    "Q4_1": (GGMLType.Q4_1, GGMLType.Q5_1), "Q4_0": (GGMLType.Q4_0, GGMLType.Q5_0),
    "F16": (GGMLType.F16, GGMLType.F16), "BF16": (GGMLType.BF16, GGMLType.BF16),
}
# K formats need rows that are multiples of 256; these legacy formats replace them otherwise (as llama.cpp does)
K_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0,
              GGMLType.Q3_K: GGMLType.Q4_0, GGMLType.Q2_K: GGMLType.Q4_0}


@dataclass(frozen=True)
class DitRules:
    """One family's DiT quantization rules: the GGUF arch tag its files carry, the tensors kept in BF16 (name
    prefixes) and those one level higher (name fragments; blocks 0 and last always are)."""

    arch: str
    high_precision: tuple[str, ...]
    sensitive: tuple[str, ...]


# The usual city96 rules: the input / output projections and embeddings in BF16; V projections and FFN-down higher.
QWEN_IMAGE_RULES = DitRules(QWEN_IMAGE_ARCH,
                            ("img_in.", "txt_in.", "time_text_embed.", "norm_out.", "proj_out.", "txt_norm."),
                            (".attn.to_v.", ".attn.add_v_proj.", ".img_mlp.net.2.", ".txt_mlp.net.2."))
# The same rules on 2.1's names (img_mlp.out is its FFN-down).  Its one shared modulation, which every block reads,
# stays BF16 like norm_out.linear: 1% of the parameters (1.x's per-block modulations are a third), and in BF16 it
# costs no dequantization per step.
QWEN_IMAGE_2_1_RULES = DitRules(QWEN_IMAGE_2_1_ARCH,
                                ("img_in.", "txt_in.", "time_text_embed.", "modulation.", "norm_out.", "proj_out."),
                                (".attn.to_v.", ".img_mlp.out."))
DIT_RULES = {"qwen_image": QWEN_IMAGE_RULES, "qwen_image_2_1": QWEN_IMAGE_2_1_RULES}  # by the registry's family


def fitting_type(qtype: GGMLType, shape: tuple[int, ...], high_precision: GGMLType = GGMLType.BF16) -> GGMLType:
    """``qtype`` if the rows fit its blocks, else its legacy fallback, else ``high_precision``."""
    if qtype in K_FALLBACK and shape[-1] % QUANT_BLOCKS[qtype][0]:
        qtype = K_FALLBACK[qtype]
    return qtype if shape[-1] % QUANT_BLOCKS[qtype][0] == 0 else high_precision


def dit_tensor_type(name: str, shape: tuple[int, ...], preset: str, depth: int,
                    rules: DitRules = QWEN_IMAGE_RULES) -> GGMLType:
    """The storage type of one DiT tensor under ``preset`` (see :data:`DIT_PRESETS`) and the family's ``rules``.

    1-D tensors stay F32; the rules' high-precision tensors (1.x: img_in, txt_in, time_text_embed, norm_out,
    proj_out; 2.1 also its shared modulation) stay BF16; blocks 0 and ``depth - 1``, the V projections and FFN-down
    get the preset's higher type; rows that do not fit a K format fall back to a legacy one (:data:`K_FALLBACK`).
    """
    if preset not in DIT_PRESETS:
        raise GGUFError(f"unknown preset {preset!r}; choose one of {', '.join(DIT_PRESETS)}.")
    base, higher = DIT_PRESETS[preset]
    if len(shape) < 2:
        return GGMLType.F32
    if name.startswith(rules.high_precision) or base in (GGMLType.F16, GGMLType.BF16):
        return base if base in (GGMLType.F16, GGMLType.BF16) else GGMLType.BF16
    key = "." + name
    sensitive = any(part in key for part in rules.sensitive) or \
        key.startswith((".transformer_blocks.0.", f".transformer_blocks.{depth - 1}."))
    return fitting_type(higher if sensitive else base, shape)
