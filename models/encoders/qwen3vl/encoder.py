"""The Qwen3-VL condition encoder (Qwen-Image 2.1): loading, and :meth:`Qwen3VLEncoder.encode` with a family's
prompt templates.

::

    te = load_qwen3vl(path, templates, tokenizer=None, dtype=torch.float32, device="cpu", ops=None)
    cond = te.encode(prompt, images=None, template="default")
    cond.embeds [1, L, hidden], cond.mask [1, L] int64 ones, cond.image_mask [1, L] bool, cond.image_grids

A family folder binds the encoder to its templates (:func:`models.qwen_image_2_1.text_encoder.
load_text_encoder_2_1`).  The condition is the last decoder layer's output *before* the final norm, after the
template's dropped prefix; image tokens get 3D (M-RoPE) positions and the vision tower's DeepStack features.

Checkpoints (safetensors only; ``lm_head`` and the final ``model.norm`` are never loaded): transformers-5 names
(``model.language_model.*`` / ``model.visual.*``, the Qwen/Qwen3-VL and Qwen-Image 2.1 ``text_encoder`` folders,
sharded, with ``config.json``) or a single file with Comfy-style names (``model.*`` / ``visual.*``, the way Comfy-Org
repackages Qwen2.5-VL; bf16 / fp32 / "scaled" fp8 with ``scale_weight``, fp8 stays fp8).  The model is built on the
meta device and filled one tensor at a time.  GGUF files are refused for now.

Tokenizer: Qwen3-VL uses the Qwen2 byte-level BPE vocabulary; the host's ``qwen25_tokenizer`` folder (every
ComfyUI that runs Qwen ships it) encodes every token the templates use with the ids Qwen3-VL expects
(``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ``<|vision_start|>`` 151652, ``<|vision_end|>`` 151653,
``<|image_pad|>`` 151655); only ids 151665-151668 differ (Qwen2.5's ``<|img|>`` ... vs Qwen3's
``<tool_response>`` ... ``</think>``), which no template uses.  The loader checks the vision ids against the
model's config.

How the shape is read from a file without config.json (``config.json`` values win when present):

* language model: vocab and hidden from ``embed_tokens``, head_dim from ``q_norm``, heads / KV heads from the
  ``q_proj`` / ``k_proj`` rows, MLP width from ``gate_proj``, layers counted; rope theta 5e6, RMSNorm eps 1e-6,
  interleaved M-RoPE sections (half - 2s, s, s) with s = 5/16 of head_dim / 2 (128 -> 24, 20, 20).
* vision tower: width, channels, temporal patch and patch from ``patch_embed.proj``, position grid from
  ``pos_embed``, depth counted, merge size from the merger's input width, output width from
  ``merger.linear_fc2``, MLP width from ``linear_fc1``; 16 heads when width >= 256, else head_dim 16; DeepStack
  blocks :func:`~.model.default_deepstack_indexes` (27 blocks, 3 mergers -> 8, 16, 24).

Image preprocessing is Qwen3-VL's processor (``preprocessor_config.json`` of the Qwen3-VL releases): sides rounded
to multiples of 32 (patch 16 x merge 2) within 256 x 256 .. 4096 x 4096 pixels, mean/std 0.5.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from ...common.attention import Options
from ...common.ops import CastOps
from ...common.tiled_vae import Progress
from ...io.loading import materialize, open_weights
from ...io.weights import WeightFileError
from ...registry import identify, refusal
from ..blocks import mrope_positions
from ..checkpoint import CheckpointShapes, canonical_name as comfy_name, int_list
from ..prompt_encoder import PromptEncoder
from ..templates import IMAGE_PAD, PromptTemplate, resolve_template
from ..tokenizer import QwenTokenizer, find_tokenizer
from ..vision_preprocess import preprocess_image
from .model import Qwen3VLModel, TextConfig, VisionConfig, default_deepstack_indexes

__all__ = ["Qwen3VLEncoder", "Qwen3VLCondition", "load_qwen3vl", "build_encoder", "detect_configs",
           "canonical_name", "EXPECTED", "REQUIRED"]

EXPECTED = "a Qwen3-VL text encoder (Qwen-Image 2.1)"
IDENTITY = ("qwen_image_2_1", "text_encoder")  # what the registry calls the files this loader takes
REQUIRED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight", "visual.blocks.0.attn.qkv.weight",
            "visual.deepstack_merger_list.0.linear_fc1.weight")

# Qwen3-VL's image processor settings (preprocessor_config.json: shortest_edge / longest_edge in pixels).
MIN_PIXELS = 256 * 256
MAX_PIXELS = 4096 * 4096
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)

# Special tokens the templates use and their config.json keys with Qwen3-VL's ids (None: no config key).
_SPECIAL_TOKENS = {"<|im_start|>": (None, 151644), "<|im_end|>": (None, 151645),
                   "<|vision_start|>": ("vision_start_token_id", 151652),
                   "<|vision_end|>": ("vision_end_token_id", 151653), IMAGE_PAD: ("image_token_id", 151655)}


class Qwen3VLCondition(NamedTuple):
    """What :meth:`Qwen3VLEncoder.encode` returns (unpacks as a tuple in this order)."""

    embeds: torch.Tensor  # [1, L, hidden] in the encoder dtype
    mask: torch.Tensor  # [1, L] int64 ones (one prompt: nothing is padded)
    image_mask: torch.Tensor  # [1, L] bool: True at the condition images' tokens (<|image_pad|> positions)
    image_grids: tuple[tuple[int, int], ...]  # merged token grid (rows, cols) per image, in prompt order


def _over_white(image: torch.Tensor) -> torch.Tensor:
    """``[H, W, 3 or 4]`` -> ``[H, W, 3]``: alpha composited over white, as Qwen-Image 2.1's vision branch was
    trained."""
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected images of shape [H, W, 3] or [H, W, 4], got {tuple(image.shape)}")
    if image.shape[-1] == 3:
        return image
    alpha = image[..., 3:].float()
    return image[..., :3].float() * alpha + (1.0 - alpha)


class Qwen3VLEncoder(PromptEncoder):
    """A loaded Qwen3-VL condition encoder with its tokenizer; see :meth:`encode`."""

    # The image-pad mask tells the 2.1 DiT where image tokens are: a typed '<|image_pad|>' would corrupt it.
    text_image_pads = False

    @torch.no_grad()
    def encode(self, prompt: str, images: Sequence[torch.Tensor] | torch.Tensor | None = None,
               template: str | PromptTemplate = "default", options: Options | None = None,
               progress: Progress | None = None) -> Qwen3VLCondition:
        """Condition embeddings for ``prompt`` and optional condition images.

        ``images``: ``[H, W, 3]`` (or RGBA ``[H, W, 4]``, composited over white) float tensors in 0..1, or a
        ``[B, H, W, C]`` batch, at the size the vision tower should see: sides that are multiples of 32 within
        256^2..4096^2 pixels are kept, others resized like the Qwen3-VL processor; one token per 32 x 32 pixels.
        ``template``: a :class:`PromptTemplate` or the name of one of the family's :attr:`templates`.
        ``options``: run options for every attention call (see :mod:`models.common.attention`).
        ``progress(done, total)``: called after each decoder layer.
        Returns :class:`Qwen3VLCondition` ``(embeds, mask, image_mask, image_grids)``.
        """
        images = [_over_white(image) for image in self._image_list(images)]
        spec = resolve_template(self.templates, template, len(images))
        ids, pads = self._prompt_ids(spec, prompt, len(images))
        vision = self.model.visual.config
        tokens, deepstack, grids = [], [], []
        for image in images:
            patches, grid = preprocess_image(
                image.to(self.device), patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                temporal_patch_size=vision.temporal_patch_size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                mean=IMAGE_MEAN, std=IMAGE_STD)
            merged, stack = self.model.visual(patches, grid, dtype=self.dtype, options=options)
            tokens.append(merged)
            deepstack.append(stack)
            grids.append((grid[0] // vision.spatial_merge_size, grid[1] // vision.spatial_merge_size))
        embeds, spans = self._embed_prompt(ids, pads, tokens, grids)

        image_mask = torch.zeros(len(embeds), dtype=torch.bool, device=self.device)
        for start, rows, cols in spans:
            image_mask[start:start + rows * cols] = True
        per_layer = [torch.cat(features) for features in zip(*deepstack)]  # all images' tokens, per merger
        positions = mrope_positions(len(embeds), spans).to(self.device)
        hidden = self.model.model(embeds[None], positions, image_mask, per_layer, options, progress)
        drop = spec.drop_count(self.tokenizer.encode)
        emb = hidden[:, drop:]
        return Qwen3VLCondition(emb, torch.ones(emb.shape[:2], dtype=torch.long, device=self.device),
                                image_mask[None, drop:], tuple(grids))


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def canonical_name(key: str) -> str | None:
    """Checkpoint name -> module name (Comfy-style names); ``None`` drops it: ``lm_head``, the fp8 marker, and the
    final norm (the condition is taken before it)."""
    name = comfy_name(key)
    return None if name == "model.norm.weight" else name


def detect_configs(names: Iterable[str], shape_of: Callable[[str], Sequence[int]], config: Mapping | None = None,
                   source: str = "checkpoint") -> tuple[TextConfig, VisionConfig]:
    """Model shape from canonical tensor names (Comfy-style) and their shapes; ``config`` is an HF config.json
    (a :class:`models.io.model_config.ModelConfig`, whose reads are checked, or a plain dict).

    Raises :class:`WeightFileError` when the tensors do not make a Qwen3-VL model.
    """
    shape = CheckpointShapes(names, shape_of, config, source, "Qwen3-VL", EXPECTED, (
        *REQUIRED, "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "visual.patch_embed.proj.weight", "visual.pos_embed.weight",
        "visual.blocks.0.mlp.linear_fc1.weight", "visual.merger.linear_fc1.weight", "visual.merger.linear_fc2.weight"))
    vocab, hidden = shape("model.embed_tokens.weight", 2)
    head_dim = shape.text.get("head_dim", 0) or shape("model.layers.0.self_attn.q_norm.weight", 1)[0]
    num_heads, num_kv_heads = shape.heads(head_dim, shape("model.layers.0.self_attn.q_proj.weight", 2)[0],
                                          shape("model.layers.0.self_attn.k_proj.weight", 2)[0])
    rope_theta, section = shape.rope(5_000_000.0)
    text = TextConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=shape("model.layers.0.mlp.gate_proj.weight", 2)[0],
        num_layers=shape.count("model.layers."), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        rms_norm_eps=float(shape.text.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, mrope_section=section,
    )
    _, height, width = text.sections
    if sum(text.sections) != head_dim // 2 or 3 * max(height, width) > head_dim // 2:
        raise WeightFileError(f"{source}: interleaved M-RoPE sections {text.sections} do not fit head_dim {head_dim}.")

    v_width, channels, temporal, patch, _ = shape("visual.patch_embed.proj.weight", 5)
    positions = shape("visual.pos_embed.weight", 2)[0]
    merge = math.isqrt(shape("visual.merger.linear_fc1.weight", 2)[1] // v_width)
    depth = shape.count("visual.blocks.")
    mergers = shape.count("visual.deepstack_merger_list.")
    v_heads = shape.vision.get("num_heads", 0) or (16 if v_width >= 256 else v_width // 16)
    deepstack = shape.vision.get("deepstack_visual_indexes")
    vision = VisionConfig(
        hidden_size=v_width,
        intermediate_size=shape("visual.blocks.0.mlp.linear_fc1.weight", 2)[0],
        depth=depth, num_heads=v_heads,
        out_hidden_size=shape("visual.merger.linear_fc2.weight", 2)[0],
        num_position_embeddings=positions,
        deepstack_indexes=(int_list(deepstack, source, "deepstack_visual_indexes", mergers, below=depth)
                           if deepstack is not None else default_deepstack_indexes(depth, mergers)),
        patch_size=patch, temporal_patch_size=temporal, spatial_merge_size=merge, in_channels=channels,
    )
    if (v_heads <= 0 or v_width % v_heads or merge <= 0 or math.isqrt(positions) ** 2 != positions
            or len(set(vision.deepstack_indexes)) != mergers
            or not all(0 <= index < depth for index in vision.deepstack_indexes)):
        raise WeightFileError(f"{source}: the vision tower's settings do not fit its tensors (width {v_width}, "
                              f"{v_heads} heads, merge {merge}, {positions} position embeddings, DeepStack "
                              f"blocks {vision.deepstack_indexes} for {mergers} mergers).")
    shape.check_vision_output(vision.out_hidden_size, hidden)
    return text, vision


def check_tokenizer(tokenizer: QwenTokenizer, config: Mapping | None, vocab_size: int, source: str) -> None:
    """The tokenizer must encode every special token the templates use with the id the model was trained with
    (config.json's, else Qwen3-VL's) inside its vocabulary; else a :class:`WeightFileError` naming both."""
    settings = config or {}
    for token, (key, default) in _SPECIAL_TOKENS.items():
        expected = settings.get(key, default) if key else default
        found = tokenizer.token_id(token)
        if found != expected or found >= vocab_size:
            raise WeightFileError(f"{tokenizer.source}: the tokenizer gives {token} the id {found}, but the text "
                                  f"encoder {source} expects {expected} (vocabulary of {vocab_size}); use the Qwen "
                                  "tokenizer (ComfyUI's comfy/text_encoders/qwen25_tokenizer, or the model's own).")


def build_encoder(tensors: Mapping[str, torch.Tensor], text: TextConfig, vision: VisionConfig,
                  tokenizer: QwenTokenizer, templates: Mapping[str, PromptTemplate],
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", ops=None,
                  rename: Callable[[str], str | None] | None = canonical_name,
                  source: str = "<memory>") -> Qwen3VLEncoder:
    """Build the encoder on the meta device and fill it from ``tensors`` (any lazy mapping).

    ``rename`` maps the mapping's names to the module names (default: Comfy-style or transformers-5 names).
    Float tensors become ``dtype`` except fp8, which stays fp8 (scaled with ``scale_weight``).
    """
    device = torch.device(device)
    model = Qwen3VLModel(text, vision, device="meta", dtype=dtype, ops=ops or CastOps)
    materialize(model, tensors, dtype=dtype, device=device, rename=rename, what=source)
    return Qwen3VLEncoder(model, tokenizer, templates, dtype=dtype, device=device, source=source)


def _refuse_gguf(path: Path):
    identity = identify(path)
    if (identity.family, identity.role) != IDENTITY:
        raise refusal(str(path), identity, EXPECTED, REQUIRED, gguf=True)
    raise WeightFileError(f"{path}: Qwen3-VL GGUF text encoders are not supported yet; load the safetensors text "
                          "encoder (the Comfy-Org single file or the diffusers text_encoder folder) instead.")


def load_qwen3vl(path: str | os.PathLike, templates: Mapping[str, PromptTemplate],
                 tokenizer: str | os.PathLike | QwenTokenizer | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", ops=None,
                 host_tokenizer_dirs: Iterable[str | os.PathLike] = ()) -> Qwen3VLEncoder:
    """Load a Qwen3-VL encoder from a safetensors file or an HF folder (or a pipeline folder holding
    ``text_encoder/``); see the module docstring.  Files the registry does not identify as a Qwen3-VL text
    encoder are refused with a message naming what they are.

    ``templates``: the family's prompt templates.  ``tokenizer``: a :class:`QwenTokenizer`, a tokenizer folder /
    ``tokenizer.json``, or ``None`` for the one next to the weights (also ``processor/``), in
    ``host_tokenizer_dirs`` or under ``$COMFYUI_PATH``.  ``ops``: the layer namespace (default
    :class:`models.common.ops.CastOps`).
    """
    source = str(path)
    weights = open_weights(path, "text_encoder", gguf_opener=_refuse_gguf)
    identity = identify(weights.tensors)
    if (identity.family, identity.role) != IDENTITY:
        raise refusal(source, identity, EXPECTED, REQUIRED)
    canonical = {name: key for key in weights.tensors if (name := canonical_name(key)) is not None}
    text, vision = detect_configs(canonical, lambda name: weights.tensors.shape(canonical[name]), weights.config,
                                  source)
    if not isinstance(tokenizer, QwenTokenizer):
        tokenizer = find_tokenizer(explicit=tokenizer, weights=Path(path), host_dirs=host_tokenizer_dirs)
    check_tokenizer(tokenizer, weights.config, text.vocab_size, source)
    return build_encoder(weights.tensors, text, vision, tokenizer, templates, dtype=dtype, device=device, ops=ops,
                         source=source)
