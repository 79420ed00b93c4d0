"""The Qwen2.5-VL condition encoder: loading, and :class:`TextEncoder.encode` with a family's prompt templates.

::

    te = load_qwen25vl(path, templates, tokenizer=None, dtype=torch.float32, device="cpu", ops=None)
    emb, mask = te.encode(prompt, images=None, template="t2i")   # emb [1, L, hidden], mask [1, L] (int64 ones)
    (pos, _), (neg, _) = te.encode_prompts([prompt, negative], images, template="edit_plus")  # vision once

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
from ...common.tiled_vae import Progress
from ...io.loading import materialize, open_weights
from ...io.weights import WeightFileError
from ...registry import expect
from ..checkpoint import CheckpointShapes, canonical_name, int_list
from ..prompt_encoder import PromptEncoder
from ..templates import PromptTemplate, resolve_template
from ..tokenizer import QwenTokenizer, find_tokenizer
from ..vision_preprocess import preprocess_image
from .model import Qwen25VLModel, TextConfig, VisionConfig, mrope_positions

__all__ = ["TextEncoder", "load_qwen25vl", "build_text_encoder", "detect_configs", "canonical_name"]

REQUIRED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
            "visual.blocks.0.attn.qkv.weight")
EXPECTED = "a Qwen2.5-VL text encoder"

class TextEncoder(PromptEncoder):
    """A loaded Qwen2.5-VL condition encoder with its tokenizer; see :meth:`encode`."""

    def __init__(self, model: Qwen25VLModel, tokenizer: QwenTokenizer, templates: Mapping[str, PromptTemplate],
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", source: str = "<memory>",
                 missing_vision: str | None = None):
        super().__init__(model, tokenizer, templates, dtype=dtype, device=device, source=source)
        # Without a vision tower: why, and what to get (the default fits a language-model-only safetensors file).
        self.missing_vision = missing_vision or (
            f"{source}: this text encoder has no vision tower (no visual.* tensors; a plain Qwen2.5 language model). "
            "Image editing needs the Qwen2.5-VL text encoder (e.g. qwen_2.5_vl_7b*.safetensors).")

    @property
    def has_vision(self) -> bool:
        return self.model.visual is not None

    def encode(self, prompt: str, images: Sequence[torch.Tensor] | torch.Tensor | None = None,
               template: str | PromptTemplate = "t2i", options: Options | None = None,
               progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition embeddings for ``prompt`` and optional reference images.

        ``images``: ``[H, W, 3]`` float tensors in 0..1 at the size the vision tower should see (sides that are
        not multiples of 28 are resized, see :mod:`models.encoders.vision_preprocess`).  ``template``: a
        :class:`PromptTemplate` or the name of one of the family's :attr:`templates` (Qwen-Image: ``"t2i"`` takes
        no images, ``"edit"`` exactly one, ``"edit_plus"`` any number, "Picture i:" each).
        ``options``: run options for the attention (see :mod:`models.common.attention`).  ``progress(done,
        total)``: called after every decoder layer; whatever it raises stops the encoding there.
        Returns ``(emb [1, L, hidden] in the encoder dtype, mask [1, L] int64 ones)``.
        """
        return self.encode_prompts([prompt], images, template, options, progress)[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], images: Sequence[torch.Tensor] | torch.Tensor | None = None,
                       template: str | PromptTemplate = "t2i", options: Options | None = None,
                       progress: Progress | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`encode` for several prompts with the same images (a positive and a negative prompt): the vision
        tower runs once per image for all of them.  ``progress`` counts the decoder layers of all prompts."""
        images = self._image_list(images)
        spec = resolve_template(self.templates, template, len(images))
        if images and not self.has_vision:
            raise WeightFileError("This text encoder was loaded without a vision tower, so it encodes prompts but "
                                  f"not images: {self.missing_vision}")

        tokenized = [self._prompt_ids(spec, prompt, len(images)) for prompt in prompts]  # checked before any work
        features, grids = [], []
        for image in images:  # each placeholder becomes the image's merged tokens
            patches, grid = preprocess_image(image.to(self.device))
            features.append(self.model.visual(patches, grid, dtype=self.dtype, options=options))
            merge = self.model.visual.config.spatial_merge_size
            grids.append((grid[0] // merge, grid[1] // merge))
        drop = spec.drop_count(self.tokenizer.encode)
        layers = len(self.model.model.layers)
        results = []
        for index, (ids, pads) in enumerate(tokenized):
            embeds, spans = self._embed_prompt(ids, pads, features, grids)
            positions = mrope_positions(len(embeds), spans).to(self.device)

            def step(done: int, _total: int, before: int = index * layers) -> None:
                progress(before + done, layers * len(tokenized))

            hidden = self.model.model(embeds[None], positions, options, None if progress is None else step)
            emb = hidden[:, drop:]
            results.append((emb, torch.ones(emb.shape[:2], dtype=torch.long, device=self.device)))
        return results


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def detect_configs(names: Iterable[str], shape_of: Callable[[str], Sequence[int]], config: Mapping | None = None,
                   source: str = "checkpoint") -> tuple[TextConfig, VisionConfig | None]:
    """Model shape from canonical tensor names (Comfy names) and their shapes; ``config`` is an HF config.json
    (a :class:`models.io.model_config.ModelConfig`, whose reads are checked, or a plain dict).

    Raises :class:`WeightFileError` saying what the file looks like when it is not a Qwen2.5(-VL) model.
    """
    shape = CheckpointShapes(names, shape_of, config, source, "Qwen2.5-VL", EXPECTED, (
        "model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.mlp.gate_proj.weight"))
    vocab, hidden = shape("model.embed_tokens.weight", 2)
    q_rows = shape("model.layers.0.self_attn.q_proj.weight", 2)[0]
    kv_rows = shape("model.layers.0.self_attn.k_proj.weight", 2)[0]
    if shape.text.get("head_dim", 0):
        head_dim = shape.text.get("head_dim", 0)
    elif shape.text.get("num_attention_heads", 0):
        head_dim = q_rows // shape.text.get("num_attention_heads", 0)
    else:
        head_dim = 128 if hidden >= 1024 else kv_rows // 2
    num_heads, num_kv_heads = shape.heads(head_dim, q_rows, kv_rows)
    rope_theta, section = shape.rope(1_000_000.0)
    text = TextConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=shape("model.layers.0.mlp.gate_proj.weight", 2)[0],
        num_layers=shape.count("model.layers."), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        rms_norm_eps=float(shape.text.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, mrope_section=section,
    )
    if sum(text.sections) != head_dim // 2:
        raise WeightFileError(f"{source}: M-RoPE sections {text.sections} do not cover head_dim {head_dim} / 2.")

    if "visual.patch_embed.proj.weight" not in shape.names:
        return text, None
    width, channels, temporal, patch, _ = shape("visual.patch_embed.proj.weight", 5)
    merge = math.isqrt(shape("visual.merger.mlp.0.weight", 2)[1] // width)
    depth = shape.count("visual.blocks.")
    spacing = depth // 4 if depth >= 8 else 2
    num_heads = shape.vision.get("num_heads", 0) or (16 if width >= 256 else width // 16)
    window = shape.vision.get("window_size", 112)
    full = shape.vision.get("fullatt_block_indexes")
    vision = VisionConfig(
        hidden_size=width,
        intermediate_size=shape("visual.blocks.0.mlp.gate_proj.weight", 2)[0],
        depth=depth,
        num_heads=num_heads,
        out_hidden_size=shape("visual.merger.mlp.2.weight", 2)[0],
        patch_size=patch, temporal_patch_size=temporal, spatial_merge_size=merge, in_channels=channels,
        window_size=window,
        fullatt_block_indexes=(int_list(full, source, "fullatt_block_indexes", below=depth) if full is not None
                               else tuple(i for i in range(depth) if (i + 1) % spacing == 0)),
    )
    if num_heads <= 0 or width % num_heads or merge <= 0 or window <= 0 or window % (merge * patch):
        raise WeightFileError(f"{source}: the vision tower's settings do not fit its tensors (width {width}, "
                              f"{num_heads} heads, merge {merge}, patch {patch}, window {window}).")
    shape.check_vision_output(vision.out_hidden_size, hidden)
    return text, vision


def build_text_encoder(tensors: Mapping[str, torch.Tensor], text: TextConfig, vision: VisionConfig | None,
                       tokenizer: QwenTokenizer, templates: Mapping[str, PromptTemplate],
                       dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", ops=None,
                       rename: Callable[[str], str | None] | None = canonical_name,
                       source: str = "<memory>", missing_vision: str | None = None) -> TextEncoder:
    """Build the encoder on the meta device and fill it from ``tensors`` (any lazy mapping).

    ``rename`` maps the mapping's names to the Comfy names (default: HF / transformers-5 names); a GGUF
    reader passes a mapping already keyed by Comfy names and ``rename=None``.  Float tensors become ``dtype``
    except fp8, which stays fp8 (scaled with ``scale_weight``).  ``templates``: the family's prompt templates.
    ``missing_vision``: without a vision tower, what the user should get to encode images.
    """
    device = torch.device(device)
    model = Qwen25VLModel(text, vision, device="meta", dtype=dtype, ops=ops or CastOps)
    materialize(model, tensors, dtype=dtype, device=device, rename=rename, what=source)
    return TextEncoder(model, tokenizer, templates, dtype=dtype, device=device, source=source,
                       missing_vision=missing_vision)


def _open_gguf(path: Path):
    """A llama.cpp text GGUF + its mmproj (when next to it), already under Comfy names, with the tokenizer from
    its metadata."""
    from ...io.gguf import GGUFOps, open_text_encoder_gguf

    checkpoint, tokenizer = open_text_encoder_gguf(path)
    checkpoint.tokenizer = tokenizer
    return checkpoint, GGUFOps


def load_qwen25vl(path: str | os.PathLike, templates: Mapping[str, PromptTemplate],
                  tokenizer: str | os.PathLike | QwenTokenizer | None = None, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", ops=None,
                  host_tokenizer_dirs: Iterable[str | os.PathLike] = ()) -> TextEncoder:
    """Load a Qwen2.5-VL encoder from a safetensors file, an HF folder (or a pipeline folder holding
    ``text_encoder/``) or a llama.cpp GGUF with its mmproj (see the module docstring).  A GGUF without an mmproj
    next to it loads as a language model (text-to-image); encoding images then says which file to download.

    ``templates``: the family's prompt templates.  ``tokenizer``: a :class:`QwenTokenizer`, a tokenizer folder /
    ``tokenizer.json``, or ``None`` for the GGUF's own, else the one next to the weights, in
    ``host_tokenizer_dirs`` or under ``$COMFYUI_PATH``.  ``ops``: the layer namespace (default
    :class:`models.common.ops.CastOps`; GGUF files default to their quantized layers).
    """
    source = str(path)
    weights = open_weights(path, "text_encoder", gguf_opener=_open_gguf)
    expect(weights.tensors, "qwen_image", "text_encoder", EXPECTED, REQUIRED, source_name=source)
    if weights.ops is None:
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
                              ops=ops or weights.ops, rename=rename, source=source,
                              missing_vision=getattr(weights.tensors, "missing_vision", None))
