"""Tiny random-weight checkpoints in the exact file layouts of the real Qwen-Image releases.

Every function writes files a loader cannot tell apart from the real ones except by size: the same tensor names,
the real topology (block structure, norms, biases, 3-D convs, the 152064-token vocabulary) with the small widths
of :mod:`tiny_models.configs`, the per-tensor dtypes of each variant, and the same container (one Comfy-Org
``.safetensors`` file, or a diffusers / transformers folder with ``config.json``, sharded weights and an index).

Weights are random but sensible so parity tests mean something: Linear / conv weights have std
``1 / sqrt(fan_in)`` (activations stay O(1) through the tiny models), biases are small but non-zero, and norm
weights are ``1 + 0.1 * randn`` (never all ones, so a wrong or missing norm mapping changes the output).  Each
tensor is drawn from its own generator seeded by ``(seed, name)``: the same seed gives byte-identical files, and
the Comfy and diffusers layouts of one seed hold the same values.

Files appear atomically (written under a temporary name in the target folder, then renamed), so an interrupted
run never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.qwen_image.latent import QWEN_IMAGE_LATENT
from models.qwen_image.vae_keys import diffusers_to_wan
from .configs import (TINY_BLOCKWISE, TINY_CONTROLNET, TINY_CONTROLNET_INPAINT, TINY_DIT, TINY_RGBA_VAE, TINY_TEXT,
                      TINY_VAE, TINY_VISION)

__all__ = ["EARLIER_NAMES", "make_dit", "make_vae", "make_text_encoder", "make_lora", "make_all", "make_controlnet",
           "make_controlnet_gguf", "make_blockwise_control", "DIT_PREFIX", "LORA_TARGETS"]

DIT_PREFIX = "model.diffusion_model."

# Latent normalisation of the Qwen-Image VAE (diffusers config.json), per latent channel.
_LATENTS_MEAN, _LATENTS_STD = list(QWEN_IMAGE_LATENT.mean), list(QWEN_IMAGE_LATENT.std)

_FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_SCALED_FP8 = "fp8_e4m3fn_scaled"

# Tensor kinds decide the random initialisation (and, for "linear", fp8 quantization).
_LINEAR, _CONV, _BIAS, _NORM, _EMBEDDING = "linear", "conv", "bias", "norm", "embedding"


# ---------------------------------------------------------------------------------------------------------------
# Tensor inventories: name -> (shape, kind), in the real files' names
# ---------------------------------------------------------------------------------------------------------------
def _linear(spec: dict, name: str, out_features: int, in_features: int, bias: bool = True) -> None:
    spec[f"{name}.weight"] = ((out_features, in_features), _LINEAR)
    if bias:
        spec[f"{name}.bias"] = ((out_features,), _BIAS)


def _dit_spec(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The diffusers / Comfy-Org tensor names of a QwenImageTransformer2DModel with this config."""
    if config.get("guidance_embeds"):
        raise ValueError("guidance_embeds=True is not a Qwen-Image layout (no released Qwen-Image DiT has it).")
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    head_dim = config["attention_head_dim"]
    text_dim = config["joint_attention_dim"]
    out_channels = config.get("out_channels") or config["in_channels"]
    spec: dict = {}
    _linear(spec, "time_text_embed.timestep_embedder.linear_1", dim, 256)
    _linear(spec, "time_text_embed.timestep_embedder.linear_2", dim, dim)
    if config.get("use_additional_t_cond"):  # Qwen-Image-Layered
        spec["time_text_embed.addition_t_embedding.weight"] = ((2, dim), _EMBEDDING)
    spec["txt_norm.weight"] = ((text_dim,), _NORM)
    _linear(spec, "img_in", dim, config["in_channels"])
    _linear(spec, "txt_in", dim, text_dim)
    for i in range(config["num_layers"]):
        block = f"transformer_blocks.{i}"
        for stream in ("img", "txt"):
            _linear(spec, f"{block}.{stream}_mod.1", 6 * dim, dim)
            _linear(spec, f"{block}.{stream}_mlp.net.0.proj", 4 * dim, dim)
            _linear(spec, f"{block}.{stream}_mlp.net.2", dim, 4 * dim)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _linear(spec, f"{block}.attn.{proj}", dim, dim)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            spec[f"{block}.attn.{norm}.weight"] = ((head_dim,), _NORM)
    _linear(spec, "norm_out.linear", 2 * dim, dim)
    _linear(spec, "proj_out", config["patch_size"] ** 2 * out_channels, dim)
    return spec


def _conv(spec: dict, name: str, out_ch: int, in_ch: int, kernel: tuple[int, ...]) -> None:
    spec[f"{name}.weight"] = ((out_ch, in_ch, *kernel), _CONV)
    spec[f"{name}.bias"] = ((out_ch,), _BIAS)


def _vae_residual(spec: dict, name: str, in_dim: int, out_dim: int) -> None:
    spec[f"{name}.norm1.gamma"] = ((in_dim, 1, 1, 1), _NORM)
    _conv(spec, f"{name}.conv1", out_dim, in_dim, (3, 3, 3))
    spec[f"{name}.norm2.gamma"] = ((out_dim, 1, 1, 1), _NORM)
    _conv(spec, f"{name}.conv2", out_dim, out_dim, (3, 3, 3))
    if in_dim != out_dim:
        _conv(spec, f"{name}.conv_shortcut", out_dim, in_dim, (1, 1, 1))


def _vae_middle(spec: dict, side: str, dim: int) -> None:
    _vae_residual(spec, f"{side}.mid_block.resnets.0", dim, dim)
    spec[f"{side}.mid_block.attentions.0.norm.gamma"] = ((dim, 1, 1), _NORM)
    _conv(spec, f"{side}.mid_block.attentions.0.to_qkv", 3 * dim, dim, (1, 1))
    _conv(spec, f"{side}.mid_block.attentions.0.proj", dim, dim, (1, 1))
    _vae_residual(spec, f"{side}.mid_block.resnets.1", dim, dim)


def _vae_spec(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The diffusers AutoencoderKLQwenImage tensor names (Wan 2.1 VAE topology) of this config."""
    if config.get("attn_scales"):
        raise ValueError("attn_scales must be empty: the Qwen-Image / Wan 2.1 VAE has attention only in the middle.")
    base, z_dim, mult = config["base_dim"], config["z_dim"], list(config["dim_mult"])
    res_blocks, temporal_down = config["num_res_blocks"], list(config["temperal_downsample"])
    spec: dict = {}
    # Encoder: flat list of residual blocks with a resample block after every level but the last.
    dims = [base * m for m in [1] + mult]
    image_channels = config.get("input_channels", 3)  # 4 for the RGBA (Layered) VAE
    _conv(spec, "encoder.conv_in", dims[0], image_channels, (3, 3, 3))
    index = 0
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(res_blocks):
            _vae_residual(spec, f"encoder.down_blocks.{index}", in_dim, out_dim)
            in_dim = out_dim
            index += 1
        if level != len(mult) - 1:
            _conv(spec, f"encoder.down_blocks.{index}.resample.1", out_dim, out_dim, (3, 3))
            if temporal_down[level]:
                _conv(spec, f"encoder.down_blocks.{index}.time_conv", out_dim, out_dim, (3, 1, 1))
            index += 1
    _vae_middle(spec, "encoder", dims[-1])
    spec["encoder.norm_out.gamma"] = ((dims[-1], 1, 1, 1), _NORM)
    _conv(spec, "encoder.conv_out", 2 * z_dim, dims[-1], (3, 3, 3))
    _conv(spec, "quant_conv", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    _conv(spec, "post_quant_conv", z_dim, z_dim, (1, 1, 1))
    # Decoder: levels from the deepest; an upsampler halves the channels it hands to the next level.
    dims = [base * m for m in [mult[-1]] + mult[::-1]]
    temporal_up = temporal_down[::-1]
    _conv(spec, "decoder.conv_in", dims[0], z_dim, (3, 3, 3))
    _vae_middle(spec, "decoder", dims[0])
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if level > 0:
            in_dim //= 2
        for j in range(res_blocks + 1):
            _vae_residual(spec, f"decoder.up_blocks.{level}.resnets.{j}", in_dim, out_dim)
            in_dim = out_dim
        if level != len(mult) - 1:
            up = f"decoder.up_blocks.{level}.upsamplers.0"
            _conv(spec, f"{up}.resample.1", out_dim // 2, out_dim, (3, 3))
            if temporal_up[level]:
                _conv(spec, f"{up}.time_conv", 2 * out_dim, out_dim, (3, 1, 1))
    spec["decoder.norm_out.gamma"] = ((dims[-1], 1, 1, 1), _NORM)
    _conv(spec, "decoder.conv_out", image_channels, dims[-1], (3, 3, 3))
    return spec


def _text_encoder_spec(text: dict, vision: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Qwen2.5-VL tensor names as Comfy-Org files and transformers-4.x checkpoints store them."""
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    head_dim = text.get("head_dim") or hidden // text["num_attention_heads"]
    q_dim, kv_dim = text["num_attention_heads"] * head_dim, text["num_key_value_heads"] * head_dim
    v_dim, v_inter = vision["hidden_size"], vision["intermediate_size"]
    patch, t_patch = vision["patch_size"], vision["temporal_patch_size"]
    spec: dict = {}  # vision tower first, as transformers 4.x ordered its state dict
    spec["visual.patch_embed.proj.weight"] = ((v_dim, vision["in_chans"], t_patch, patch, patch), _CONV)
    for i in range(vision["depth"]):
        block = f"visual.blocks.{i}"
        spec[f"{block}.norm1.weight"] = ((v_dim,), _NORM)
        spec[f"{block}.norm2.weight"] = ((v_dim,), _NORM)
        _linear(spec, f"{block}.attn.qkv", 3 * v_dim, v_dim)
        _linear(spec, f"{block}.attn.proj", v_dim, v_dim)
        _linear(spec, f"{block}.mlp.gate_proj", v_inter, v_dim)
        _linear(spec, f"{block}.mlp.up_proj", v_inter, v_dim)
        _linear(spec, f"{block}.mlp.down_proj", v_dim, v_inter)
    merged = v_dim * vision["spatial_merge_size"] ** 2
    spec["visual.merger.ln_q.weight"] = ((v_dim,), _NORM)
    _linear(spec, "visual.merger.mlp.0", merged, merged)
    _linear(spec, "visual.merger.mlp.2", vision["out_hidden_size"], merged)
    spec["model.embed_tokens.weight"] = ((text["vocab_size"], hidden), _EMBEDDING)
    for i in range(text["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        _linear(spec, f"{layer}.self_attn.q_proj", q_dim, hidden)
        _linear(spec, f"{layer}.self_attn.k_proj", kv_dim, hidden)
        _linear(spec, f"{layer}.self_attn.v_proj", kv_dim, hidden)
        _linear(spec, f"{layer}.self_attn.o_proj", hidden, q_dim, bias=False)
        _linear(spec, f"{layer}.mlp.gate_proj", inter, hidden, bias=False)
        _linear(spec, f"{layer}.mlp.up_proj", inter, hidden, bias=False)
        _linear(spec, f"{layer}.mlp.down_proj", hidden, inter, bias=False)
        spec[f"{layer}.input_layernorm.weight"] = ((hidden,), _NORM)
        spec[f"{layer}.post_attention_layernorm.weight"] = ((hidden,), _NORM)
    spec["model.norm.weight"] = ((hidden,), _NORM)
    spec["lm_head.weight"] = ((text["vocab_size"], hidden), _LINEAR)
    return spec


# ---------------------------------------------------------------------------------------------------------------
# Random values and dtype conversion
# ---------------------------------------------------------------------------------------------------------------
def _random_tensor(name: str, shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    """fp32 values for one tensor, from a generator seeded by (seed, name) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    if kind in (_LINEAR, _CONV):
        return values / math.sqrt(math.prod(shape[1:]))
    if kind == _BIAS:
        return values * 0.1
    if kind == _NORM:
        return 1.0 + 0.1 * values
    return values  # embedding rows: unit scale; the first decoder layer's RMSNorm sees them


def _random_weights(spec: dict, seed: int) -> dict[str, torch.Tensor]:
    return {name: _random_tensor(name, shape, kind, seed) for name, (shape, kind) in spec.items()}


def _to_fp8(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    return weight.clamp(-limit, limit).to(dtype)


def _convert(weights: dict[str, torch.Tensor], dtype: str, quantize: set[str]) -> dict[str, torch.Tensor]:
    """Cast to the file dtype.  fp8 variants: the 2-D Linear weights named in ``quantize`` become fp8, the rest
    (biases, norms, embeddings, convs) stay bf16; "scaled" fp8 adds per-layer ``scale_weight`` (the stored
    weight is ``fp8(w / scale_weight)``), ``scale_input`` and the ``scaled_fp8`` marker as ComfyUI reads them."""
    if dtype in _FLOAT_DTYPES:
        return {name: t.to(_FLOAT_DTYPES[dtype]) for name, t in weights.items()}
    if dtype not in _FP8_DTYPES and dtype != _SCALED_FP8:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {[*_FLOAT_DTYPES, *_FP8_DTYPES, _SCALED_FP8]}.")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name not in quantize:
            out[name] = tensor.to(torch.bfloat16)
        elif dtype == _SCALED_FP8:
            layer = name[: -len(".weight")]
            scale = tensor.abs().amax() / torch.finfo(torch.float8_e4m3fn).max
            out[name] = _to_fp8(tensor / scale, torch.float8_e4m3fn)
            out[f"{layer}.scale_weight"] = scale.reshape(()).to(torch.float32)
            out[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            out[name] = _to_fp8(tensor, _FP8_DTYPES[dtype])
    if dtype == _SCALED_FP8:
        # ComfyUI detects scaled fp8 by this key and takes the fp8 format from its dtype; it writes the key as
        # an empty tensor itself when saving a scaled model (comfy/model_base.py), which is what this mirrors.
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Atomic writing
# ---------------------------------------------------------------------------------------------------------------
def _temporary_sibling(path: Path, suffix: str) -> Path:
    """A unique hidden name next to ``path`` (same folder, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file under a temporary name next to ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path, ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors creates owner-only files; model files are world-readable
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class _AtomicFolder:
    """Build ``target/subfolder`` under a temporary name; on success ``target`` is replaced by renames only."""

    def __init__(self, target: Path, subfolder: str):
        self.target = target
        self.subfolder = subfolder
        self.tmp = _temporary_sibling(target, ".tmp")

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        (self.tmp / self.subfolder).mkdir(parents=True)
        return self.tmp / self.subfolder

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = _temporary_sibling(self.target, ".old")
        if self.target.exists():
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        shutil.rmtree(old, ignore_errors=True)


def _write_sharded(tensors: dict[str, torch.Tensor], folder: Path, stem: str, num_shards: int) -> None:
    """HF-style shards ``{stem}-0000i-of-0000n.safetensors`` plus ``{stem}.safetensors.index.json``."""
    names = list(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    # Contiguous runs in state-dict order, each holding about 1/num_shards of the bytes.
    shard_of: dict[str, int] = {}
    filled = 0
    for name, size in zip(names, sizes):
        shard_of[name] = min(num_shards - 1, filled * num_shards // total)
        filled += size
    if len(set(shard_of.values())) != num_shards:
        raise ValueError(f"cannot split {len(names)} tensors into {num_shards} non-empty shards.")
    files = [f"{stem}-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    for i, file in enumerate(files):
        _write_safetensors({n: tensors[n] for n in names if shard_of[n] == i}, folder / file, {"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": {n: files[shard_of[n]] for n in sorted(names)}}
    _write_json(index, folder / f"{stem}.safetensors.index.json")


# ---------------------------------------------------------------------------------------------------------------
# Public factories
# ---------------------------------------------------------------------------------------------------------------
def make_dit(out_dir: str | os.PathLike, *, layout: str = "comfy", dtype: str = "bf16", prefix: bool = False,
             variant: str = "plain", seed: int = 0, config: dict | None = None) -> Path:
    """Write a tiny Qwen-Image DiT; returns the file (``layout="comfy"``) or folder (``"diffusers"``).

    * ``comfy``: one ``.safetensors`` with the diffusers tensor names, optionally all prefixed
      ``model.diffusion_model.``; dtypes ``bf16 fp16 fp32 fp8_e4m3fn fp8_e5m2 fp8_e4m3fn_scaled``.
    * ``diffusers``: ``out_dir/qwen_image[_edit_2511]_{dtype}_diffusers/transformer``: ``config.json`` +
      3 shards ``diffusion_pytorch_model-0000i-of-00003.safetensors`` + index (bf16/fp16/fp32 only).
    * fp8 files: 2-D Linear weights in fp8, biases and norm weights in bf16 (Comfy-Org's exact choice per tensor
      could not be checked here; ComfyUI loads either).
    * ``variant="edit2511"``: the Qwen-Image-Edit-2511 flag: the ``__index_timestep_zero__`` marker tensor in a
      Comfy file (what ComfyUI looks for), ``"zero_cond_t": true`` in a diffusers ``config.json``.
    * ``variant="layered"``: Qwen-Image-Layered: ``time_text_embed.addition_t_embedding`` (the only extra tensor)
      and, in a diffusers ``config.json``, ``use_additional_t_cond`` / ``use_layer3d_rope``.
    """
    if variant not in ("plain", "edit2511", "layered"):
        raise ValueError(f"unknown variant {variant!r}; expected 'plain', 'edit2511' or 'layered'.")
    config = dict(TINY_DIT if config is None else config)
    if variant == "layered":
        config.update(use_additional_t_cond=True, use_layer3d_rope=True)
    spec = _dit_spec(config)
    weights = _random_weights(spec, seed)
    quantize = {name for name, (_, kind) in spec.items() if kind == _LINEAR}
    stem = "qwen_image" + {"plain": "", "edit2511": "_edit_2511", "layered": "_layered"}[variant]
    out_dir = Path(out_dir)
    if layout == "comfy":
        tensors = _convert(weights, dtype, quantize)
        if variant == "edit2511":
            tensors["__index_timestep_zero__"] = torch.empty(0, dtype=torch.float32)
        if prefix:
            tensors = {DIT_PREFIX + name: t for name, t in tensors.items()}
        path = out_dir / f"{stem}_{dtype}{'_prefixed' if prefix else ''}.safetensors"
        _write_safetensors(tensors, path)
        return path
    if layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}; expected 'comfy' or 'diffusers'.")
    if dtype not in _FLOAT_DTYPES or prefix:
        raise ValueError("a diffusers transformer folder holds bf16/fp16/fp32 weights with unprefixed names.")
    diffusers_config = {
        "_class_name": "QwenImageTransformer2DModel",
        "_diffusers_version": "0.36.0",
        **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
    }
    if variant == "edit2511":
        diffusers_config["zero_cond_t"] = True
    target = out_dir / f"{stem}_{dtype}_diffusers"
    with _AtomicFolder(target, "transformer") as tmp:
        _write_json(diffusers_config, tmp / "config.json")
        _write_sharded(_convert(weights, dtype, quantize), tmp, "diffusion_pytorch_model", num_shards=3)
    return target / "transformer"


def make_vae(out_dir: str | os.PathLike, *, layout: str = "comfy", dtype: str = "bf16", seed: int = 0,
             config: dict | None = None, variant: str = "rgb") -> Path:
    """Write a tiny Qwen-Image (Wan 2.1) VAE; returns the file (``"comfy"``) or folder (``"diffusers"``).

    * ``comfy``: one ``.safetensors`` with the original Wan names (``encoder.conv1``, ``encoder.downsamples.N``,
      ``conv1``, ``conv2``, ``decoder.upsamples.N`` ...), as in Comfy-Org's ``qwen_image_vae.safetensors``.
    * ``diffusers``: ``out_dir/qwen_image_vae[_{dtype}]_diffusers/vae``: ``config.json`` (AutoencoderKLQwenImage,
      with the real latents_mean / latents_std) + ``diffusion_pytorch_model.safetensors``.
    * ``variant="rgba"``: the Qwen-Image-Layered VAE (4 image channels in and out), ``qwen_image_layered_vae*``.
    """
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"VAE dtype must be one of {list(_FLOAT_DTYPES)}, got {dtype!r}.")
    if variant not in ("rgb", "rgba"):
        raise ValueError(f"unknown VAE variant {variant!r}; expected 'rgb' or 'rgba'.")
    config = dict((TINY_VAE if variant == "rgb" else TINY_RGBA_VAE) if config is None else config)
    stem = "qwen_image_vae" if variant == "rgb" else "qwen_image_layered_vae"
    spec = _vae_spec(config)
    tensors = _convert(_random_weights(spec, seed), dtype, set())
    suffix = "" if dtype == "bf16" else f"_{dtype}"
    out_dir = Path(out_dir)
    if layout == "comfy":
        path = out_dir / f"{stem}{suffix}.safetensors"
        num_res_blocks = config["num_res_blocks"]
        _write_safetensors({diffusers_to_wan(name, num_res_blocks): t for name, t in tensors.items()}, path)
        return path
    if layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}; expected 'comfy' or 'diffusers'.")
    diffusers_config = {
        "_class_name": "AutoencoderKLQwenImage",
        "_diffusers_version": "0.36.0",
        **config,
        "latents_mean": _LATENTS_MEAN[: config["z_dim"]],
        "latents_std": _LATENTS_STD[: config["z_dim"]],
    }
    target = out_dir / f"{stem}{suffix}_diffusers"
    with _AtomicFolder(target, "vae") as tmp:
        _write_json(diffusers_config, tmp / "config.json")
        _write_safetensors(tensors, tmp / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    return target / "vae"


def _hf_text_encoder_config(text: dict, vision: dict, dtype: str) -> dict:
    """config.json of a Qwen2_5_VLForConditionalGeneration as transformers 4.5x saved Qwen-Image's text_encoder:
    the language-model settings both at the top level and in ``text_config``."""
    torch_dtype = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    tokens = {"bos_token_id": 151643, "eos_token_id": 151645}
    text_config = {**text, **tokens, "model_type": "qwen2_5_vl_text", "torch_dtype": torch_dtype,
                   "attention_dropout": 0.0, "use_cache": True, "use_sliding_window": False,
                   "sliding_window": 32768, "max_window_layers": text["num_hidden_layers"]}
    vision_config = {**vision, "in_channels": vision["in_chans"], "spatial_patch_size": vision["patch_size"],
                     "tokens_per_second": 2, "model_type": "qwen2_5_vl", "torch_dtype": torch_dtype}
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "transformers_version": "4.53.1",
        **{k: v for k, v in text_config.items() if k != "model_type"},
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
    }


def make_text_encoder(out_dir: str | os.PathLike, *, layout: str = "comfy", dtype: str = "bf16", seed: int = 0,
                      tokenizer_dir: str | os.PathLike | None = None, hidden_size: int | None = None) -> Path:
    """Write a tiny Qwen2.5-VL condition encoder (real 152064-token vocabulary); returns file or folder.

    * ``comfy``: one ``.safetensors`` like Comfy-Org's ``qwen_2.5_vl_7b*.safetensors``: ``model.layers.N...``,
      ``model.embed_tokens``, ``model.norm``, ``lm_head``, ``visual.*``; dtypes ``bf16 fp32 fp8_e4m3fn_scaled``
      (scaled: the Linear layers of the decoder and the vision tower in fp8 with ``scale_weight``; embeddings,
      ``lm_head``, norms, biases and the patch conv in bf16).
    * ``hf``: ``out_dir/qwen_2.5_vl_7b_{dtype}_hf/text_encoder``, like the Qwen/Qwen-Image repository's
      ``text_encoder`` folder: ``config.json``, 2 shards
      ``model-0000i-of-00002.safetensors`` with the same (transformers 4.x) names, and the index.  With
      ``tokenizer_dir``, its ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` are copied alongside.
    * ``hidden_size``: another language-model width (the vision tower's output follows), e.g. an encoder that does
      not fit the tiny DiT, as a Qwen2.5-VL-3B does not fit Qwen-Image.
    """
    text, vision = TINY_TEXT, TINY_VISION
    if hidden_size is not None:
        text, vision = {**text, "hidden_size": hidden_size}, {**vision, "out_hidden_size": hidden_size}
    spec = _text_encoder_spec(text, vision)
    weights = _random_weights(spec, seed)
    quantize = {name for name, (_, kind) in spec.items() if kind == _LINEAR and name != "lm_head.weight"}
    out_dir = Path(out_dir)
    if layout == "comfy":
        if dtype not in ("bf16", "fp32", _SCALED_FP8):
            raise ValueError(f"text encoder dtype must be bf16, fp32 or {_SCALED_FP8}, got {dtype!r}.")
        suffix = {"bf16": "", "fp32": "_fp32", _SCALED_FP8: "_fp8_scaled"}[dtype]
        path = out_dir / f"qwen_2.5_vl_7b{suffix}.safetensors"
        _write_safetensors(_convert(weights, dtype, quantize), path)
        return path
    if layout != "hf":
        raise ValueError(f"unknown layout {layout!r}; expected 'comfy' or 'hf'.")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"an HF text_encoder folder holds bf16 or fp32 weights, got {dtype!r}.")
    target = out_dir / f"qwen_2.5_vl_7b_{dtype}_hf"
    with _AtomicFolder(target, "text_encoder") as tmp:
        _write_json(_hf_text_encoder_config(text, vision, dtype), tmp / "config.json")
        _write_sharded(_convert(weights, dtype, quantize), tmp, "model", num_shards=2)
        if tokenizer_dir is not None:
            for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
    return target / "text_encoder"


# The Linears LoRA trainers target in every block (ai-toolkit / diffusers defaults for Qwen-Image).
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                "txt_mlp.net.2")
_LORA_FORMATS = ("diffusers", "kohya")


def make_lora(out_dir: str | os.PathLike, *, rank: int = 4, lora_format: str = "diffusers", alpha: float | None = None,
              seed: int = 0, config: dict | None = None, name: str | None = None) -> Path:
    """A LoRA for the tiny DiT, as trainers save them.

    ``"diffusers"``: ``transformer.<module>.lora_A.weight [rank, in]`` / ``lora_B.weight [out, rank]`` (diffusers,
    ai-toolkit, PEFT); ``"kohya"``: ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` and an
    ``alpha`` scalar (kohya / musubi).  The update of a weight is ``up @ down * (alpha / rank)`` (scale 1 without
    alpha).  Values are large enough to change the output visibly.
    """
    if lora_format not in _LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {lora_format!r}; expected one of {_LORA_FORMATS}.")
    spec = _dit_spec(config or TINY_DIT)
    tensors: dict[str, torch.Tensor] = {}
    for module in (f"transformer_blocks.{i}.{t}" for i in range((config or TINY_DIT)["num_layers"]) for t in LORA_TARGETS):
        out_features, in_features = spec[f"{module}.weight"][0]
        down = _random_tensor(f"{module}.lora_down", (rank, in_features), _LINEAR, seed)
        up = _random_tensor(f"{module}.lora_up", (out_features, rank), _LINEAR, seed) * 0.5
        if lora_format == "diffusers":
            tensors[f"transformer.{module}.lora_A.weight"] = down
            tensors[f"transformer.{module}.lora_B.weight"] = up
        else:
            key = "lora_unet_" + module.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    path = Path(out_dir) / (name or f"qwen_image_tiny_lora_{lora_format}.safetensors")
    _write_safetensors({k: v.to(torch.bfloat16) if v.ndim else v for k, v in tensors.items()}, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# ControlNets
# ---------------------------------------------------------------------------------------------------------------
# variant -> (default config, InstantX repo name, Comfy-Org single-file name, seed salt)
_CONTROLNET_VARIANTS = {
    "union": (TINY_CONTROLNET, "Qwen-Image-ControlNet-Union", "Qwen-Image-InstantX-ControlNet-Union", 101),
    "inpaint": (TINY_CONTROLNET_INPAINT, "Qwen-Image-ControlNet-Inpainting",
                "Qwen-Image-InstantX-ControlNet-Inpainting", 102),
}
# Comfy-Org file names in models/model_patches (DiffSynth-Studio ships each as model.safetensors).
_BLOCKWISE_VARIANTS = {"canny": 201, "depth": 202, "inpaint": 203}


def _controlnet_spec(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """diffusers QwenImageControlNetModel names: the DiT's input side and blocks (no norm_out / proj_out), one
    ``controlnet_blocks.N`` per block and ``controlnet_x_embedder``."""
    dit = {k: v for k, v in config.items() if k != "extra_condition_channels"}
    spec = {name: entry for name, entry in _dit_spec(dit).items() if not name.startswith(("norm_out.", "proj_out."))}
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    for i in range(config["num_layers"]):
        _linear(spec, f"controlnet_blocks.{i}", dim, dim)
    _linear(spec, "controlnet_x_embedder", dim, config["in_channels"] + config.get("extra_condition_channels", 0))
    return spec


def _controlnet_weights(variant: str, seed: int, config: dict | None) -> tuple[dict, dict[str, torch.Tensor]]:
    if variant not in _CONTROLNET_VARIANTS:
        raise ValueError(f"unknown ControlNet variant {variant!r}; expected one of {list(_CONTROLNET_VARIANTS)}.")
    default, _, _, salt = _CONTROLNET_VARIANTS[variant]
    config = dict(default if config is None else config)
    # Salted seed: the blocks share the DiT's names, and equal values would hide a mix-up of the two models.
    return config, _random_weights(_controlnet_spec(config), seed * 1000 + salt)


def make_controlnet(out_dir: str | os.PathLike, *, variant: str = "union", dtype: str = "bf16",
                    layout: str = "diffusers", seed: int = 0, config: dict | None = None) -> Path:
    """Write a tiny InstantX Qwen-Image ControlNet; returns the folder (``"diffusers"``) or file (``"comfy"``).

    * ``diffusers``: ``out_dir/Qwen-Image-ControlNet-Union`` (or ``-Inpainting``) with ``config.json`` and
      ``diffusion_pytorch_model.safetensors``, as in the InstantX repositories.
    * ``comfy``: that single file as ``out_dir/Qwen-Image-InstantX-ControlNet-Union.safetensors`` (Comfy-Org's name;
      users keep it in ``models/controlnet``).
    * ``variant="inpaint"``: ``controlnet_x_embedder`` takes 68 channels (64 + the packed keep mask).

    ``config``: diffusers QwenImageControlNetModel kwargs (default :data:`TINY_CONTROLNET` /
    :data:`TINY_CONTROLNET_INPAINT`).  Values differ from the DiT's of the same seed.
    """
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"ControlNet dtype must be one of {list(_FLOAT_DTYPES)}, got {dtype!r}.")
    config, weights = _controlnet_weights(variant, seed, config)
    tensors = _convert(weights, dtype, set())
    _, repo_name, comfy_name, _ = _CONTROLNET_VARIANTS[variant]
    out_dir = Path(out_dir)
    if layout == "comfy":
        path = out_dir / f"{comfy_name}{'' if dtype == 'bf16' else '_' + dtype}.safetensors"
        _write_safetensors(tensors, path)
        return path
    if layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}; expected 'diffusers' or 'comfy'.")
    diffusers_config = {
        "_class_name": "QwenImageControlNetModel",
        "_diffusers_version": "0.35.0.dev0",
        **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        # present in the released config.json, ignored by diffusers
        "guidance_embeds": False,
        "pooled_projection_dim": 768,
    }
    target = out_dir / f"{repo_name}{'' if dtype == 'bf16' else '_' + dtype}"
    with _AtomicFolder(target, "") as tmp:  # the repository root holds the files (no subfolder)
        _write_json(diffusers_config, tmp / "config.json")
        _write_safetensors(tensors, tmp / "diffusion_pytorch_model.safetensors")
    return target


def make_controlnet_gguf(out_dir: str | os.PathLike, *, variant: str = "union", qtype: str = "Q8_0", seed: int = 0,
                         config: dict | None = None) -> Path:
    """Write ``out_dir/Qwen-Image-InstantX-ControlNet-{Union|Inpainting}-{qtype}.gguf``: the values of
    :func:`make_controlnet` (same seed), diffusers names, arch ``qwen_image`` (what a city96-style converter
    writes for these keys); matrices in ``qtype`` where rows fit (else a fallback type), 1-D tensors F32."""
    from models.io.gguf.quantize import fitting_type
    from models.io.gguf.reader import GGMLType
    from .gguf_factory import write_qwen_image_gguf  # it builds on this module

    _, weights = _controlnet_weights(variant, seed, config)
    return write_qwen_image_gguf(
        Path(out_dir) / f"{_CONTROLNET_VARIANTS[variant][2]}-{qtype}.gguf", "Qwen-Image ControlNet (tiny random weights)",
        weights, lambda _, shape: GGMLType.F32 if len(shape) == 1 else fitting_type(GGMLType[qtype], shape))


def _blockwise_spec(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """DiffSynth / ComfyUI QwenImageBlockWiseControlNet names."""
    dim = config["dim"]
    spec: dict = {}
    _linear(spec, "img_in", dim, config["in_dim"] + config["additional_in_dim"])
    for i in range(config["num_layers"]):
        block = f"controlnet_blocks.{i}"
        spec[f"{block}.x_rms.weight"] = ((dim,), _NORM)
        spec[f"{block}.y_rms.weight"] = ((dim,), _NORM)
        _linear(spec, f"{block}.input_proj", dim, dim)
        _linear(spec, f"{block}.output_proj", dim, dim)
    return spec


def make_blockwise_control(out_dir: str | os.PathLike, *, variant: str = "canny", dtype: str = "bf16",
                           seed: int = 0, config: dict | None = None) -> Path:
    """Write ``out_dir/qwen_image_{variant}_diffsynth_controlnet.safetensors`` (Comfy-Org's names for ComfyUI's
    ``models/model_patches``): a tiny DiffSynth blockwise ControlNet, one control block per tiny DiT block.

    ``variant``: ``canny`` / ``depth`` (same topology, different values) or ``inpaint`` (``img_in`` takes 68
    channels).  ``config``: ComfyUI QwenImageBlockWiseControlNet kwargs (default :data:`TINY_BLOCKWISE`).
    """
    if variant not in _BLOCKWISE_VARIANTS:
        raise ValueError(f"unknown blockwise variant {variant!r}; expected one of {list(_BLOCKWISE_VARIANTS)}.")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"blockwise ControlNet dtype must be one of {list(_FLOAT_DTYPES)}, got {dtype!r}.")
    config = dict(TINY_BLOCKWISE if config is None else config)
    if variant == "inpaint" and config["additional_in_dim"] == 0:
        config["additional_in_dim"] = 4
    weights = _random_weights(_blockwise_spec(config), seed * 1000 + _BLOCKWISE_VARIANTS[variant])
    path = Path(out_dir) / f"qwen_image_{variant}_diffsynth_controlnet{'' if dtype == 'bf16' else '_' + dtype}.safetensors"
    _write_safetensors(_convert(weights, dtype, set()), path)
    return path


def _renamed(path: Path, target: Path) -> Path:
    """Move a written file to ``target`` (the same weights under another release's file name)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    path.replace(target)
    path.parent.rmdir()
    return target


# Names earlier templates used for Qwen-Image 2.1's files, before they took Comfy-Org's own: make_all links each to
# the file it names now, so workflows saved from those templates (tests/fixtures/workflows_v1/) still find it.
EARLIER_NAMES = {
    "diffusion_models/qwen_image_2_1_bf16.safetensors": "diffusion_models/qwen_image_2.1_bf16.safetensors",
    "diffusion_models/qwen_image_2_1_turbo_bf16.safetensors":
        "diffusion_models/qwen_image_2.1_turbo_bf16.safetensors",
    "text_encoders/qwen_3_vl_8b.safetensors": "text_encoders/qwen3vl_8b_bf16.safetensors",
}


def _linked(path: Path, target: Path) -> Path:
    """``target`` as a hard link to the written file ``path`` (a copy where the file system has no hard links)."""
    target.unlink(missing_ok=True)
    try:
        os.link(path, target)
    except OSError:
        shutil.copyfile(path, target)
    return target


def make_all(out_dir: str | os.PathLike, seed: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The common set for demos, in ComfyUI's model folders under ``out_dir``: ``diffusion_models/
    qwen_image_bf16.safetensors``, ``qwen_image_2512_bf16.safetensors`` (the same architecture under its release's
    name), ``qwen_image_edit_2511_bf16.safetensors`` and ``qwen_image_layered_bf16.safetensors``,
    ``vae/qwen_image_vae.safetensors`` and the Layered RGBA ``vae/qwen_image_layered_vae.safetensors``,
    ``text_encoders/qwen_2.5_vl_7b.safetensors``, ``loras/qwen_image_tiny_lora_diffusers.safetensors`` and the
    Lightning LoRAs under their released names (:data:`tiny_models.loras.LIGHTNING_LORAS`) and an EliGen LoRA, the
    InstantX ControlNet-Union and Inpainting in ``controlnet/``, a DiffSynth canny patch in ``model_patches/``, Qwen-Image
    2.1's ``diffusion_models/qwen_image_2.1_bf16.safetensors`` and ``qwen_image_2.1_turbo_bf16.safetensors`` (other
    weights), ``vae/qwen_image_2.1_vae_bf16.safetensors`` and ``text_encoders/qwen3vl_8b_bf16.safetensors`` (each
    2.1 file also under the name earlier templates used, :data:`EARLIER_NAMES`: roles ``..._earlier_name``); with
    ``tokenizer_dir`` (GGUF text encoders carry their tokenizer) also ``diffusion_models/qwen-image-Q8_0.gguf``
    and ``text_encoders/Qwen2.5-VL-7B-Instruct-Q8_0.gguf`` with its mmproj file."""
    out_dir = Path(out_dir)
    written = {
        "diffusion_model": make_dit(out_dir / "diffusion_models", seed=seed),
        "edit_diffusion_model": make_dit(out_dir / "diffusion_models", variant="edit2511", seed=seed + 1),
        "diffusion_model_2512": _renamed(make_dit(out_dir / "2512", seed=seed + 2),
                                         out_dir / "diffusion_models" / "qwen_image_2512_bf16.safetensors"),
        "layered_diffusion_model": make_dit(out_dir / "diffusion_models", variant="layered", seed=seed + 3),
        "vae": make_vae(out_dir / "vae", seed=seed),
        "layered_vae": make_vae(out_dir / "vae", variant="rgba", seed=seed + 1),
        "text_encoder": make_text_encoder(out_dir / "text_encoders", seed=seed),
        "lora": make_lora(out_dir / "loras", seed=seed),
        "controlnet": make_controlnet(out_dir / "controlnet", variant="union", layout="comfy", seed=seed),
        "controlnet_inpaint": make_controlnet(out_dir / "controlnet", variant="inpaint", layout="comfy", seed=seed),
        "blockwise_canny": make_blockwise_control(out_dir / "model_patches", variant="canny", seed=seed),
    }
    from .loras import make_eligen_lora, make_lightning_loras  # it builds on this module

    written.update({f"lightning_lora_{model}": path
                    for model, path in make_lightning_loras(out_dir / "loras", seed=seed).items()})
    written["eligen_lora"] = make_eligen_lora(out_dir / "loras", seed=seed)
    from .qwen3vl import make_qwen3vl  # the 2.1 factories build on this module
    from .qwen_image_2_1 import make_dit_2_1
    from .qwen_image_2_1_vae import make_vae_2_1

    written.update(
        diffusion_model_2_1=make_dit_2_1(out_dir / "diffusion_models", seed=seed),
        turbo_diffusion_model_2_1=_renamed(make_dit_2_1(out_dir / "2.1_turbo", seed=seed + 1),
                                           out_dir / "diffusion_models" / "qwen_image_2.1_turbo_bf16.safetensors"),
        vae_2_1=make_vae_2_1(out_dir / "vae", layout="comfy", seed=seed),
        text_encoder_2_1=make_qwen3vl(out_dir / "text_encoders", seed=seed),
    )
    current = {path.relative_to(out_dir).as_posix(): role for role, path in written.items()}
    written.update({f"{current[name]}_earlier_name": _linked(out_dir / name, out_dir / earlier)
                    for earlier, name in EARLIER_NAMES.items()})
    if tokenizer_dir is not None:
        from .gguf_factory import make_dit_gguf, make_text_encoder_gguf  # it builds on this module

        written["diffusion_model_gguf"] = make_dit_gguf(out_dir / "diffusion_models", qtype="Q8_0", seed=seed)
        text, mmproj = make_text_encoder_gguf(out_dir / "text_encoders", qtype="Q8_0", seed=seed,
                                              tokenizer_dir=tokenizer_dir)
        written.update(text_encoder_gguf=text, mmproj=mmproj)
    return written
