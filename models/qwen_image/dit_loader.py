"""Loading the Qwen-Image DiT from any of its published layouts.

:func:`load_diffusion_model` accepts a Comfy-Org single ``.safetensors`` file (bf16 / fp16 / fp32 / fp8 e4m3fn or
e5m2 / "scaled" fp8 with per-layer ``scale_weight`` and a ``scaled_fp8`` marker; with or without the
``model.diffusion_model.`` prefix), a diffusers folder (``config.json`` + sharded safetensors + index), a full
pipeline folder with ``transformer/``, and (through the GGUF reader) a ``.gguf`` file.  The shape of the model is
detected from tensor shapes alone; Edit-2511 (``zero_cond_t``) from ``config.json`` or ComfyUI's marker tensor
``__index_timestep_zero__``.  The model is built on the meta device and filled one tensor at a time; fp8 weights
stay fp8 (the ops namespace casts them per layer).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .dit import DiTConfig, QwenImageDiT
from ..common.ops import CastOps
from ..io.weights import FLOAT8_DTYPES, WeightFileError, assign_weights, open_checkpoint, tensor_dtype, tensor_shape

__all__ = ["load_diffusion_model", "detect_dit_config", "dit_from_tensors"]

logger = logging.getLogger("qwen_image")

COMFY_PREFIX = "model.diffusion_model."
ZERO_COND_MARKER = "__index_timestep_zero__"
SCALED_FP8_MARKER = "scaled_fp8"
_REQUIRED = ("img_in.weight", "txt_in.weight", "proj_out.weight", "transformer_blocks.0.attn.norm_q.weight")
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")

# Key patterns of other models, to say what a wrong file is.
_OTHER_MODELS = (
    ("double_blocks.", "a Flux model"),
    ("joint_blocks.", "a Stable Diffusion 3 model"),
    ("controlnet_blocks.", "a Qwen-Image ControlNet (load it with the ControlNet loader)"),
    ("model.layers.", "a text encoder (LLM)"),
    ("model.language_model.", "a text encoder (LLM)"),
    ("encoder.", "a VAE"),
    ("decoder.", "a VAE"),
    ("first_stage_model.", "a full checkpoint's VAE"),
    ("input_blocks.", "a UNet (SD1.x / SDXL) model"),
)


class _Prefixed(Mapping):
    """View of a checkpoint without a key prefix and without marker tensors; keeps ``shape``/``dtype``."""

    def __init__(self, tensors: Mapping, prefix: str, drop: frozenset[str], device: torch.device | None):
        self._tensors, self._prefix, self._device = tensors, prefix, device
        self._keys = {k[len(prefix):]: k for k in tensors if k.startswith(prefix) and k[len(prefix):] not in drop}

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._tensors[self._keys[name]]
        return tensor if self._device is None else tensor.to(self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return tensor_shape(self._tensors, self._keys[name])

    def dtype(self, name: str) -> torch.dtype:
        return tensor_dtype(self._tensors, self._keys[name])


def _describe_keys(keys: list[str]) -> str:
    sample = ", ".join(keys[:3]) if keys else "no tensors"
    return f"{len(keys)} tensors (e.g. {sample})"


def _find_prefix(keys: list[str], source: str) -> str:
    for prefix in (COMFY_PREFIX, ""):
        if all(prefix + k in keys for k in _REQUIRED):
            return prefix
    for pattern, what in _OTHER_MODELS:
        if any(k.startswith(pattern) or k.startswith(COMFY_PREFIX + pattern) for k in keys):
            raise WeightFileError(
                f"{source}: this looks like {what} ({_describe_keys(keys)}), not a Qwen-Image diffusion model. "
                f"Expected the Qwen-Image DiT keys ({', '.join(_REQUIRED)}, optionally prefixed "
                f"'{COMFY_PREFIX}'). Put the file in the right loader or pick a Qwen-Image DiT file.")
    raise WeightFileError(
        f"{source}: not a Qwen-Image diffusion model: found {_describe_keys(keys)}; expected the keys "
        f"{', '.join(_REQUIRED)} (optionally prefixed '{COMFY_PREFIX}').")


def detect_dit_config(tensors: Mapping, config_json: dict | None = None, source: str = "checkpoint") -> DiTConfig:
    """The :class:`DiTConfig` of a prefix-free Qwen-Image DiT mapping, from tensor shapes (no data read).

    RoPE axes follow ``(head_dim // 8, rest / 2, rest / 2)`` unless ``config_json`` names them.
    ``zero_cond_t`` (Edit-2511) comes from ``config_json`` or the marker tensor ``__index_timestep_zero__``.
    """
    def shape(key: str) -> tuple[int, ...]:
        return tensor_shape(tensors, key)

    width, in_channels = shape("img_in.weight")
    joint_dim = shape("txt_in.weight")[1]
    head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0]
    out_features = shape("proj_out.weight")[0]
    if width % head_dim or out_features % 4 or in_channels % 4:
        raise WeightFileError(f"{source}: inconsistent Qwen-Image DiT shapes (width {width}, head_dim {head_dim}, "
                              f"in {in_channels}, out {out_features}).")
    blocks = sorted({int(m.group(1)) for k in tensors if (m := _BLOCK.match(k))})
    if blocks != list(range(len(blocks))):
        raise WeightFileError(f"{source}: transformer_blocks are not numbered 0..N-1 (found {blocks[:5]}...); "
                              "the file is incomplete.")
    rest = head_dim - head_dim // 8
    axes = (head_dim // 8, rest // 2, rest - rest // 2)
    zero_cond = ZERO_COND_MARKER in tensors
    if config_json:
        axes = tuple(config_json.get("axes_dims_rope", axes))
        zero_cond = zero_cond or bool(config_json.get("zero_cond_t", False))
    if sum(axes) != head_dim:
        raise WeightFileError(f"{source}: RoPE axes {axes} do not add up to the head dimension {head_dim}.")
    return DiTConfig(depth=len(blocks), heads=width // head_dim, head_dim=head_dim, in_channels=in_channels,
                     out_channels=out_features // 4, joint_dim=joint_dim, axes_dim=axes, zero_cond_t=zero_cond)


def _weight_format(tensors: Mapping, scaled: bool) -> str:
    name = str(tensor_dtype(tensors, "transformer_blocks.0.attn.to_q.weight")).removeprefix("torch.")
    return f"{name} scaled" if scaled else name


def dit_from_tensors(tensors: Mapping, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     ops=None, config_json: dict | None = None, source: str = "checkpoint",
                     model_class: type[QwenImageDiT] = QwenImageDiT) -> QwenImageDiT:
    """Build a :class:`QwenImageDiT` from a ``name -> tensor`` mapping (any supported key layout).

    ``dtype`` is the compute dtype and the storage dtype of non-fp8 weights; fp8 weights are kept as stored.
    ``model_class``: a subclass to instantiate (a host adapts the calling convention this way).
    """
    keys = list(tensors)
    prefix = _find_prefix(keys, source)
    drop = frozenset({ZERO_COND_MARKER, SCALED_FP8_MARKER})
    target = torch.device(device)
    view = _Prefixed(tensors, prefix, drop, None if target.type == "cpu" else target)
    config = detect_dit_config(_Prefixed(tensors, prefix, frozenset({SCALED_FP8_MARKER}), None), config_json,
                               source)
    scaled = prefix + SCALED_FP8_MARKER in keys or any(k.endswith(".scale_weight") for k in keys)
    logger.info("Qwen-Image DiT: %d blocks, width %d, %s%s", config.depth, config.width,
                _weight_format(view, scaled), ", Edit-2511 zero_cond_t" if config.zero_cond_t else "")
    model = model_class(config, compute_dtype=dtype, ops=ops or CastOps, device="meta", dtype=dtype)
    assign_weights(model, view, dtype=dtype, keep_dtypes=FLOAT8_DTYPES, what=f"{source} (Qwen-Image DiT)")
    return model.eval()


def _open_gguf(path: Path):
    """GGUF plug point: return ``(tensors, ops)`` - a lazy mapping like ``SafetensorsCheckpoint`` (``shape(name)``
    giving the logical torch-order shape) and the operations namespace that computes with its tensors."""
    from ..io.gguf import open_dit_gguf

    return open_dit_gguf(path)


def load_diffusion_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu", ops=None,
                         model_class: type[QwenImageDiT] = QwenImageDiT) -> QwenImageDiT:
    """Load a Qwen-Image DiT from a single file, a diffusers folder, a pipeline folder or a ``.gguf`` file.

    ``dtype``: compute dtype (and storage dtype of non-fp8 weights).  ``ops``: operations namespace (default
    :class:`models.ops.CastOps`).  Raises :class:`WeightFileError` for a file that is not a Qwen-Image DiT.
    """
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "transformer").is_dir():
        path = path / "transformer"
    if path.suffix.lower() == ".gguf":
        tensors, gguf_ops = _open_gguf(path)
        return dit_from_tensors(tensors, dtype=dtype, device=device, ops=ops or gguf_ops, source=str(path),
                                model_class=model_class)
    checkpoint = open_checkpoint(path)
    return dit_from_tensors(checkpoint, dtype=dtype, device=device, ops=ops, config_json=checkpoint.config,
                            source=str(path), model_class=model_class)
