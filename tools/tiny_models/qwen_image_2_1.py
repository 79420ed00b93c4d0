"""Tiny random-weight Qwen-Image 2.1 DiTs in the published file layouts.

:func:`make_dit_2_1` writes the tensors of diffusers' ``QwenImage21Transformer2DModel(**TINY_DIT_2_1)`` (real
topology: single-stream blocks, shared modulation, SwiGLU, no biases; small width) as a Comfy-Org single file, a
diffusers ``transformer/`` folder or a GGUF (the diffusers names, arch ``qwen_image``: published files and
tools/quantize_gguf.py tag ``qwen_image21``, so this one exercises the registry's by-name fallback).  Values,
writing and fp8 conversion are :mod:`tiny_models.factory`'s: each tensor from its own generator seeded by
``(seed, name)`` (same seed, same bytes; every layout of one seed holds the same model), Linear weights with std
``1 / sqrt(fan_in)``, q/k RMSNorm weights ``1 + 0.1 n`` and the zero-centred text norm (stored ``scale - 1``)
``0.1 n``: no norm is the identity, so a wrong or missing norm mapping changes the output.
"""

from __future__ import annotations

import os
from pathlib import Path

from models.io.gguf.quantize import fitting_type
from models.io.gguf.reader import GGMLType
from .factory import (_BIAS, _LINEAR, _NORM, _AtomicFolder, _convert, _linear, _random_weights, _write_json,
                      _write_safetensors, _write_sharded, DIT_PREFIX)
from .gguf_factory import write_qwen_image_gguf

__all__ = ["TINY_DIT_2_1", "K_QUANT_DIT_2_1", "make_dit_2_1", "dit_2_1_spec", "dit_2_1_weights"]

# diffusers QwenImage21Transformer2DModel(**TINY_DIT_2_1); real: 32 layers, 32 heads x 128, context 4096, axes
# (16, 56, 56).  context_in_dim equals the tiny text encoders' hidden size, so tiny models compose end to end.
TINY_DIT_2_1: dict = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": 64,
    "num_layers": 3,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "context_in_dim": 64,
    "mlp_ratio": 3,
    "axes_dims_rope": (4, 14, 14),
    "eps": 1e-6,
    "causal_condition": True,
}
# 8 heads x 32 = 256 wide, 256-wide text input, MLP 768: every block Linear has rows that are a multiple of 256, so
# K formats really apply (in TINY_DIT_2_1 they fall back to legacy ones).
K_QUANT_DIT_2_1: dict = {**TINY_DIT_2_1, "num_attention_heads": 8, "context_in_dim": 256}


def dit_2_1_spec(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The diffusers / Comfy-Org tensor names of a QwenImage21Transformer2DModel with this config, in state-dict
    order: ``name -> (shape, kind)``."""
    if config.get("patch_size", 1) != 1:
        raise ValueError("Qwen-Image 2.1 reads latents unpatched: patch_size must be 1.")
    width = config["num_attention_heads"] * config["attention_head_dim"]
    hidden = width * config["mlp_ratio"]
    context = config["context_in_dim"]
    spec: dict = {}
    _linear(spec, "time_text_embed.timestep_embedder.linear_1", width, 256, bias=False)
    _linear(spec, "time_text_embed.timestep_embedder.linear_2", width, width, bias=False)
    spec["txt_in.text_norm.weight"] = ((context,), _BIAS)  # zero-centred: small values around 0 (= scale - 1)
    _linear(spec, "txt_in.in_layer", width, context, bias=False)
    _linear(spec, "txt_in.out_layer", width, width, bias=False)
    _linear(spec, "img_in", width, config["in_channels"], bias=False)
    _linear(spec, "modulation.1", 4 * width, width, bias=False)
    for i in range(config["num_layers"]):
        block = f"transformer_blocks.{i}"
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            _linear(spec, f"{block}.attn.{proj}", width, width, bias=False)
        for norm in ("norm_q", "norm_k"):
            spec[f"{block}.attn.{norm}.weight"] = ((config["attention_head_dim"],), _NORM)
        _linear(spec, f"{block}.img_mlp.proj", hidden, width, bias=False)
        _linear(spec, f"{block}.img_mlp.out", width, hidden, bias=False)
        _linear(spec, f"{block}.img_mlp.gate_layer", hidden, width, bias=False)
    _linear(spec, "norm_out.linear", width, width, bias=False)
    _linear(spec, "proj_out", config.get("out_channels") or config["in_channels"], width, bias=False)
    return spec


def dit_2_1_weights(seed: int = 0, config: dict | None = None):
    """The fp32 weights ``name -> tensor`` every layout of ``seed`` stores."""
    return _random_weights(dit_2_1_spec(TINY_DIT_2_1 if config is None else config), seed)


def make_dit_2_1(out_dir: str | os.PathLike, *, layout: str = "comfy", dtype: str = "bf16", prefix: bool = False,
                 seed: int = 0, config: dict | None = None) -> Path:
    """Write a tiny Qwen-Image 2.1 DiT; returns the file (``"comfy"``, ``"gguf"``) or folder (``"diffusers"``).

    * ``comfy``: ``out_dir/qwen_image_2.1_{dtype}[_prefixed].safetensors`` (Comfy-Org's naming), optionally every
      name prefixed ``model.diffusion_model.``; dtypes ``bf16 fp16 fp32 fp8_e4m3fn fp8_e5m2 fp8_e4m3fn_scaled``
      (fp8: the Linear weights in fp8, norms in bf16; scaled adds ``scale_weight`` / ``scale_input`` and
      ``scaled_fp8``).
    * ``diffusers``: ``out_dir/qwen_image_2_1_{dtype}_diffusers/transformer``: ``config.json`` + 3 shards + index
      (bf16 / fp16 / fp32).
    * ``gguf``: ``out_dir/qwen-image-2.1-{dtype}.gguf`` with ``dtype`` a ggml type name (Q8_0, Q4_0, F16 ...)
      for every matrix whose rows fit it (others BF16), 1-D tensors F32.
    """
    config = dict(TINY_DIT_2_1 if config is None else config)
    spec = dit_2_1_spec(config)
    weights = _random_weights(spec, seed)
    out_dir = Path(out_dir)
    if layout == "gguf":
        if dtype not in GGMLType.__members__ or prefix:
            raise ValueError(f"a GGUF takes a ggml type name (Q8_0, F16 ...) and unprefixed names, got {dtype!r}.")
        qtype = GGMLType[dtype]
        return write_qwen_image_gguf(
            out_dir / f"qwen-image-2.1-{dtype}.gguf", "Qwen-Image 2.1 (tiny random weights)", weights,
            lambda name, shape: fitting_type(qtype, shape) if len(shape) > 1 else GGMLType.F32)
    quantize = {name for name, (_, kind) in spec.items() if kind == _LINEAR}
    if layout == "comfy":
        tensors = _convert(weights, dtype, quantize)
        if prefix:
            tensors = {DIT_PREFIX + name: t for name, t in tensors.items()}
        path = out_dir / f"qwen_image_2.1_{dtype}{'_prefixed' if prefix else ''}.safetensors"
        _write_safetensors(tensors, path)
        return path
    if layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}; expected 'comfy', 'diffusers' or 'gguf'.")
    if dtype not in ("bf16", "fp16", "fp32") or prefix:
        raise ValueError("a diffusers transformer folder holds bf16/fp16/fp32 weights with unprefixed names.")
    diffusers_config = {
        "_class_name": "QwenImage21Transformer2DModel",
        "_diffusers_version": "0.42.1",
        **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
    }
    target = out_dir / f"qwen_image_2_1_{dtype}_diffusers"
    with _AtomicFolder(target, "transformer") as tmp:
        _write_json(diffusers_config, tmp / "config.json")
        _write_sharded(_convert(weights, dtype, quantize), tmp, "diffusion_pytorch_model", num_shards=3)
    return target / "transformer"
