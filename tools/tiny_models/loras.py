"""Tiny LoRA files for the tiny DiT (and text encoder) in the exact key layouts trainers publish (REFERENCE.md s.7).

* :func:`write_lora`: one file in a trainer's layout (:data:`LAYOUTS`) with one adapter kind (:data:`KINDS`):
  LoRA (with or without ``.alpha``), LyCORIS LoKr / LoHa, full ``.diff`` / ``.diff_b`` deltas, or LoRA + DoRA
  ``.dora_scale``; any modules of the tiny DiT (:func:`dit_modules`, e.g. with ``img_mod.1`` / ``txt_mod.1``) and
  optionally text-encoder modules.
* :func:`write_foreign_lora`: a Flux or SDXL LoRA at the tiny widths, so its attention names and shapes would fit
  the tiny Qwen-Image DiT if a loader matched them by name alone.
* :func:`make_lightning_loras`: the Lightning LoRAs' released file names (lightx2v layout) for the workflows.

Values come from one generator per tensor name (:func:`tiny_models.factory._random_tensor`): the same arguments
give the same bytes.  Adapter tensors are bf16 like the released files, ``.alpha`` a float32 scalar.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from build_workflows import ELIGEN_LORA, LIGHTNING_LORAS  # tools/: the workflows name the files
from .configs import TINY_DIT, TINY_TEXT, TINY_VISION
from .factory import LORA_TARGETS, _LINEAR, _NORM, _dit_spec, _random_tensor, _text_encoder_spec, _write_safetensors

__all__ = ["write_lora", "write_foreign_lora", "make_lightning_loras", "make_eligen_lora", "dit_modules", "LAYOUTS", "KINDS",
           "TEXT_ENCODER_TARGETS"]

# layout -> (DiT key prefix, module names flattened with "_", down / up tensor names, text-encoder key prefix)
LAYOUTS: dict[str, tuple[str, bool, str, str, str | None]] = {
    "ai-toolkit": ("diffusion_model.", False, "lora_A.weight", "lora_B.weight", "text_encoder."),
    "diffsynth": ("", False, "lora_A.default.weight", "lora_B.default.weight", None),
    "diffsynth-pipe": ("pipe.dit.", False, "lora_A.default.weight", "lora_B.default.weight", None),
    "kohya": ("lora_unet_", True, "lora_down.weight", "lora_up.weight", "lora_te_"),
    "diffusers": ("transformer.", False, "lora_A.weight", "lora_B.weight", "text_encoder."),
    "peft": ("base_model.model.", False, "lora_A.default.weight", "lora_B.default.weight", None),
    "onetrainer": ("lora_transformer_", True, "lora_down.weight", "lora_up.weight", "lora_te_"),
    "lightx2v": ("", False, "lora_down.weight", "lora_up.weight", None),
    "lycoris": ("lycoris_", True, "lora_down.weight", "lora_up.weight", None),
}
KINDS = ("lora", "lokr", "loha", "diff", "dora")
# The text-encoder Linears a LoRA that trains the text encoder targets, per layer.
TEXT_ENCODER_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LOKR_FACTOR = 4  # w1 is [4, 4]: every tiny Linear's sides are multiples of 4


def dit_modules(config: dict | None = None, *, targets: Sequence[str] = LORA_TARGETS, modulation: bool = False,
                top_level: Sequence[str] = ()) -> list[str]:
    """Module names of the tiny DiT: ``targets`` in every block (``modulation`` adds ``img_mod.1`` / ``txt_mod.1``),
    then the top-level modules named in ``top_level`` (``img_in``, ``proj_out``, ``norm_out.linear``, ...)."""
    per_block = (*targets, *(("img_mod.1", "txt_mod.1") if modulation else ()))
    blocks = (config or TINY_DIT)["num_layers"]
    return [f"transformer_blocks.{i}.{t}" for i in range(blocks) for t in per_block] + list(top_level)


def _shapes(config: dict | None) -> dict[str, tuple[int, ...]]:
    spec = {**_dit_spec(config or TINY_DIT), **{f"te:{name}": entry for name, entry in
                                                 _text_encoder_spec(TINY_TEXT, TINY_VISION).items()}}
    return {name: shape for name, (shape, _) in spec.items()}


def _adapter(kind: str, name: str, shape: tuple[int, ...], rank: int, seed: int, dora_axis: str,
             down: str, up: str) -> dict[str, torch.Tensor]:
    """The adapter tensors of one module (``name`` seeds them) for a weight of ``shape``."""
    def rand(suffix: str, *size: int) -> torch.Tensor:
        return _random_tensor(f"{name}.{suffix}", size, _LINEAR, seed)

    if len(shape) == 1:  # a norm weight: only a full delta can change it
        if kind != "diff":
            raise ValueError(f"{name} is a 1-D weight: only kind 'diff' applies to it")
        return {"diff": rand("diff", *shape) * 0.1}
    out_features, in_features = shape
    if kind in ("lora", "dora"):
        tensors = {down: rand("down", rank, in_features), up: rand("up", out_features, rank) * 0.5}
        if kind == "dora":  # magnitudes near the tiny weights' row / column norms (about 1)
            size = (out_features, 1) if dora_axis == "output" else (1, in_features)
            tensors["dora_scale"] = _random_tensor(f"{name}.dora", size, _NORM, seed)
        return tensors
    if kind == "lokr":  # w1 full, w2 low rank: delta = kron(w1, w2_a @ w2_b)
        a, b = _LOKR_FACTOR, _LOKR_FACTOR
        return {"lokr_w1": rand("w1", a, b) * 2.0, "lokr_w2_a": rand("w2_a", out_features // a, rank),
                "lokr_w2_b": rand("w2_b", rank, in_features // b)}
    if kind == "loha":  # delta = (w1_a @ w1_b) * (w2_a @ w2_b)
        return {"hada_w1_a": rand("w1_a", out_features, rank) * 2.0, "hada_w1_b": rand("w1_b", rank, in_features),
                "hada_w2_a": rand("w2_a", out_features, rank) * 2.0, "hada_w2_b": rand("w2_b", rank, in_features)}
    if kind == "diff":
        return {"diff": rand("diff", out_features, in_features) * 0.3}
    raise ValueError(f"unknown adapter kind {kind!r}; expected one of {KINDS}")


def write_lora(path: str | os.PathLike, *, layout: str = "diffusers", kind: str = "lora", rank: int = 4,
               alpha: float | None = None, modules: Sequence[str] | None = None,
               text_encoder_modules: Sequence[str] = (), dora_axis: str = "output", seed: int = 0,
               config: dict | None = None) -> Path:
    """Write a LoRA for the tiny DiT at ``path`` in ``layout`` with adapter ``kind``.

    ``modules``: DiT module names (default :func:`dit_modules`); ``alpha``: an ``.alpha`` scalar per module (none
    when None); ``text_encoder_modules``: tiny text-encoder modules (``model.layers.0.self_attn.q_proj``) under the
    layout's text-encoder prefix; ``dora_axis``: DoRA magnitudes per ``"output"`` row or ``"input"`` column.
    ``"diff"`` also writes ``.diff_b`` for modules with a bias (and ``.diff`` alone for 1-D norm weights).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {list(LAYOUTS)}")
    prefix, flat, down, up, te_prefix = LAYOUTS[layout]
    if text_encoder_modules and te_prefix is None:
        raise ValueError(f"the {layout} layout has no text-encoder keys")
    shapes = _shapes(config)
    targets = [(prefix, name, name) for name in (modules if modules is not None else dit_modules(config))]
    targets += [(te_prefix, f"te:{name}", name) for name in text_encoder_modules]
    tensors: dict[str, torch.Tensor] = {}
    for key_prefix, spec_name, module in targets:
        key = key_prefix + (module.replace(".", "_") if flat else module)
        for name, tensor in _adapter(kind, module, shapes[f"{spec_name}.weight"], rank, seed, dora_axis,
                                     down, up).items():
            tensors[f"{key}.{name}"] = tensor.to(torch.bfloat16)
        if kind == "diff" and f"{spec_name}.bias" in shapes:
            tensors[f"{key}.diff_b"] = (0.1 * _random_tensor(f"{module}.diff_b", shapes[f"{spec_name}.bias"],
                                                             _LINEAR, seed)).to(torch.bfloat16)
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    path = Path(path)
    _write_safetensors(tensors, path)
    return path


# Another model's LoRA module names -> (out, in) at the tiny width: Flux (diffusers names; its double blocks'
# attention is named like Qwen-Image's) and SDXL (kohya names, both text encoders).
def _foreign_modules(family: str, dim: int) -> tuple[str, dict[str, tuple[int, int]], float | None]:
    if family == "flux":
        modules = {f"transformer.transformer_blocks.{i}.{m}": (dim, dim) for i in range(2) for m in (
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
            "attn.to_out.0", "attn.to_add_out")}
        modules |= {f"transformer.transformer_blocks.{i}.{m}": (4 * dim, dim) for i in range(2)
                    for m in ("ff.net.0.proj", "ff_context.net.0.proj")}
        modules |= {f"transformer.single_transformer_blocks.0.{m}": (dim, dim)
                    for m in ("attn.to_q", "attn.to_k", "attn.to_v")}
        modules["transformer.single_transformer_blocks.0.proj_mlp"] = (4 * dim, dim)
        return "lora_A.weight", modules, None
    if family == "sdxl":
        modules = {f"lora_unet_{block}_transformer_blocks_0_{m}": (dim, dim)
                   for block in ("input_blocks_4_1", "output_blocks_2_1")
                   for m in ("attn1_to_q", "attn1_to_k", "attn2_to_q", "attn2_to_out_0")}
        modules |= {f"lora_te{i}_text_model_encoder_layers_0_self_attn_{p}_proj": (dim, dim)
                    for i in (1, 2) for p in ("q", "k")}
        return "lora_down.weight", modules, 2.0
    raise ValueError(f"unknown family {family!r}; expected 'flux' or 'sdxl'")


def write_foreign_lora(path: str | os.PathLike, family: str = "flux", *, rank: int = 4, seed: int = 0) -> Path:
    """A ``family`` ("flux" or "sdxl") LoRA at the tiny DiT's width."""
    dim = TINY_DIT["num_attention_heads"] * TINY_DIT["attention_head_dim"]
    down, modules, alpha = _foreign_modules(family, dim)
    up = down.replace("lora_A", "lora_B").replace("lora_down", "lora_up")
    tensors: dict[str, torch.Tensor] = {}
    for key, (out_features, in_features) in modules.items():
        for name, tensor in _adapter("lora", key, (out_features, in_features), rank, seed, "output", down,
                                     up).items():
            tensors[f"{key}.{name}"] = tensor.to(torch.bfloat16)
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    path = Path(path)
    _write_safetensors(tensors, path)
    return path


def make_lightning_loras(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Tiny stand-ins for the Lightning LoRAs under the released names the workflows use
    (:data:`build_workflows.LIGHTNING_LORAS`), in lightx2v's layout (bare module names, ``lora_down`` / ``lora_up``
    and ``alpha``) on every block Linear incl. the modulation."""
    return {model: write_lora(Path(out_dir) / name, layout="lightx2v", alpha=4.0,
                              modules=dit_modules(modulation=True), seed=seed + i)
            for i, (model, name) in enumerate(LIGHTNING_LORAS.items())}


def make_eligen_lora(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny stand-in for DiffSynth's EliGen LoRAs under the name the EliGen workflow uses
    (:data:`build_workflows.ELIGEN_LORA`), in DiffSynth's layout (``<module>.lora_A.default.weight``, no alpha) on
    every block Linear incl. the modulation."""
    return write_lora(Path(out_dir) / ELIGEN_LORA, layout="diffsynth", modules=dit_modules(modulation=True),
                      seed=seed + 7)
