"""Tiny random-weight Qwen3-VL condition encoders (Qwen-Image 2.1) in the real file layouts.

The real topology (q/k-normed GQA decoder, interleaved M-RoPE, vision tower with learned position grid, LayerNorms,
DeepStack mergers, the 151936-token vocabulary so the real tokenizer works) with small widths; weights drawn as in
:mod:`tiny_models.factory` (same seed -> same values in every layout).

* ``comfy``: ``out_dir/qwen3vl_8b_{bf16,fp32,fp8_scaled}.safetensors`` (Comfy-Org's naming), one file with
  Comfy-style names (``model.layers.N...``, ``model.embed_tokens``, ``model.norm``, ``lm_head``, ``visual.*``), as
  Comfy-Org repackages Qwen-VL encoders; bf16 / fp32 / ``fp8_e4m3fn_scaled`` (the decoder's and vision tower's Linear
  weights in fp8 with ``scale_weight``).
* ``hf``: ``out_dir/qwen_image_2_1_{dtype}_hf/text_encoder`` like a Qwen-Image 2.1 diffusers folder: transformers-5
  names (``model.language_model.*``, ``model.visual.*``, ``lm_head``), ``config.json``, 2 shards and the index;
  with ``tokenizer_dir`` its files are copied to the sibling ``processor/`` folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .factory import (_BIAS, _CONV, _EMBEDDING, _LINEAR, _NORM, _SCALED_FP8, _AtomicFolder, _convert,
                       _linear, _random_weights, _write_json, _write_safetensors, _write_sharded)

__all__ = ["TINY_QWEN3VL_TEXT", "TINY_QWEN3VL_VISION", "make_qwen3vl", "transformers_name"]

# transformers Qwen3VLConfig(text_config=TINY_QWEN3VL_TEXT, vision_config=TINY_QWEN3VL_VISION).  The M-RoPE
# sections and DeepStack blocks follow the rules the loader applies without config.json (head_dim 32 -> 6, 5, 5;
# 5 blocks, 2 mergers -> 1, 2), so the single file and the folder describe the same model.
TINY_QWEN3VL_TEXT: dict = {
    "vocab_size": 151936,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                        "mrope_interleaved": True},
    "max_position_embeddings": 262144,
    "hidden_act": "silu",
    "attention_bias": False,
}

TINY_QWEN3VL_VISION: dict = {
    "depth": 5,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "in_channels": 3,
    "out_hidden_size": 64,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 64,
    "deepstack_visual_indexes": [1, 2],
    "hidden_act": "gelu_pytorch_tanh",
}

_DTYPES = ("bf16", "fp32", _SCALED_FP8)


def _layer_norm(spec: dict, name: str, dim: int) -> None:
    spec[f"{name}.weight"] = ((dim,), _NORM)
    spec[f"{name}.bias"] = ((dim,), _BIAS)


def _merger(spec: dict, name: str, vision: dict, post_shuffle: bool) -> None:
    merged = vision["hidden_size"] * vision["spatial_merge_size"] ** 2
    _layer_norm(spec, f"{name}.norm", merged if post_shuffle else vision["hidden_size"])
    _linear(spec, f"{name}.linear_fc1", merged, merged)
    _linear(spec, f"{name}.linear_fc2", vision["out_hidden_size"], merged)


def _spec(text: dict, vision: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Comfy-style tensor names of a Qwen3VLForConditionalGeneration with these configs."""
    hidden, head_dim = text["hidden_size"], text["head_dim"]
    q_dim, kv_dim = text["num_attention_heads"] * head_dim, text["num_key_value_heads"] * head_dim
    width, patch, temporal = vision["hidden_size"], vision["patch_size"], vision["temporal_patch_size"]
    spec: dict = {}
    spec["visual.patch_embed.proj.weight"] = ((width, vision["in_channels"], temporal, patch, patch), _CONV)
    spec["visual.patch_embed.proj.bias"] = ((width,), _BIAS)
    spec["visual.pos_embed.weight"] = ((vision["num_position_embeddings"], width), _EMBEDDING)
    for i in range(vision["depth"]):
        block = f"visual.blocks.{i}"
        _layer_norm(spec, f"{block}.norm1", width)
        _layer_norm(spec, f"{block}.norm2", width)
        _linear(spec, f"{block}.attn.qkv", 3 * width, width)
        _linear(spec, f"{block}.attn.proj", width, width)
        _linear(spec, f"{block}.mlp.linear_fc1", vision["intermediate_size"], width)
        _linear(spec, f"{block}.mlp.linear_fc2", width, vision["intermediate_size"])
    _merger(spec, "visual.merger", vision, post_shuffle=False)
    for k in range(len(vision["deepstack_visual_indexes"])):
        _merger(spec, f"visual.deepstack_merger_list.{k}", vision, post_shuffle=True)
    spec["model.embed_tokens.weight"] = ((text["vocab_size"], hidden), _EMBEDDING)
    for i in range(text["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        _linear(spec, f"{layer}.self_attn.q_proj", q_dim, hidden, bias=False)
        _linear(spec, f"{layer}.self_attn.k_proj", kv_dim, hidden, bias=False)
        _linear(spec, f"{layer}.self_attn.v_proj", kv_dim, hidden, bias=False)
        _linear(spec, f"{layer}.self_attn.o_proj", hidden, q_dim, bias=False)
        spec[f"{layer}.self_attn.q_norm.weight"] = ((head_dim,), _NORM)
        spec[f"{layer}.self_attn.k_norm.weight"] = ((head_dim,), _NORM)
        _linear(spec, f"{layer}.mlp.gate_proj", text["intermediate_size"], hidden, bias=False)
        _linear(spec, f"{layer}.mlp.up_proj", text["intermediate_size"], hidden, bias=False)
        _linear(spec, f"{layer}.mlp.down_proj", hidden, text["intermediate_size"], bias=False)
        spec[f"{layer}.input_layernorm.weight"] = ((hidden,), _NORM)
        spec[f"{layer}.post_attention_layernorm.weight"] = ((hidden,), _NORM)
    spec["model.norm.weight"] = ((hidden,), _NORM)
    spec["lm_head.weight"] = ((text["vocab_size"], hidden), _LINEAR)
    return spec


def transformers_name(name: str) -> str:
    """Comfy-style name -> transformers-5 ``Qwen3VLForConditionalGeneration`` name."""
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    if name.startswith("visual."):
        return "model." + name
    return name


def _hf_config(text: dict, vision: dict, dtype: str) -> dict:
    """config.json of a Qwen3VLForConditionalGeneration as transformers 5 saves it."""
    torch_dtype = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "transformers_version": "5.23.0",
        "dtype": torch_dtype,
        "text_config": {**text, "model_type": "qwen3_vl_text", "dtype": torch_dtype, "bos_token_id": 151643,
                        "eos_token_id": 151645, "attention_dropout": 0.0, "use_cache": True},
        "vision_config": {**vision, "model_type": "qwen3_vl_vision", "dtype": torch_dtype, "initializer_range": 0.02},
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": False,
    }


def make_qwen3vl(out_dir: str | os.PathLike, *, layout: str = "comfy", dtype: str = "bf16", seed: int = 0,
                 tokenizer_dir: str | os.PathLike | None = None, text: dict | None = None,
                 vision: dict | None = None) -> Path:
    """Write a tiny Qwen3-VL condition encoder (see the module docstring); returns the file or the
    ``text_encoder`` folder.  ``text`` / ``vision``: other configs (default the tiny ones)."""
    text, vision = text or TINY_QWEN3VL_TEXT, vision or TINY_QWEN3VL_VISION
    spec = _spec(text, vision)
    weights = _random_weights(spec, seed)
    quantize = {name for name, (_, kind) in spec.items() if kind == _LINEAR and name != "lm_head.weight"}
    out_dir = Path(out_dir)
    if layout == "comfy":
        if dtype not in _DTYPES:
            raise ValueError(f"text encoder dtype must be one of {_DTYPES}, got {dtype!r}.")
        suffix = {_SCALED_FP8: "fp8_scaled"}.get(dtype, dtype)
        path = out_dir / f"qwen3vl_8b_{suffix}.safetensors"  # Comfy-Org's naming (qwen3vl_8b_bf16.safetensors)
        _write_safetensors(_convert(weights, dtype, quantize), path)
        return path
    if layout != "hf":
        raise ValueError(f"unknown layout {layout!r}; expected 'comfy' or 'hf'.")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"an HF text_encoder folder holds bf16 or fp32 weights, got {dtype!r}.")
    target = out_dir / f"qwen_image_2_1_{dtype}_hf"
    with _AtomicFolder(target, "text_encoder") as tmp:
        _write_json(_hf_config(text, vision, dtype), tmp / "config.json")
        tensors = _convert(weights, dtype, quantize)
        _write_sharded({transformers_name(n): t for n, t in tensors.items()}, tmp, "model", num_shards=2)
        if tokenizer_dir is not None:
            (tmp.parent / "processor").mkdir()
            for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                shutil.copyfile(Path(tokenizer_dir) / name, tmp.parent / "processor" / name)
    return target / "text_encoder"
