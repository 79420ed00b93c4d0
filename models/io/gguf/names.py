"""Tensor names: llama.cpp's GGUF conventions <-> this package's (ComfyUI single-file) names.

* Text model (arch ``qwen2vl``, as llama.cpp's converter writes Qwen2.5-VL; no q/k permutation for Qwen2):
  ``token_embd``, ``blk.N.{attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, attn_norm,
  ffn_norm}``, ``output_norm``; ``output`` (the LM head) is not used.
* DiTs keep the diffusers names; ``general.architecture`` says which family: :data:`QWEN_IMAGE_ARCH` (1.x) or
  :data:`QWEN_IMAGE_2_1_ARCH` (2.1).
* Vision tower (the separate ``mmproj`` file, arch ``clip``, projector ``qwen2.5vl_merger``): the Conv3d patch
  embedding is stored as two 2-D slices ``v.patch_embd.weight`` / ``v.patch_embd.weight.1`` (temporal index 0
  and 1), the fused ``attn.qkv`` as ``v.blk.N.attn_q/attn_k/attn_v``, the blocks as ``v.blk.N.{ln1, ln2,
  attn_out, ffn_gate, ffn_up, ffn_down}``, the merger as ``v.post_ln`` (its RMSNorm) and ``mm.0`` / ``mm.2``.

:func:`text_encoder_sources` says, for each of our tensor names, which stored tensors make it and how they are
joined; :func:`to_llama_text` / :func:`to_mmproj` go the other way (for writing files).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["QWEN_IMAGE_ARCH", "QWEN_IMAGE_2_1_ARCH", "TEXT_LAYER_NAMES", "VISION_BLOCK_NAMES", "Source",
           "text_encoder_sources", "to_llama_text", "to_mmproj", "MMPROJ_PATCH_SLICES"]

# DiT architecture tags as city96's ComfyUI-GGUF converter writes them (tools/convert.py; its loader accepts only the
# tags in IMG_ARCH_LIST).  2.1: "qwen_image21", added to the converter with Qwen-Image 2.1 (city96/ComfyUI-GGUF
# issue #482, 2026-09-21) and seen in published 2.1 GGUFs.
QWEN_IMAGE_ARCH = "qwen_image"
QWEN_IMAGE_2_1_ARCH = "qwen_image21"

# llama.cpp leaf -> ours, inside blk.N / model.layers.N
TEXT_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TEXT_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
# mmproj leaf -> ours, inside v.blk.N / visual.blocks.N (attn_q/k/v are joined into attn.qkv)
VISION_BLOCK_NAMES = {
    "ln1": "norm1", "ln2": "norm2", "attn_out": "attn.proj", "attn_qkv": "attn.qkv",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
VISION_GLOBAL_NAMES = {"v.post_ln": "visual.merger.ln_q", "mm.0": "visual.merger.mlp.0",
                       "mm.2": "visual.merger.mlp.2"}
MMPROJ_PATCH_SLICES = ("v.patch_embd.weight", "v.patch_embd.weight.1")
_QKV_PARTS = ("attn_q", "attn_k", "attn_v")

_TEXT_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_VISION_BLOCK = re.compile(r"^v\.blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class Source:
    """Stored tensors (``(file, name)``, file "text" or "mmproj") making one of our tensors.

    ``join``: None (one part), "cat0" (concatenate rows: fused qkv) or "stack2" (stack on a new dim 2: the
    Conv3d patch embedding from its temporal slices).
    """

    parts: tuple[tuple[str, str], ...]
    join: str | None = None


def text_encoder_sources(text_names: Iterable[str], mmproj_names: Iterable[str] = ()) -> dict[str, Source]:
    """Our name -> :class:`Source` for a llama.cpp text GGUF and (optionally) its mmproj.  Unknown stored names
    are kept under their own name so the loader reports them as unexpected."""
    sources: dict[str, Source] = {}
    for name in text_names:
        if name.startswith("output."):
            continue  # the LM head: the condition is the final hidden state
        stem, _, leaf = name.rpartition(".")
        if stem in TEXT_GLOBAL_NAMES:
            sources[f"{TEXT_GLOBAL_NAMES[stem]}.{leaf}"] = Source((("text", name),))
        elif (m := _TEXT_BLOCK.match(name)) and m.group(2) in TEXT_LAYER_NAMES:
            sources[f"model.layers.{m.group(1)}.{TEXT_LAYER_NAMES[m.group(2)]}.{m.group(3)}"] = \
                Source((("text", name),))
        else:
            sources[name] = Source((("text", name),))
    mmproj_names = list(mmproj_names)
    present = set(mmproj_names)
    for name in mmproj_names:
        stem, _, leaf = name.rpartition(".")
        if name in MMPROJ_PATCH_SLICES:
            if all(s in present for s in MMPROJ_PATCH_SLICES):
                sources["visual.patch_embed.proj.weight"] = Source(tuple(("mmproj", s) for s in MMPROJ_PATCH_SLICES),
                                                                   "stack2")
            else:
                sources[name] = Source((("mmproj", name),))
        elif stem in VISION_GLOBAL_NAMES:
            sources[f"{VISION_GLOBAL_NAMES[stem]}.{leaf}"] = Source((("mmproj", name),))
        elif m := _VISION_BLOCK.match(name):
            block, part, leaf = m.groups()
            if part in _QKV_PARTS:
                names = tuple(f"v.blk.{block}.{p}.{leaf}" for p in _QKV_PARTS)
                if all(n in present for n in names):
                    sources[f"visual.blocks.{block}.attn.qkv.{leaf}"] = Source(tuple(("mmproj", n) for n in names),
                                                                             "cat0")
                    continue
            if part in VISION_BLOCK_NAMES:
                sources[f"visual.blocks.{block}.{VISION_BLOCK_NAMES[part]}.{leaf}"] = Source((("mmproj", name),))
            else:  # unknown, or a q/k/v part without its siblings: reported as unexpected by the loader
                sources[name] = Source((("mmproj", name),))
        else:
            sources[name] = Source((("mmproj", name),))
    return sources


def to_llama_text(name: str) -> str | None:
    """Our language-model tensor name -> llama.cpp's (``None`` for vision tensors and the LM head)."""
    if name.startswith("lm_head."):
        return "output." + name.split(".", 1)[1]
    stem, _, leaf = name.rpartition(".")
    for theirs, ours in TEXT_GLOBAL_NAMES.items():
        if stem == ours:
            return f"{theirs}.{leaf}"
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", stem)
    if m:
        for theirs, ours in TEXT_LAYER_NAMES.items():
            if m.group(2) == ours:
                return f"blk.{m.group(1)}.{theirs}.{leaf}"
    return None


def to_mmproj(name: str) -> list[tuple[str, str, int]]:
    """Our vision tensor name -> ``[(mmproj name, split kind, index)]``: split "" (as is), "qkv" (row third
    ``index`` of the fused qkv) or "temporal" (slice ``index`` of dim 2 of the patch Conv3d)."""
    if name == "visual.patch_embed.proj.weight":
        return [(s, "temporal", i) for i, s in enumerate(MMPROJ_PATCH_SLICES)]
    stem, _, leaf = name.rpartition(".")
    for theirs, ours in VISION_GLOBAL_NAMES.items():
        if stem == ours:
            return [(f"{theirs}.{leaf}", "", 0)]
    m = re.match(r"^visual\.blocks\.(\d+)\.(.+)$", stem)
    if m:
        block, part = m.groups()
        if part == "attn.qkv":
            return [(f"v.blk.{block}.{p}.{leaf}", "qkv", i) for i, p in enumerate(_QKV_PARTS)]
        for theirs, ours in VISION_BLOCK_NAMES.items():
            if part == ours:
                return [(f"v.blk.{block}.{theirs}.{leaf}", "", 0)]
    return []
