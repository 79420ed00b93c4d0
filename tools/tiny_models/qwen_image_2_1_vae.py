"""Tiny random-weight Qwen-Image 2.1 VAEs in the real file layouts: a diffusers ``vae`` folder
(``AutoencoderKLQwenImage21``) and a Comfy-Org single file (Wan 2.2 names, 5-D convolutions of temporal length 1).

Same conventions as :mod:`tiny_models.factory`: the real topology with small widths, values drawn per tensor from a
generator seeded by ``(seed, name)`` (so both layouts of one seed hold the same values), norm weights
``1 + 0.1 * randn`` (never all ones), files written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from models.qwen_image_2_1.latent import QWEN_IMAGE_2_1_LATENT
from models.qwen_image_2_1.vae_keys import comfy_shape, diffusers_to_comfy
from .factory import (_AtomicFolder, _FLOAT_DTYPES, _NORM, _conv, _convert, _random_weights, _write_json,
                      _write_safetensors)

__all__ = ["TINY_VAE_2_1", "make_vae_2_1"]

# diffusers AutoencoderKLQwenImage21(**TINY_VAE_2_1); real: base_dim 96, decoder_base_dim 144.  The real 64 latent
# channels (and statistics) are kept so the tiny VAE composes with a 2.1 DiT.
TINY_VAE_2_1: dict = {
    "base_dim": 8,
    "decoder_base_dim": 12,
    "z_dim": QWEN_IMAGE_2_1_LATENT.channels,
    "dim_mult": [1, 2, 4, 8, 8],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True, True],
    "dropout": 0.0,
    "latents_mean": list(QWEN_IMAGE_2_1_LATENT.mean),
    "latents_std": list(QWEN_IMAGE_2_1_LATENT.std),
    "is_residual": True,
    "in_channels": 4,
    "out_channels": 4,
    "patch_size": None,
    "scale_factor_temporal": 8,
    "scale_factor_spatial": 16,
}


def _residual(spec: dict, name: str, in_dim: int, out_dim: int) -> None:
    spec[f"{name}.norm1.gamma"] = ((in_dim, 1, 1, 1), _NORM)
    _conv(spec, f"{name}.conv1", out_dim, in_dim, (3, 3))
    spec[f"{name}.norm2.gamma"] = ((out_dim, 1, 1, 1), _NORM)
    _conv(spec, f"{name}.conv2", out_dim, out_dim, (3, 3))
    if in_dim != out_dim:
        _conv(spec, f"{name}.conv_shortcut", out_dim, in_dim, (1, 1))


def _middle(spec: dict, side: str, dim: int) -> None:
    _residual(spec, f"{side}.mid_block.resnets.0", dim, dim)
    spec[f"{side}.mid_block.attentions.0.norm.gamma"] = ((dim, 1, 1), _NORM)
    _conv(spec, f"{side}.mid_block.attentions.0.to_qkv", 3 * dim, dim, (1, 1))
    _conv(spec, f"{side}.mid_block.attentions.0.proj", dim, dim, (1, 1))
    _residual(spec, f"{side}.mid_block.resnets.1", dim, dim)


def _spec(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The diffusers AutoencoderKLQwenImage21 tensor names and shapes of this config (all convolutions 2-D)."""
    if config.get("attn_scales") or not config.get("is_residual", True) or config.get("patch_size") not in (None, 1):
        raise ValueError("the Qwen-Image 2.1 VAE is residual, unpatched, with attention only in the middle.")
    mult, res_blocks, temporal = list(config["dim_mult"]), config["num_res_blocks"], config["temperal_downsample"]
    z_dim, levels = config["z_dim"], len(config["dim_mult"])
    spec: dict = {}
    dims = [config["base_dim"] * m for m in [1] + mult]
    _conv(spec, "encoder.conv_in", dims[0], config["in_channels"], (3, 3))
    for level in range(levels):
        in_dim, out_dim = dims[level], dims[level + 1]
        for j in range(res_blocks):
            _residual(spec, f"encoder.down_blocks.{level}.resnets.{j}", in_dim if j == 0 else out_dim, out_dim)
        if level != levels - 1:
            _conv(spec, f"encoder.down_blocks.{level}.downsampler.resample.1", out_dim, out_dim, (3, 3))
            if temporal[level]:
                _conv(spec, f"encoder.down_blocks.{level}.downsampler.time_conv", out_dim, out_dim, (1, 1))
    _middle(spec, "encoder", dims[-1])
    spec["encoder.norm_out.gamma"] = ((dims[-1], 1, 1, 1), _NORM)
    _conv(spec, "encoder.conv_out", 2 * z_dim, dims[-1], (3, 3))
    _conv(spec, "quant_conv", 2 * z_dim, 2 * z_dim, (1, 1))
    _conv(spec, "post_quant_conv", z_dim, z_dim, (1, 1))
    dims = [config["decoder_base_dim"] * m for m in [mult[-1]] + mult[::-1]]
    _conv(spec, "decoder.conv_in", dims[0], z_dim, (3, 3))
    _middle(spec, "decoder", dims[0])
    for level in range(levels):
        in_dim, out_dim = dims[level], dims[level + 1]
        for j in range(res_blocks + 1):
            _residual(spec, f"decoder.up_blocks.{level}.resnets.{j}", in_dim if j == 0 else out_dim, out_dim)
        if level != levels - 1:
            _conv(spec, f"decoder.up_blocks.{level}.upsampler.resample.1", out_dim, out_dim, (3, 3))
            if temporal[::-1][level]:
                _conv(spec, f"decoder.up_blocks.{level}.upsampler.time_conv", 2 * out_dim, out_dim, (1, 1))
    spec["decoder.norm_out.gamma"] = ((dims[-1], 1, 1, 1), _NORM)
    _conv(spec, "decoder.conv_out", config["out_channels"], dims[-1], (3, 3))
    return spec


def make_vae_2_1(out_dir: str | os.PathLike, *, layout: str = "diffusers", dtype: str = "bf16", seed: int = 0,
                 config: dict | None = None) -> Path:
    """Write a tiny Qwen-Image 2.1 VAE; returns the folder (``"diffusers"``) or file (``"comfy"``).

    * ``diffusers``: ``out_dir/qwen_image_2.1_vae_{dtype}_diffusers/vae``: ``config.json`` (AutoencoderKLQwenImage21,
      with ``latents_mean`` / ``latents_std`` of ``z_dim`` values) + ``diffusion_pytorch_model.safetensors``.
    * ``comfy``: ``out_dir/qwen_image_2.1_vae_{dtype}.safetensors`` with the Comfy-Org names and shapes
      (:mod:`models.qwen_image_2_1.vae_keys`).
    """
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"VAE dtype must be one of {list(_FLOAT_DTYPES)}, got {dtype!r}.")
    config = dict(TINY_VAE_2_1 if config is None else config)
    z_dim = config["z_dim"]
    if len(config["latents_mean"]) != z_dim or len(config["latents_std"]) != z_dim:
        raise ValueError(f"latents_mean / latents_std must have z_dim = {z_dim} values.")
    tensors = _convert(_random_weights(_spec(config), seed), dtype, set())
    out_dir = Path(out_dir)
    if layout == "comfy":
        res_blocks = config["num_res_blocks"]
        path = out_dir / f"qwen_image_2.1_vae_{dtype}.safetensors"
        _write_safetensors({diffusers_to_comfy(name, res_blocks): t.reshape(comfy_shape(name, tuple(t.shape)))
                            for name, t in tensors.items()}, path)
        return path
    if layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}; expected 'diffusers' or 'comfy'.")
    target = out_dir / f"qwen_image_2.1_vae_{dtype}_diffusers"
    with _AtomicFolder(target, "vae") as tmp:
        _write_json({"_class_name": "AutoencoderKLQwenImage21", "_diffusers_version": "0.42.1", **config},
                    tmp / "config.json")
        _write_safetensors(tensors, tmp / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    return target / "vae"
