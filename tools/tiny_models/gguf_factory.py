"""Tiny random-weight GGUF checkpoints in the layouts the community publishes (and one full-size synthetic file).

* :func:`make_dit_gguf`: a Qwen-Image DiT as city96 ships it (arch ``qwen_image``, diffusers names).
* :func:`make_text_encoder_gguf`: a llama.cpp Qwen2.5-VL text GGUF (arch ``qwen2vl``, with tokenizer metadata if
  a tokenizer folder is given) plus its ``mmproj`` GGUF (arch ``clip``).
* :func:`make_full_size_dit_gguf`: a full-size (60 blocks, width 3072) file of random valid blocks, streamed to
  disk tensor by tensor (for open-time benchmarks).

The float values are exactly those of :mod:`tiny_models.factory` for the same seed (same generator per
tensor name), so a GGUF and a safetensors file of one seed hold the same model up to quantization.  The same
seed gives identical bytes.

K formats need rows that are multiples of 256: in :data:`TINY_DIT` almost no row qualifies (those tensors fall
back to a legacy type, see :func:`models.io.gguf.quantize.fitting_type`); :data:`K_QUANT_DIT` is a tiny config whose
block Linears have 256-wide rows, so K formats really apply there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.io.gguf.names import to_llama_text, to_mmproj
from models.io.gguf.quantize import DIT_PRESETS, dit_tensor_type, fitting_type, quantize
from models.io.gguf.reader import QUANT_BLOCKS, GGMLType, quantized_nbytes
from models.io.gguf.writer import GGUFWriter
from .configs import FULL_DIT, TINY_DIT, TINY_TEXT, TINY_VISION
from .factory import _dit_spec, _random_weights, _text_encoder_spec

__all__ = ["make_dit_gguf", "make_text_encoder_gguf", "make_full_size_dit_gguf", "K_QUANT_DIT", "MMPROJ_NAME"]

# 8 heads x 32 = 256 wide and a 256-wide text input: every block Linear has rows that are a multiple of 256.
K_QUANT_DIT: dict = {**TINY_DIT, "num_attention_heads": 8, "joint_attention_dim": 256}
MMPROJ_NAME = "Qwen2.5-VL-7B-Instruct-mmproj-F16.gguf"

# Where the fp16 scale fields sit inside one block (for synthetic blocks that must decode to finite values).
_F16_FIELDS = {GGMLType.Q8_0: (0,), GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,),
               GGMLType.Q5_1: (0, 2), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,)}


def _tensor_type(name: str, shape: tuple[int, ...], qtype: str, depth: int) -> GGMLType:
    """A preset (Q4_K_M, ...) applies the Qwen-Image rules; a type name quantizes every matrix uniformly."""
    if qtype in DIT_PRESETS and qtype not in GGMLType.__members__:
        return dit_tensor_type(name, shape, qtype, depth)
    if len(shape) < 2:
        return GGMLType.F32
    return fitting_type(GGMLType[qtype], shape)


def make_dit_gguf(out_dir: str | os.PathLike, *, qtype: str = "Q8_0", seed: int = 0,
                  config: dict | None = None) -> Path:
    """Write ``out_dir/qwen-image-{qtype}.gguf``: the tiny DiT of ``config`` (default :data:`TINY_DIT`).

    ``qtype``: a ggml type name (Q8_0, Q4_0, Q5_1, Q4_K, Q5_K, Q6_K, F16, BF16, ...) applied to every matrix
    (1-D tensors F32; rows that do not fit fall back), or a preset (Q4_K_M, Q5_K_M, Q4_K_S, ...) with the usual
    Qwen-Image rules (:func:`models.io.gguf.quantize.dit_tensor_type`).
    """
    config = dict(TINY_DIT if config is None else config)
    weights = _random_weights(_dit_spec(config), seed)
    return write_qwen_image_gguf(Path(out_dir) / f"qwen-image-{qtype}.gguf", "Qwen-Image (tiny random weights)",
                                 weights, lambda name, shape: _tensor_type(name, shape, qtype, config["num_layers"]))


def write_qwen_image_gguf(path: Path, title: str, weights: dict[str, torch.Tensor],
                          tensor_type: Callable[[str, tuple[int, ...]], GGMLType]) -> Path:
    """Write ``weights`` (diffusers names) as a GGUF of arch ``qwen_image``, each tensor quantized to
    ``tensor_type(name, shape)``, the way city96-style converters write Qwen-Image models."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "qwen_image")
    writer.add("general.name", title)
    writer.add("general.quantization_version", 2)
    for name, tensor in weights.items():
        ggml = tensor_type(name, tuple(tensor.shape))
        writer.add_tensor(name, quantize(tensor, ggml), ggml, tensor.shape)
    return writer.write()


def _tokenizer_metadata(writer: GGUFWriter, tokenizer_dir: Path, vocab_size: int) -> None:
    """llama.cpp's gpt2-style tokenizer keys from vocab.json / merges.txt / tokenizer_config.json."""
    import json

    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    merges = [line for line in (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    added = {int(i): (e["content"], bool(e.get("special", True)))
             for i, e in (config.get("added_tokens_decoder") or {}).items()}
    size = max(vocab_size, max(vocab.values()) + 1, max(added, default=0) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED padding
    for token, index in vocab.items():
        tokens[index], types[index] = token, 1  # NORMAL
    for index, (content, special) in added.items():
        tokens[index], types[index] = content, 3 if special else 4  # CONTROL / USER_DEFINED
    writer.add("tokenizer.ggml.model", "gpt2")
    writer.add("tokenizer.ggml.pre", "qwen2")
    writer.add("tokenizer.ggml.tokens", tokens)
    writer.add("tokenizer.ggml.token_type", types, element_type=None)
    writer.add("tokenizer.ggml.merges", merges)
    writer.add("tokenizer.ggml.eos_token_id", 151645)
    writer.add("tokenizer.ggml.padding_token_id", 151643)
    writer.add("tokenizer.ggml.bos_token_id", 151643)
    writer.add("tokenizer.ggml.add_bos_token", False)


def make_text_encoder_gguf(out_dir: str | os.PathLike, *, qtype: str = "Q8_0", seed: int = 0,
                           tokenizer_dir: str | os.PathLike | None = None,
                           mmproj_name: str = MMPROJ_NAME, mmproj_type: str = "F16") -> tuple[Path, Path]:
    """Write the tiny Qwen2.5-VL as llama.cpp does: ``Qwen2.5-VL-7B-Instruct-{qtype}.gguf`` (language model,
    matrices in ``qtype``, norms and biases F32) and ``mmproj_name`` (vision tower, ``mmproj_type`` matrices;
    the Conv3d patch embedding split into two temporal slices, the fused qkv into q/k/v).  Returns
    (text, mmproj)."""
    text_cfg, vision_cfg = TINY_TEXT, TINY_VISION
    weights = _random_weights(_text_encoder_spec(text_cfg, vision_cfg), seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    text = GGUFWriter(out_dir / f"Qwen2.5-VL-7B-Instruct-{qtype}.gguf", "qwen2vl")
    arch = "qwen2vl"
    text.add("general.name", "Qwen2.5-VL (tiny random weights)")
    text.add(f"{arch}.block_count", text_cfg["num_hidden_layers"])
    text.add(f"{arch}.context_length", text_cfg["max_position_embeddings"])
    text.add(f"{arch}.embedding_length", text_cfg["hidden_size"])
    text.add(f"{arch}.feed_forward_length", text_cfg["intermediate_size"])
    text.add(f"{arch}.attention.head_count", text_cfg["num_attention_heads"])
    text.add(f"{arch}.attention.head_count_kv", text_cfg["num_key_value_heads"])
    text.add(f"{arch}.rope.freq_base", float(text_cfg["rope_theta"]))
    text.add(f"{arch}.attention.layer_norm_rms_epsilon", float(text_cfg["rms_norm_eps"]))
    text.add(f"{arch}.rope.dimension_sections", [*text_cfg["rope_scaling"]["mrope_section"], 0],
             element_type=None)
    if tokenizer_dir is not None:
        _tokenizer_metadata(text, Path(tokenizer_dir), text_cfg["vocab_size"])

    mmproj = GGUFWriter(out_dir / mmproj_name, "clip")
    depth = vision_cfg["depth"]
    mmproj.add("clip.has_vision_encoder", True)
    mmproj.add("clip.projector_type", "qwen2.5vl_merger")
    mmproj.add("clip.use_silu", True)
    mmproj.add("clip.vision.embedding_length", vision_cfg["hidden_size"])
    mmproj.add("clip.vision.feed_forward_length", vision_cfg["intermediate_size"])
    mmproj.add("clip.vision.block_count", depth)
    mmproj.add("clip.vision.attention.head_count", vision_cfg["num_heads"])
    mmproj.add("clip.vision.attention.layer_norm_epsilon", 1e-6)
    mmproj.add("clip.vision.patch_size", vision_cfg["patch_size"])
    mmproj.add("clip.vision.image_size", 560)
    mmproj.add("clip.vision.projection_dim", vision_cfg["out_hidden_size"])
    mmproj.add("clip.vision.spatial_merge_size", vision_cfg["spatial_merge_size"])
    mmproj.add("clip.vision.n_wa_pattern", vision_cfg["fullatt_block_indexes"][0] + 1)
    mmproj.add("clip.vision.window_size", vision_cfg["window_size"])

    for name, tensor in weights.items():
        if name.startswith("visual."):
            for stored, split, index in to_mmproj(name):
                part = tensor
                if split == "qkv":
                    part = tensor.chunk(3, dim=0)[index]
                elif split == "temporal":
                    part = tensor[:, :, index]
                ggml = GGMLType.F32 if part.ndim == 1 else fitting_type(GGMLType[mmproj_type], tuple(part.shape),
                                                                        GGMLType.F16)
                mmproj.add_tensor(stored, quantize(part.contiguous(), ggml), ggml, part.shape)
        else:
            stored = to_llama_text(name)
            ggml = GGMLType.F32 if tensor.ndim == 1 else fitting_type(GGMLType[qtype], tuple(tensor.shape))
            text.add_tensor(stored, quantize(tensor, ggml), ggml, tensor.shape)
    return text.write(), mmproj.write()


def _synthetic_blocks(qtype: GGMLType, nbytes: int, seed: int) -> bytes:
    """``nbytes`` of valid ``qtype`` data (finite values), tiled from one random pattern of at most ~4 MB."""
    rng = np.random.default_rng(seed)
    block_bytes = QUANT_BLOCKS[qtype][1]
    n_blocks = max(1, min(nbytes // block_bytes, (4 << 20) // block_bytes))
    if qtype in _F16_FIELDS:
        pattern = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
        for offset in _F16_FIELDS[qtype]:
            pattern[:, offset:offset + 2] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
        raw = pattern.reshape(-1)
    else:  # F32 / F16 / BF16
        values = torch.from_numpy(rng.standard_normal(n_blocks).astype(np.float32))
        raw = quantize(values, qtype).numpy()
    reps = -(-nbytes // raw.size)
    return np.tile(raw, reps)[:nbytes].tobytes()


def make_full_size_dit_gguf(out_dir: str | os.PathLike, qtype: str = "Q4_K_M", seed: int = 0) -> Path:
    """Stream a full-size (60 blocks, width 3072) synthetic Qwen-Image GGUF with ``qtype``'s layout to disk.

    About 13 GB for Q4_K_M; memory stays at one tensor's bytes.  The values are random valid blocks (not a
    model): use it only to measure opening, mapping and dequantizing.
    """
    spec = _dit_spec(FULL_DIT)
    path = Path(out_dir) / f"qwen-image-full-{qtype}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "qwen_image")
    writer.add("general.name", "Qwen-Image (synthetic full-size blocks)")
    for index, (name, (shape, _)) in enumerate(spec.items()):
        ggml = _tensor_type(name, shape, qtype, FULL_DIT["num_layers"])
        nbytes = quantized_nbytes(ggml, shape)
        writer.add_tensor(name, lambda g=ggml, n=nbytes, i=index: _synthetic_blocks(g, n, seed * 100_003 + i),
                          ggml, shape)
    return writer.write()

