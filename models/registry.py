"""What is this file?  One place that names any checkpoint a user may hand to a loader.

:func:`identify` reads only names, shapes, ``config.json`` and the GGUF architecture tag (no tensor data) and
returns a :class:`FileIdentity` ``(family, role, layout, variant)`` with a sentence for people.  Every loader
checks its file with :func:`expect`, so every wrong-file message comes from here: a Flux model in the DiT
loader, a DiffSynth patch in the ControlNet loader, an SDXL checkpoint in the VAE loader, and files of our
families that the pack does not run yet (e.g. "a Qwen3-VL text encoder GGUF (Qwen-Image 2.1): not supported yet")
are named as what they are.

The public loaders :func:`load_diffusion_model`, :func:`load_vae` and :func:`load_text_encoder` load a file of
either family with that family's loader (``family=`` pins one; the other family's files are then refused), and
:func:`load` any supported file by what it is.

Families: ``qwen_image`` (Qwen-Image 20B: T2I, 2512, Edit, Edit-2509/2511, Layered), ``qwen_image_2_1``, and the
foreign ones we recognise to say so (``flux``, ``sd3``, ``sdxl``, ``sd1``, ``sd``, ``wan``, ``clip``, ``t5``,
``qwen3``, ``llm``, and ``qwen2.5``: a Qwen2.5(-VL) of another size than the 7B, e.g. the 3B).  Roles:
``diffusion_model``, ``vae``, ``text_encoder``, ``vision_projector``, ``controlnet``, ``model_patch``, ``lora``,
``checkpoint`` (a full SD-style checkpoint), ``unknown``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .io.gguf.names import QWEN_IMAGE_2_1_ARCH, QWEN_IMAGE_ARCH
from .io.loading import open_weights
from .io.weights import WeightFileError, open_checkpoint, tensor_shape

if TYPE_CHECKING:
    from .encoders.qwen25vl.encoder import TextEncoder
    from .encoders.qwen3vl.encoder import Qwen3VLEncoder
    from .encoders.tokenizer import QwenTokenizer
    from .qwen_image.dit import QwenImageDiT
    from .qwen_image.vae import QwenImageVAE
    from .qwen_image_2_1.dit import QwenImage21DiT
    from .qwen_image_2_1.vae import QwenImage21VAE

__all__ = ["FileIdentity", "identify", "expect", "refusal", "load", "load_diffusion_model", "load_vae",
           "load_text_encoder", "FAMILIES", "COMFY_DIT_PREFIX", "VAE_PREFIXES"]

FAMILIES = ("qwen_image", "qwen_image_2_1")  # the families this pack runs

COMFY_DIT_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("", "vae.", "first_stage_model.")
ZERO_COND_MARKER = "__index_timestep_zero__"  # Comfy-Org's Edit-2511 marker tensor
LAYERED_KEY = "time_text_embed.addition_t_embedding.weight"

# Where a supported file goes: (loader, model folder).
_LOADERS = {
    "diffusion_model": ("the diffusion model loader", "models/diffusion_models"),
    "vae": ("the VAE loader", "models/vae"),
    "text_encoder": ("the text encoder loader", "models/text_encoders"),
    "controlnet": ("the ControlNet loader", "models/controlnet"),
    "model_patch": ("the DiffSynth control loader", "models/model_patches"),
    "lora": ("a LoRA loader", "models/loras"),
    "vision_projector": ("nothing on its own: put it next to its text-encoder GGUF", "models/text_encoders"),
}


# The library function that loads each supported (family, role).
_LOAD_FUNCTIONS = {
    ("qwen_image", "diffusion_model"): ("qwen_image.dit_loader", "load_diffusion_model"),
    ("qwen_image", "vae"): ("qwen_image.vae", "load_vae"),
    ("qwen_image", "text_encoder"): ("qwen_image.text_encoder", "load_text_encoder"),
    ("qwen_image", "controlnet"): ("qwen_image.controlnet", "load_controlnet"),
    ("qwen_image", "model_patch"): ("qwen_image.blockwise_control", "load_blockwise_control"),
    ("qwen_image_2_1", "diffusion_model"): ("qwen_image_2_1.dit_loader", "load_diffusion_model_2_1"),
    ("qwen_image_2_1", "vae"): ("qwen_image_2_1.vae", "load_vae_2_1"),
    ("qwen_image_2_1", "text_encoder"): ("qwen_image_2_1.text_encoder", "load_text_encoder_2_1"),
}
# Where a Qwen-Image 2.1 file goes: its own loaders (the 1.x ones build another architecture).
_ADVICE_2_1 = "Load it with the Qwen-Image 2.1 {} loader (Load Qwen-Image 2.1 {})."


@dataclass(frozen=True)
class FileIdentity:
    """What a checkpoint is.  ``description`` is the phrase used in messages ("a Flux diffusion model");
    ``prefix`` the key prefix the file's tensors carry; ``supported`` whether this pack runs it."""

    family: str
    role: str
    layout: str
    variant: str = ""
    description: str = ""
    prefix: str = ""
    supported: bool = False
    advice: str = ""  # what to do instead, when the generic advice of its family and role does not fit


@dataclass
class _Header:
    names: set[str]
    shape: Callable[[str], tuple[int, ...]]
    config: dict | None
    arch: str | None  # GGUF general.architecture

    def has(self, *names: str) -> bool:
        return all(n in self.names for n in names)

    def any_with(self, *fragments: str) -> bool:
        return any(f in n for n in self.names for f in fragments)

    def prefixed(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n in self.names)

    def dim(self, name: str, axis: int) -> int | None:
        """Size of one axis of a tensor; None when the tensor is absent or has fewer axes (a damaged file)."""
        if name not in self.names:
            return None
        shape = self.shape(name)
        return shape[axis] if len(shape) > axis else None

    def layout(self, single_file: str = "comfy", folder: str = "diffusers") -> str:
        return "gguf" if self.arch is not None else folder if self.config is not None else single_file


def _header(source) -> tuple[_Header, str]:
    if isinstance(source, Mapping):
        config = getattr(source, "config", None)
        return _Header(set(source), lambda n: tensor_shape(source, n), config if isinstance(config, dict) else None,
                       getattr(source, "arch", None)), str(getattr(source, "source", "<tensors>"))
    from .io.gguf.reader import GGUFReader

    if isinstance(source, GGUFReader) or Path(source).suffix.lower() == ".gguf":
        reader = source if isinstance(source, GGUFReader) else GGUFReader(source)
        return _Header(set(reader.tensors), lambda n: tuple(reader.tensors[n].shape), None,
                       reader.arch or ""), str(reader.path)
    path = Path(source)
    checkpoint = open_checkpoint(path)
    return _Header(set(checkpoint), checkpoint.shape, checkpoint.config, None), str(path)


def identify(source: str | os.PathLike | Mapping) -> FileIdentity:
    """Identify a checkpoint (a file, a diffusers/HF folder, a ``.gguf`` (or an open ``GGUFReader``) or a
    ``name -> tensor`` mapping)."""
    header, _ = _header(source)
    return _classify(header)


def _classify(h: _Header) -> FileIdentity:
    for rule in (_qwen25_of_another_size, _gguf_arch, _lora, _full_checkpoint, _qwen_image_trunk,
                 _qwen_image_2_1_dit, _diffsynth_patch, _other_diffusion, _vae, _text_encoder):
        found = rule(h)
        if found is not None:
            return found
    sample = ", ".join(sorted(h.names)[:3]) or "no tensors"
    return FileIdentity("unknown", "unknown", h.layout(),
                        description=f"no model this pack recognises ({len(h.names)} tensors, e.g. {sample})")


# -- rules, most specific first ------------------------------------------------------------------------------------
def _gguf_arch(h: _Header) -> FileIdentity | None:
    if h.arch is None or h.arch in ("", QWEN_IMAGE_ARCH):
        return None  # DiT GGUFs are told apart by their tensor names (2.1 files tagged qwen_image exist too)
    if h.arch == QWEN_IMAGE_2_1_ARCH:
        return _qwen_image_2_1_dit(h) or FileIdentity(
            "qwen_image_2_1", "diffusion_model", "gguf",
            description=f"a Qwen-Image 2.1 DiT GGUF ({QWEN_IMAGE_2_1_ARCH}) with tensor names this pack does not know")
    if h.arch in ("qwen2vl", "qwen2"):
        return FileIdentity("qwen_image", "text_encoder", "gguf", "qwen2.5-vl",
                            "a Qwen2.5-VL text encoder (llama.cpp GGUF)", supported=True)
    if h.arch == "clip":
        return FileIdentity("qwen_image", "vision_projector", "gguf", "mmproj",
                            "a vision projector (mmproj) GGUF", supported=False)
    if h.arch in ("qwen3vl", "qwen3"):
        return FileIdentity("qwen_image_2_1", "text_encoder", "gguf", "qwen3-vl",
                            "a Qwen3-VL text encoder GGUF (Qwen-Image 2.1): not supported yet")
    if h.arch == "flux":
        return FileIdentity("flux", "diffusion_model", "gguf", description="a Flux diffusion model (GGUF)")
    return FileIdentity(h.arch, "unknown", "gguf", description=f"a '{h.arch}' GGUF model")


# Widths of the Qwen2.5 sizes other than the 7B, whose 3584-wide conditioning every Qwen-Image DiT reads.
_QWEN25_OTHER_SIZES = {896: "0.5B", 1536: "1.5B", 2048: "3B", 5120: "14B / 32B", 8192: "72B"}
_TEXT_WIDTH = 3584


def _qwen25_of_another_size(h: _Header) -> FileIdentity | None:
    """A Qwen2.5(-VL) text encoder of a size Qwen-Image cannot read (e.g. the 3B): refused where it is loaded,
    not at the sampler."""
    found = _gguf_arch(h) if h.arch is not None else _text_encoder(h)
    if found is None or (found.family, found.role) != ("qwen_image", "text_encoder"):
        return None
    width = next((w for n in ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                              "token_embd.weight") if (w := h.dim(n, 1)) is not None), None)
    if width not in _QWEN25_OTHER_SIZES:
        return None
    model = "Qwen2.5-VL" if found.variant == "qwen2.5-vl" else "Qwen2.5"
    return FileIdentity("qwen2.5", "text_encoder", found.layout, f"{width}-wide",
                        f"a {model} model of the {_QWEN25_OTHER_SIZES[width]} size ({width} wide)",
                        advice=f"Qwen-Image reads the {_TEXT_WIDTH}-wide conditioning of Qwen2.5-VL-7B: "
                               "load qwen_2.5_vl_7b*.safetensors (or a Qwen2.5-VL-7B GGUF) from "
                               "models/text_encoders instead.")


_LORA_FRAGMENTS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", ".lokr_w1", ".hada_w1_a", "lora_A.weight")


def _lora(h: _Header) -> FileIdentity | None:
    if not h.any_with(*_LORA_FRAGMENTS):
        return None
    if h.any_with("img_mod", "txt_mlp", "add_q_proj", "img_mlp"):
        return FileIdentity("qwen_image", "lora", "lora", description="a Qwen-Image LoRA", supported=True)
    if h.any_with("double_blocks", "single_blocks", "single_transformer_blocks"):
        return FileIdentity("flux", "lora", "lora", description="a Flux LoRA")
    return FileIdentity("unknown", "lora", "lora", description="a LoRA for another model")


def _full_checkpoint(h: _Header) -> FileIdentity | None:
    if not (h.prefixed("first_stage_model.") and h.prefixed(COMFY_DIT_PREFIX)):
        return None
    if h.prefixed("conditioner.embedders.1."):
        family, name = "sdxl", "Stable Diffusion XL"
    elif h.prefixed(COMFY_DIT_PREFIX + "joint_blocks."):
        family, name = "sd3", "Stable Diffusion 3"
    else:
        family, name = "sd1", "Stable Diffusion 1.x / 2.x"
    return FileIdentity(family, "checkpoint", "checkpoint",
                        description=f"a full {name} checkpoint (UNet, VAE and text encoder in one file)")


def _dit_prefix(h: _Header) -> str | None:
    for prefix in (COMFY_DIT_PREFIX, ""):
        if h.has(*(prefix + k for k in ("img_in.weight", "transformer_blocks.0.attn.norm_q.weight",
                                        "transformer_blocks.0.attn.add_q_proj.weight"))):
            return prefix
    return None


def _qwen_image_trunk(h: _Header) -> FileIdentity | None:
    """The double-stream trunk Qwen-Image DiTs and InstantX ControlNets share."""
    prefix = _dit_prefix(h)
    if prefix is None:
        return None
    if h.has(prefix + "controlnet_x_embedder.weight"):
        extra = (h.dim(prefix + "controlnet_x_embedder.weight", 1) or 0) - (h.dim(prefix + "img_in.weight", 1) or 0)
        variant = "inpaint" if extra > 0 else "union"
        return FileIdentity("qwen_image", "controlnet", h.layout(), variant,
                            f"an InstantX Qwen-Image ControlNet ({'Inpainting' if extra > 0 else 'Union'})",
                            prefix, supported=True)
    if not h.has(prefix + "proj_out.weight"):
        return None
    config = h.config or {}
    if h.has(prefix + LAYERED_KEY) or config.get("use_additional_t_cond"):
        return FileIdentity("qwen_image", "diffusion_model", h.layout(), "layered",
                            "a Qwen-Image-Layered diffusion model (DiT)", prefix, supported=True)
    edit_2511 = h.has(prefix + ZERO_COND_MARKER) or bool(config.get("zero_cond_t"))
    return FileIdentity("qwen_image", "diffusion_model", h.layout(), "edit-2511" if edit_2511 else "",
                        "a Qwen-Image-Edit-2511 diffusion model (DiT)" if edit_2511
                        else "a Qwen-Image diffusion model (DiT)", prefix, supported=True)


def _qwen_image_2_1_dit(h: _Header) -> FileIdentity | None:
    for prefix in (COMFY_DIT_PREFIX, ""):
        if h.has(prefix + "modulation.1.weight", prefix + "txt_in.in_layer.weight"):
            return FileIdentity("qwen_image_2_1", "diffusion_model", h.layout(), "", "a Qwen-Image 2.1 DiT", prefix,
                                supported=True, advice=_ADVICE_2_1.format("diffusion model", "Diffusion Model"))
    return None


def _diffsynth_patch(h: _Header) -> FileIdentity | None:
    if not h.has("controlnet_blocks.0.x_rms.weight", "img_in.weight"):
        return None
    inpaint = (h.dim("img_in.weight", 1) or 0) % 64 != 0
    return FileIdentity("qwen_image", "model_patch", "diffsynth", "inpaint" if inpaint else "",
                        "a DiffSynth blockwise ControlNet (a Qwen-Image model patch)", supported=True)


def _other_diffusion(h: _Header) -> FileIdentity | None:
    def strip(fragment: str) -> bool:
        return h.prefixed(fragment) or h.prefixed(COMFY_DIT_PREFIX + fragment)

    if h.prefixed("controlnet_single_blocks.") or (h.prefixed("controlnet_blocks.") and
                                                    h.prefixed("single_transformer_blocks.")):
        return FileIdentity("flux", "controlnet", "diffusers", description="a Flux ControlNet")
    if strip("double_blocks.") or (strip("single_transformer_blocks.") and strip("x_embedder.")):
        return FileIdentity("flux", "diffusion_model", h.layout(), description="a Flux diffusion model")
    if h.prefixed("feature_embedder."):
        return FileIdentity("flux", "model_patch", "comfy", description="a USO style projector (a Flux model patch)")
    if h.prefixed("pos_embed_input."):
        return FileIdentity("sd3", "controlnet", "diffusers", description="a Stable Diffusion 3 ControlNet")
    if strip("joint_blocks."):
        return FileIdentity("sd3", "diffusion_model", h.layout(), description="a Stable Diffusion 3 diffusion model")
    if h.prefixed("zero_convs.") or h.prefixed("input_hint_block.") or h.prefixed("control_model."):
        return FileIdentity("sd", "controlnet", "comfy", description="a Stable Diffusion 1.x / SDXL ControlNet")
    if strip("input_blocks."):
        sdxl = h.prefixed("label_emb.") or h.prefixed(COMFY_DIT_PREFIX + "label_emb.")
        return FileIdentity("sdxl" if sdxl else "sd1", "diffusion_model", "comfy",
                            description=f"a UNet ({'SDXL' if sdxl else 'SD 1.x'}) diffusion model")
    if h.prefixed("controlnet_blocks."):
        return FileIdentity("unknown", "controlnet", h.layout(), description="a ControlNet of another model")
    if h.prefixed("transformer_blocks.") or h.prefixed(COMFY_DIT_PREFIX):
        return FileIdentity("unknown", "diffusion_model", h.layout(),
                            description="a diffusion model (DiT) of another model family")
    return None


def _vae(h: _Header) -> FileIdentity | None:
    for prefix in VAE_PREFIXES:
        wan = _video_vae(h, prefix)
        if wan is not None:
            return wan
        if h.has(prefix + "encoder.conv_in.weight") or h.prefixed(prefix + "encoder.down."):
            return _image_vae(h, prefix)
    if h.prefixed("encoder.") and h.prefixed("decoder."):
        return FileIdentity("unknown", "vae", h.layout(), description="a VAE")
    return None


def _video_vae(h: _Header, prefix: str) -> FileIdentity | None:
    """Wan-style causal 3D VAEs: original Wan names (``encoder.conv1``, ``conv2``) or diffusers names with 5-D
    convolutions (``encoder.conv_in``, ``post_quant_conv``)."""
    if h.has(prefix + "encoder.conv1.weight"):
        layout, conv_in, post = "comfy", prefix + "encoder.conv1.weight", prefix + "conv2.weight"
    elif h.has(prefix + "encoder.conv_in.weight") and len(h.shape(prefix + "encoder.conv_in.weight")) == 5:
        layout, conv_in, post = "diffusers", prefix + "encoder.conv_in.weight", prefix + "post_quant_conv.weight"
    else:
        return None
    shape = h.shape(conv_in)
    z_dim = h.dim(post, 0)
    if len(shape) != 5:
        return FileIdentity("unknown", "vae", layout, description="a VAE", prefix=prefix)
    if z_dim == 48:
        return FileIdentity("wan", "vae", layout, "wan2.2", "the Wan 2.2 VAE (48 latent channels)", prefix)
    if z_dim == 64 and shape[2] == 1:  # Comfy-Org's 2.1 VAE: Wan 2.2 names, 2D kernels stored with time size 1
        return _vae_2_1(layout, prefix)
    if z_dim == 16 and shape[1] == 3:
        return FileIdentity("qwen_image", "vae", layout, "", "the Qwen-Image VAE", prefix, supported=True)
    if z_dim == 16 and shape[1] == 4:
        return FileIdentity("qwen_image", "vae", layout, "rgba", "the Qwen-Image-Layered RGBA VAE", prefix,
                            supported=True)
    return FileIdentity("unknown", "vae", layout, "",
                        f"a video VAE with {z_dim} latent channels and input convolution {shape}", prefix)


def _vae_2_1(layout: str, prefix: str) -> FileIdentity:
    return FileIdentity("qwen_image_2_1", "vae", layout, "rgba",
                        "the Qwen-Image 2.1 VAE (64 latent channels, 16x, RGBA)", prefix, supported=True,
                        advice=_ADVICE_2_1.format("VAE", "VAE"))


def _image_vae(h: _Header, prefix: str) -> FileIdentity:
    """2D VAEs: SD / SDXL (4 latent channels), Flux / SD3 (16), Qwen-Image 2.1 (64, RGBA, 16x)."""
    latent = next((h.dim(prefix + k, 0) for k in ("quant_conv.weight", "encoder.conv_out.weight")
                   if h.has(prefix + k)), None)
    channels = latent // 2 if latent else None
    image_channels = h.dim(prefix + "encoder.conv_in.weight", 1) or 3
    layout = "diffusers" if h.prefixed(prefix + "encoder.down_blocks.") else "comfy"
    if image_channels == 4 or channels == 64:
        return _vae_2_1(layout, prefix)
    family, kind = {4: ("sd", "an SD 1.x / SDXL-style VAE"), 16: ("flux", "a Flux / SD3-style VAE")}.get(
        channels, ("unknown", "a 2D image VAE"))
    return FileIdentity(family, "vae", layout, "", f"{kind} ({channels} latent channels, 2D convolutions)", prefix)


def _text_encoder(h: _Header) -> FileIdentity | None:
    def canonical(name: str) -> str:
        return name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)

    names = {canonical(n) for n in h.names}
    has = names.__contains__
    vision = any(n.startswith("visual.") for n in names)
    layout = h.layout(folder="hf")
    if has("model.layers.0.self_attn.q_norm.weight"):
        if vision or any("deepstack" in n for n in names):
            return FileIdentity("qwen_image_2_1", "text_encoder", layout, "qwen3-vl",
                                "a Qwen3-VL text encoder (Qwen-Image 2.1)", supported=True,
                                advice=_ADVICE_2_1.format("text encoder", "Text Encoder"))
        return FileIdentity("qwen3", "text_encoder", layout, "",
                            "a Qwen3-style language model (q/k norms), not Qwen2.5")
    if has("model.embed_tokens.weight") and has("model.layers.0.self_attn.q_proj.bias"):
        return FileIdentity("qwen_image", "text_encoder", layout, "qwen2.5-vl" if vision else "qwen2.5",
                            "a Qwen2.5-VL text encoder" if vision else "a Qwen2.5 language model without vision tower",
                            supported=True)
    if any(n.startswith("model.layers.") for n in names):
        return FileIdentity("llm", "text_encoder", layout, description="a text encoder (LLM) of another family")
    if any(n.startswith("text_model.encoder.layers.") for n in names):
        return FileIdentity("clip", "text_encoder", layout, description="a CLIP text encoder")
    if any(n.startswith("encoder.block.") and "SelfAttention" in n for n in names):
        return FileIdentity("t5", "text_encoder", layout, description="a T5 text encoder")
    if vision:
        return FileIdentity("qwen_image", "vision_projector", layout, "",
                            "a vision tower only (no language model)")
    return None


# -- the loaders' check --------------------------------------------------------------------------------------------
def expect(source: str | os.PathLike | Mapping, family: str, roles: tuple[str, ...] | str, expected: str,
           required: tuple[str, ...] = (), source_name: str | None = None) -> FileIdentity:
    """Identify ``source`` and return its identity if it is a supported ``family`` file of one of ``roles``;
    otherwise raise :class:`WeightFileError` (a ``GGUFError`` for GGUF files) saying what the file is, that it is
    not ``expected`` (e.g. "a Qwen-Image diffusion model (DiT)"), where it goes instead, and which tensors
    (``required``) the loader looks for."""
    header, name = _header(source)
    identity = _classify(header)
    roles = (roles,) if isinstance(roles, str) else roles
    if identity.family == family and identity.role in roles and identity.supported:
        return identity
    raise refusal(source_name or name, identity, expected, required, gguf=header.arch is not None)


def refusal(source: str, identity: FileIdentity, expected: str, required: tuple[str, ...] = (),
            gguf: bool = False) -> WeightFileError:
    """The error for a file that is ``identity`` where ``expected`` was needed."""
    if identity.advice:
        advice = identity.advice
    elif identity.supported and identity.role in _LOADERS:
        loader, folder = _LOADERS[identity.role]
        advice = f"Load it with {loader} ({folder})."
    elif identity.family in ("qwen_image", "qwen_image_2_1"):
        advice = "This pack cannot run it yet; pick a file the loader supports."
    else:
        advice = "This pack runs the Qwen-Image family; put the file in the loader of its own model."
    keys = f" The loader looks for tensors such as {', '.join(required)}." if required else ""
    message = f"{source}: this is {identity.description}, not {expected}. {advice}{keys}"
    if gguf:
        from .io.gguf.reader import GGUFError

        return GGUFError(message)
    return WeightFileError(message)


# -- loading ---------------------------------------------------------------------------------------------------------
# Where a diffusers pipeline folder keeps each role's weights.
_PIPELINE_PARTS = {"diffusion_model": "transformer", "vae": "vae", "text_encoder": "text_encoder"}
# The class each family's DiT loader builds: a ``model_class`` deriving from one pins that family.
_DIT_CLASSES = {"qwen_image": ("qwen_image.dit", "QwenImageDiT"),
                "qwen_image_2_1": ("qwen_image_2_1.dit", "QwenImage21DiT")}


def _function(family: str, role: str) -> Callable:
    module, name = _LOAD_FUNCTIONS[(family, role)]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def _loader_for(path: str | os.PathLike, role: str, family: str | None) -> Callable:
    """The loader of ``role`` for ``path``: ``family``'s when the caller pins one (it refuses the other family's
    files, naming both), else that of the family the file belongs to.  A file of neither family goes to the 1.x
    loader; a loader refuses any file it cannot run, saying what the file is."""
    if family is None:
        # A GGUF is one file; a folder may be a whole pipeline holding the role's sub-folder.
        source = path if Path(path).suffix.lower() == ".gguf" else open_weights(path, _PIPELINE_PARTS[role]).tensors
        family = identify(source).family
        family = family if family in FAMILIES else FAMILIES[0]
    elif family not in FAMILIES:
        raise ValueError(f"family {family!r}: expected one of {', '.join(FAMILIES)}.")
    return _function(family, role)


def _dit_family(model_class: type) -> str:
    for family, (module, name) in _DIT_CLASSES.items():
        if issubclass(model_class, getattr(importlib.import_module(f"{__package__}.{module}"), name)):
            return family
    raise TypeError(f"model_class {model_class.__name__} derives from none of the DiTs "
                    f"({', '.join(name for _, name in _DIT_CLASSES.values())}).")


def load_diffusion_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu", ops=None, model_class: type | None = None,
                         family: str | None = None) -> QwenImageDiT | QwenImage21DiT:
    """Load the DiT of either family from any layout its loader reads (single file, diffusers or pipeline folder,
    ``.gguf``): a :class:`~models.qwen_image.dit.QwenImageDiT` for Qwen-Image 1.x, a
    :class:`~models.qwen_image_2_1.dit.QwenImage21DiT` for 2.1 (same calling convention: latents ``[B, C, H, W]``,
    condition latents as a list).

    ``family`` (``"qwen_image"`` / ``"qwen_image_2_1"``), or a ``model_class`` deriving from one family's DiT, pins
    the family: a file of the other one is then refused naming both.  ``dtype``, ``device``, ``ops``: as in
    :func:`models.qwen_image.dit_loader.load_diffusion_model`.
    """
    if model_class is not None:
        pinned = _dit_family(model_class)
        if family not in (None, pinned):
            raise ValueError(f"model_class {model_class.__name__} builds a {pinned} DiT, not a {family} one.")
        family = pinned
    extra = {} if model_class is None else {"model_class": model_class}
    return _loader_for(path, "diffusion_model", family)(path, dtype=dtype, device=device, ops=ops, **extra)


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, device: str | torch.device = "cpu",
             ops=None, family: str | None = None) -> QwenImageVAE | QwenImage21VAE:
    """Load the VAE of either family (Comfy-Org single file or diffusers ``vae`` / pipeline folder): the Qwen-Image
    VAE (RGB or Layered RGBA) or the Qwen-Image 2.1 VAE.  ``family`` pins the family, as in
    :func:`load_diffusion_model`."""
    return _loader_for(path, "vae", family)(path, dtype, device=device, ops=ops)


def load_text_encoder(path: str | os.PathLike, tokenizer: str | os.PathLike | QwenTokenizer | None = None,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", ops=None,
                      host_tokenizer_dirs: Iterable[str | os.PathLike] = (),
                      family: str | None = None) -> TextEncoder | Qwen3VLEncoder:
    """Load the condition encoder of either family with its templates: Qwen2.5-VL for Qwen-Image 1.x (templates
    ``t2i``, ``edit``, ``edit_plus``), Qwen3-VL for 2.1 (template ``default``).  ``family`` pins the family, as in
    :func:`load_diffusion_model`; the other arguments are those of the family loaders."""
    return _loader_for(path, "text_encoder", family)(path, tokenizer=tokenizer, dtype=dtype, device=device, ops=ops,
                                                       host_tokenizer_dirs=host_tokenizer_dirs)


def load(path: str | os.PathLike, **kwargs):
    """Load any file the pack runs with the loader for what it is (``kwargs`` go to that loader: ``dtype``,
    ``device``, ``ops`` ...); refuses other files naming what they are."""
    identity = identify(path)
    if not (identity.supported and (identity.family, identity.role) in _LOAD_FUNCTIONS):
        raise refusal(str(path), identity, "a file this pack can load")
    return _function(identity.family, identity.role)(path, **kwargs)
