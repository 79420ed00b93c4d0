"""The Qwen2.5-VL condition encoder: loading, and :class:`TextEncoder.encode` with a family's prompt templates.

::

    te = load_qwen25vl(path, templates, tokenizer=None, dtype=torch.float32, device="cpu", ops=None)
    emb, mask = te.encode(prompt, images=None, template="t2i")   # emb [1, L, hidden], mask [1, L] (int64 ones)

A family folder binds the encoder to its templates (:func:`models.qwen_image.text_encoder.load_text_encoder`).
The embeddings keep everything after the template's dropped prefix.  Image tokens get Qwen2.5-VL's 3D (M-RoPE)
positions.

Checkpoints: a Comfy single file (bf16 / fp32 / "scaled" fp8 with ``scale_weight``; fp8 stays fp8), an HF
folder (legacy ``model.layers.N`` / ``visual.*`` / ``lm_head`` names, possibly sharded) or transformers-5 names
(``model.language_model.*`` / ``model.visual.*``).  ``lm_head`` is never loaded.  The model is built on the meta
device and filled one tensor at a time (no second copy).  A text-only Qwen2.5 file loads, but refuses images.

How the shape is read from a file without config.json (``config.json`` values win when present):

* language model: vocab and hidden from ``embed_tokens``, layers counted, MLP width from ``gate_proj``;
  head_dim = 128 when hidden >= 1024 (every Qwen2.5 from 1.5B up), else ``k_proj`` rows / 2 (small Qwen2.5
  models have 2 KV heads); heads = ``q_proj`` rows / head_dim, KV heads = ``k_proj`` rows / head_dim; M-RoPE
  sections split head_dim / 2 as 1/4, 3/8, 3/8 (128 -> 16, 24, 24); RMSNorm eps 1e-6, rope theta 1e6.
* vision tower: width, patch and temporal patch from ``patch_embed.proj``, depth counted, merge size from the
  merger's input width, output width from ``merger.mlp.2``; 16 heads when width >= 256, else head_dim 16;
  window 112 px; full-attention blocks: every ``depth // 4``-th block ending with the last (32 -> 7, 15, 23, 31),
  every second block for depth < 8 (4 -> 1, 3).

For another container (llama.cpp GGUF + mmproj) build the same model with :func:`build_text_encoder` from a
mapping that already uses the Comfy names, and :func:`detect_configs` on those names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ...common.attention import Options
from ...common.ops import CastOps
from ...io.loading import materialize, open_weights
from ...io.weights import WeightFileError
from ...registry import expect
from ..templates import IMAGE_PAD, PromptTemplate
from ..tokenizer import QwenTokenizer, find_tokenizer
from ..vision_preprocess import preprocess_image
from .model import Qwen25VLModel, TextConfig, VisionConfig, mrope_positions

__all__ = ["TextEncoder", "load_qwen25vl", "build_text_encoder", "detect_configs", "canonical_name"]

REQUIRED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
            "visual.blocks.0.attn.qkv.weight")
EXPECTED = "a Qwen2.5-VL text encoder"

class TextEncoder:
    """A loaded Qwen2.5-VL condition encoder with its tokenizer; see :meth:`encode`."""

    def __init__(self, model: Qwen25VLModel, tokenizer: QwenTokenizer, templates: Mapping[str, PromptTemplate],
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", source: str = "<memory>"):
        self.model = model
        self.tokenizer = tokenizer
        self.templates = dict(templates)
        self.dtype = dtype
        self.device = torch.device(device)
        self.source = source
        self.image_pad_id = tokenizer.token_id(IMAGE_PAD)

    @property
    def hidden_size(self) -> int:
        return self.model.model.config.hidden_size

    @property
    def has_vision(self) -> bool:
        return self.model.visual is not None

    def _image_list(self, images) -> list[torch.Tensor]:
        if images is None:
            return []
        if isinstance(images, torch.Tensor):
            images = [images] if images.ndim == 3 else list(images.unbind(0))  # a [B, H, W, 3] batch
        return list(images)

    @torch.no_grad()
    def encode(self, prompt: str, images: Sequence[torch.Tensor] | torch.Tensor | None = None,
               template: str | PromptTemplate = "t2i", options: Options | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition embeddings for ``prompt`` and optional reference images.

        ``images``: ``[H, W, 3]`` float tensors in 0..1 at the size the vision tower should see (sides that are
        not multiples of 28 are resized, see :mod:`models.encoders.vision_preprocess`).  ``template``: a
        :class:`PromptTemplate` or the name of one of the family's :attr:`templates` (Qwen-Image: ``"t2i"`` takes
        no images, ``"edit"`` exactly one, ``"edit_plus"`` any number, "Picture i:" each).
        ``options``: run options for the attention (see :mod:`models.common.attention`).
        Returns ``(emb [1, L, hidden] in the encoder dtype, mask [1, L] int64 ones)``.
        """
        if isinstance(template, PromptTemplate):
            spec = template
        elif template in self.templates:
            spec = self.templates[template]
        else:
            raise ValueError(f"unknown template {template!r}; use one of {', '.join(self.templates)}")
        images = self._image_list(images)
        by_images = {kind: [n for n, t in self.templates.items() if t.images == kind] for kind in ("one", "numbered")}
        if spec.images == "none" and images:
            raise ValueError(f"template {template!r} takes no images (got {len(images)}); use one of "
                             f"{', '.join(by_images['one'] + by_images['numbered'])}.")
        if spec.images == "one" and len(images) != 1:
            raise ValueError(f"template {template!r} takes exactly one image (got {len(images)}); "
                             f"use {' or '.join(by_images['numbered']) or 'a numbered template'} for several.")
        if images and not self.has_vision:
            raise WeightFileError(
                f"{self.source}: this text encoder has no vision tower (no visual.* tensors; a plain Qwen2.5 "
                "language model), so it cannot encode images. Image editing needs the Qwen2.5-VL text encoder "
                "(e.g. qwen_2.5_vl_7b*.safetensors).")

        ids = self.tokenizer.encode(spec.format(prompt, len(images)))
        if spec.max_tokens is not None:
            ids = ids[:spec.max_tokens]
        pads = [i for i, token in enumerate(ids) if token == self.image_pad_id]
        if images and len(pads) != len(images):
            raise ValueError(f"the prompt has {len(pads) - len(images)} extra '{IMAGE_PAD}' placeholder(s) "
                             f"beyond the {len(images)} image(s); remove them from the prompt text.")

        features, spans, expanded, cursor = [], [], [], 0
        for pad, image in zip(pads, images):  # each placeholder becomes the image's merged tokens
            patches, grid = preprocess_image(image.to(self.device))
            tokens = self.model.visual(patches, grid, dtype=self.dtype, options=options)
            merge = self.model.visual.config.spatial_merge_size
            expanded += ids[cursor:pad]
            spans.append((len(expanded), grid[0] // merge, grid[1] // merge))
            expanded += [self.image_pad_id] * tokens.shape[0]
            features.append(tokens)
            cursor = pad + 1
        expanded += ids[cursor:]

        token_ids = torch.tensor(expanded, dtype=torch.long, device=self.device)
        embeds = self.model.model.embed_tokens(token_ids, out_dtype=self.dtype).to(self.dtype)
        for (start, rows, cols), tokens in zip(spans, features):
            embeds[start:start + rows * cols] = tokens.to(self.dtype)
        positions = mrope_positions(len(expanded), spans).to(self.device)
        hidden = self.model.model(embeds[None], positions, options)
        emb = hidden[:, spec.drop:]
        return emb, torch.ones(emb.shape[:2], dtype=torch.long, device=self.device)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def canonical_name(key: str) -> str | None:
    """Checkpoint name -> module name (Comfy single-file names); ``None`` drops it (lm_head, fp8 marker)."""
    if key.startswith("lm_head.") or key == "scaled_fp8":
        return None
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    return key


def _block_count(names: Iterable[str], prefix: str, source: str) -> int:
    indices = {int(n[len(prefix):].split(".", 1)[0]) for n in names if n.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise WeightFileError(f"{source}: blocks {prefix}N are not numbered 0..{len(indices) - 1} "
                              f"(found {sorted(indices)[:8]}...); the file is incomplete.")
    return len(indices)


def _json_sections(config: dict | None) -> tuple[dict, dict]:
    """(text, vision) sub-configs of an HF config.json, legacy (top-level text keys) or nested."""
    if not config:
        return {}, {}
    text = config.get("text_config") or config
    return text, config.get("vision_config") or {}


def detect_configs(names: Iterable[str], shape_of: Callable[[str], Sequence[int]], config: dict | None = None,
                   source: str = "checkpoint") -> tuple[TextConfig, VisionConfig | None]:
    """Model shape from canonical tensor names (Comfy names) and their shapes; ``config`` is an HF config.json.

    Raises :class:`WeightFileError` saying what the file looks like when it is not a Qwen2.5(-VL) model.
    """
    names = set(names)
    required = ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.gate_proj.weight")
    missing = [n for n in required if n not in names]
    if missing:
        raise WeightFileError(f"{source}: not {EXPECTED}: missing {', '.join(missing)}.")
    text_json, vision_json = _json_sections(config)
    vocab, hidden = shape_of("model.embed_tokens.weight")
    q_rows = shape_of("model.layers.0.self_attn.q_proj.weight")[0]
    kv_rows = shape_of("model.layers.0.self_attn.k_proj.weight")[0]
    if text_json.get("head_dim"):
        head_dim = int(text_json["head_dim"])
    elif text_json.get("num_attention_heads"):
        head_dim = q_rows // int(text_json["num_attention_heads"])
    else:
        head_dim = 128 if hidden >= 1024 else kv_rows // 2
    if head_dim <= 0 or q_rows % head_dim or kv_rows % head_dim or (q_rows // head_dim) % (kv_rows // head_dim):
        raise WeightFileError(f"{source}: attention shapes q {q_rows} / kv {kv_rows} rows do not fit head_dim "
                              f"{head_dim}; not a Qwen2.5 layout.")
    rope = text_json.get("rope_parameters") or text_json.get("rope_scaling") or {}
    section = rope.get("mrope_section")
    text = TextConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=shape_of("model.layers.0.mlp.gate_proj.weight")[0],
        num_layers=_block_count(names, "model.layers.", source),
        num_heads=q_rows // head_dim, num_kv_heads=kv_rows // head_dim, head_dim=head_dim,
        rms_norm_eps=float(text_json.get("rms_norm_eps", 1e-6)),
        rope_theta=float(text_json.get("rope_theta") or rope.get("rope_theta") or 1_000_000.0),
        mrope_section=tuple(section) if section else None,
    )
    if sum(text.sections) != head_dim // 2:
        raise WeightFileError(f"{source}: M-RoPE sections {text.sections} do not cover head_dim {head_dim} / 2.")

    if "visual.patch_embed.proj.weight" not in names:
        return text, None
    width, channels, temporal, patch, _ = shape_of("visual.patch_embed.proj.weight")
    merge = math.isqrt(shape_of("visual.merger.mlp.0.weight")[1] // width)
    depth = _block_count(names, "visual.blocks.", source)
    spacing = depth // 4 if depth >= 8 else 2
    vision = VisionConfig(
        hidden_size=width,
        intermediate_size=shape_of("visual.blocks.0.mlp.gate_proj.weight")[0],
        depth=depth,
        num_heads=int(vision_json.get("num_heads") or (16 if width >= 256 else width // 16)),
        out_hidden_size=shape_of("visual.merger.mlp.2.weight")[0],
        patch_size=patch, temporal_patch_size=temporal, spatial_merge_size=merge, in_channels=channels,
        window_size=int(vision_json.get("window_size", 112)),
        fullatt_block_indexes=tuple(vision_json.get("fullatt_block_indexes")
                                    or [i for i in range(depth) if (i + 1) % spacing == 0]),
    )
    if vision.out_hidden_size != hidden:
        raise WeightFileError(f"{source}: the vision tower outputs {vision.out_hidden_size} features but the language "
                              f"model is {hidden} wide; the tensors come from different models.")
    return text, vision


def build_text_encoder(tensors: Mapping[str, torch.Tensor], text: TextConfig, vision: VisionConfig | None,
                       tokenizer: QwenTokenizer, templates: Mapping[str, PromptTemplate],
                       dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", ops=None,
                       rename: Callable[[str], str | None] | None = canonical_name,
                       source: str = "<memory>") -> TextEncoder:
    """Build the encoder on the meta device and fill it from ``tensors`` (any lazy mapping).

    ``rename`` maps the mapping's names to the Comfy names (default: HF / transformers-5 names); a GGUF
    reader passes a mapping already keyed by Comfy names and ``rename=None``.  Float tensors become ``dtype``
    except fp8, which stays fp8 (scaled with ``scale_weight``).  ``templates``: the family's prompt templates.
    """
    device = torch.device(device)
    model = Qwen25VLModel(text, vision, device="meta", dtype=dtype, ops=ops or CastOps)
    materialize(model, tensors, dtype=dtype, device=device, rename=rename, what=source)
    return TextEncoder(model, tokenizer, templates, dtype=dtype, device=device, source=source)


def _open_gguf(path: Path):
    """A llama.cpp text GGUF + its mmproj, already under Comfy names, with the tokenizer from its metadata."""
    from ...io.gguf import GGUFOps, open_text_encoder_gguf

    checkpoint, tokenizer = open_text_encoder_gguf(path)
    checkpoint.tokenizer = tokenizer
    return checkpoint, GGUFOps


def load_qwen25vl(path: str | os.PathLike, templates: Mapping[str, PromptTemplate],
                  tokenizer: str | os.PathLike | QwenTokenizer | None = None, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", ops=None,
                  host_tokenizer_dirs: Iterable[str | os.PathLike] = ()) -> TextEncoder:
    """Load a Qwen2.5-VL encoder from a safetensors file, an HF folder (or a pipeline folder holding
    ``text_encoder/``) or a llama.cpp GGUF with its mmproj (see the module docstring).

    ``templates``: the family's prompt templates.  ``tokenizer``: a :class:`QwenTokenizer`, a tokenizer folder /
    ``tokenizer.json``, or ``None`` for the GGUF's own, else the one next to the weights, in
    ``host_tokenizer_dirs`` or under ``$COMFYUI_PATH``.  ``ops``: the layer namespace (default
    :class:`models.common.ops.CastOps`; GGUF files default to their quantized layers).
    """
    source = str(path)
    weights = open_weights(path, "text_encoder", gguf_opener=_open_gguf)
    if weights.ops is None:  # GGUF files were checked by their architecture tag
        expect(weights.tensors, "qwen_image", "text_encoder", EXPECTED, REQUIRED, source_name=source)
        canonical = {name: key for key in weights.tensors if (name := canonical_name(key)) is not None}
        rename = canonical_name
    else:
        canonical, rename = {key: key for key in weights.tensors}, None
    text, vision = detect_configs(canonical, lambda name: weights.tensors.shape(canonical[name]), weights.config,
                                  source)
    if tokenizer is None and getattr(weights.tensors, "tokenizer", None) is not None:
        tokenizer = weights.tensors.tokenizer
    elif not isinstance(tokenizer, QwenTokenizer):
        tokenizer = find_tokenizer(explicit=tokenizer, weights=Path(path), host_dirs=host_tokenizer_dirs)
    return build_text_encoder(weights.tensors, text, vision, tokenizer, templates, dtype=dtype, device=device,
                              ops=ops or weights.ops, rename=rename, source=source)
