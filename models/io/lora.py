"""LoRA files in every layout people share, normalised to one key layout for the model they are applied to.

Trainers write the same update under many names: a prefix (``diffusion_model.`` ai-toolkit, ``transformer.``
diffusers, ``pipe.dit.`` DiffSynth, ``base_model.model.`` raw PEFT, ``lora_unet_`` kohya / musubi,
``lora_transformer_`` OneTrainer, ``lycoris_`` LyCORIS, or none: DiffSynth / lightx2v), module paths with dots or
flattened with underscores, and adapter tensors ``lora_A`` / ``lora_B`` (with or without PEFT's ``.default``),
``lora_down`` / ``lora_up``, LyCORIS LoKr (``lokr_*``) and LoHa (``hada_*``), full ``.diff`` / ``.diff_b`` deltas,
DoRA's ``.dora_scale`` and ``.alpha``.

:func:`normalize_lora` resolves every key against the parameter names of the model it is meant for (flat
underscore names against the real dotted ones) and returns the tensors as ``<prefix><module>.<tensor>`` with
``lora_A`` / ``lora_B`` renamed ``lora_down`` / ``lora_up`` and ``.default`` dropped (the layout ComfyUI's key maps
read for ``diffusion_model.<module>``), plus a :class:`LoraReport`: formats, adapter kinds, matched modules,
unmatched keys by name, ranks and alphas, and whether the file belongs to another model (Flux, SDXL, ...).  A file
for another model normalises to nothing: it is never applied by accident because some names coincide (a diffusers
Flux LoRA's ``transformer_blocks.N.attn.to_q`` is also a Qwen-Image module name).

The maths is not done here: the host applies the normalised tensors with its own rule
(``delta = strength * alpha / rank * up @ down``, scale 1 without alpha).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["normalize_lora", "NormalizedLora", "LoraReport", "UNKNOWN_MODEL"]

LORA, LOKR, LOHA, DIFF, DORA = "LoRA", "LoKr", "LoHa", "diff", "DoRA"

# Adapter tensor names as files write them -> (normalised name, adapter kind); matched as key suffixes.
_TENSORS: dict[str, tuple[str, str | None]] = {
    "lora_A.default.weight": ("lora_down.weight", LORA),
    "lora_B.default.weight": ("lora_up.weight", LORA),
    "lora_A.weight": ("lora_down.weight", LORA),
    "lora_B.weight": ("lora_up.weight", LORA),
    "lora_down.weight": ("lora_down.weight", LORA),
    "lora_up.weight": ("lora_up.weight", LORA),
    "alpha": ("alpha", None),
    "dora_scale": ("dora_scale", DORA),
    "diff": ("diff", DIFF),
    "diff_b": ("diff_b", DIFF),
    **{f"lokr_{n}": (f"lokr_{n}", LOKR) for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")},
    **{f"hada_{n}": (f"hada_{n}", LOHA) for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
}
_SUFFIXES = sorted(_TENSORS, key=len, reverse=True)  # ".lora_A.default.weight" before ".lora_A.weight"
_KINDS = dict(_TENSORS.values())  # normalised name -> adapter kind

# Prefixes of keys that address the diffusion model -> the trainer they tell; "" (bare names) is tried last.
_DIT_PREFIXES = (
    ("model.diffusion_model.", "ComfyUI checkpoint names (model.diffusion_model.)"),
    ("diffusion_model.", "ai-toolkit (diffusion_model.)"),
    ("base_model.model.", "PEFT (base_model.model.)"),
    ("pipe.dit.", "DiffSynth (pipe.dit.)"),
    ("transformer.", "diffusers (transformer.)"),
    ("lora_unet_", "kohya / musubi (lora_unet_)"),
    ("lora_transformer_", "OneTrainer (lora_transformer_)"),
    ("lycoris_", "LyCORIS (lycoris_)"),
)
_TEXT_ENCODER_PREFIXES = (
    ("text_encoder.", "diffusers text encoder (text_encoder.)"),
    ("lora_te1_", "kohya text encoder (lora_te1_)"),
    ("lora_te_", "kohya text encoder (lora_te_)"),
)

# Module-name fragments of other models' networks (dotted or flattened), checked on keys this model does not have.
_FOREIGN = (
    ("Flux", re.compile(r"double_blocks|single_blocks|single_transformer_blocks|ff_context|norm1_context")),
    ("SD3", re.compile(r"joint_blocks|context_block")),
    ("SDXL", re.compile(r"input_blocks|output_blocks|middle_block|lora_te2_|text_encoder_2")),
    ("Stable Diffusion 1.x / 2.x", re.compile(r"down_blocks|up_blocks|mid_block|attn[12]|text_model")),
    ("Wan", re.compile(r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn|ffn)")),
)
_LISTED = 8  # unmatched keys named in the summary (the report holds all of them)
UNKNOWN_MODEL = "unknown"  # LoraReport.foreign of a file none of whose keys names a module of the model


@dataclass(frozen=True)
class LoraReport:
    """What a LoRA file holds for a model and what of it applies."""

    formats: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    matched: tuple[str, ...] = ()  # diffusion-model modules the file patches
    text_encoder_matched: tuple[str, ...] = ()  # text-encoder modules (when a text encoder was given)
    text_encoder_keys: tuple[str, ...] = ()  # keys for a text encoder that was not given
    unmatched: tuple[str, ...] = ()  # keys that name no module of the model
    mismatched: tuple[str, ...] = ()  # modules whose update has another shape than the weight
    ranks: tuple[int, ...] = ()
    alphas: tuple[float, ...] = ()
    foreign: str = ""  # "Flux", "SDXL", ... or UNKNOWN_MODEL: then nothing applies

    def summary(self) -> str:
        """A few lines for people: format, what matched, rank / alpha, and every problem."""
        if self.foreign == UNKNOWN_MODEL:
            lines = ["for another model (no key names a module of this one): nothing applied"]
        elif self.foreign:
            lines = [f"for another model ({self.foreign}): nothing applied"]
        else:
            lines = [f"format: {', '.join(self.formats) or 'none'}; {' + '.join(self.adapters) or 'no adapters'}",
                     f"matched: {len(self.matched)} modules of the diffusion model"
                     + (f", {len(self.text_encoder_matched)} of the text encoder" if self.text_encoder_matched
                        else "")]
            if self.ranks:
                lines.append(f"rank {_listing(self.ranks)}; {self._alpha_text()}")
        if self.text_encoder_keys and not self.foreign:
            lines.append(f"{len(self.text_encoder_keys)} text-encoder keys not applied: connect the text encoder")
        if self.mismatched:
            lines.append(f"shape does not fit the model ({len(self.mismatched)}): {_first(self.mismatched)}")
        if self.unmatched:
            lines.append(f"unmatched keys ({len(self.unmatched)}): {_first(self.unmatched)}")
        return "\n".join(lines)

    def _alpha_text(self) -> str:
        if not self.alphas:
            return "no alpha (scale 1)"
        if len(self.alphas) == 1 and len(self.ranks) == 1:
            return f"alpha {self.alphas[0]:g} (scale alpha / rank = {self.alphas[0] / self.ranks[0]:g})"
        return f"alpha {_listing(self.alphas)}"


def _listing(values: Sequence) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _first(names: Sequence[str]) -> str:
    return ", ".join(names[:_LISTED]) + (", ..." if len(names) > _LISTED else "")


@dataclass
class NormalizedLora:
    """The file's tensors for the diffusion model and the text encoder under normalised names, and the report."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    report: LoraReport = field(default_factory=LoraReport)


class _Modules:
    """The modules of one model with a weight, found by dotted or flattened (underscore) name."""

    def __init__(self, parameters: Mapping[str, Sequence[int]]):
        self.shapes = {name: tuple(shape) for name, shape in parameters.items()}
        modules = [name[:-len(".weight")] for name in parameters if name.endswith(".weight")]
        self.dotted = set(modules)
        flat: dict[str, list[str]] = {}
        for module in modules:
            flat.setdefault(module.replace(".", "_"), []).append(module)
        self.flat = {name: found[0] for name, found in flat.items() if len(found) == 1}  # ambiguous ones never match

    def find(self, path: str) -> str | None:
        return path if path in self.dotted else self.flat.get(path)


def _split(key: str) -> tuple[str, str] | None:
    """``(module path as written, adapter tensor name)``; None for a key that is no adapter tensor."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    return None


def _resolve(path: str, prefixes: Sequence[tuple[str, str]], modules: _Modules,
             bare: str | None) -> tuple[str, str] | None:
    """``(module, format)`` for a module path under any of the prefixes (``bare``: the format of unprefixed names,
    None when unprefixed names do not address this model)."""
    candidates = [(path[len(p):], label) for p, label in prefixes if path.startswith(p)]
    if bare is not None:
        candidates.append((path, bare))
    for rest, label in candidates:
        module = modules.find(rest)
        if module is not None:
            return module, label
    return None


def _bare_format(suffixes: set[str]) -> str:
    if any(".default." in s for s in suffixes):
        return "DiffSynth (bare names, .default)"
    if "lora_down.weight" in suffixes:
        return "lightx2v (bare names)"
    return "bare module names"


def _product_shape(tensors: Mapping[str, torch.Tensor], full: str, a: str, b: str) -> tuple[int, int] | None:
    if full in tensors:
        return tuple(tensors[full].shape[:2])
    if a in tensors and b in tensors:
        return tensors[a].shape[0], tensors[b].shape[1]
    return None


def _update_shape(tensors: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    """Shape of the weight update a module's adapter tensors make (normalised names); None when incomplete."""
    if "lora_up.weight" in tensors and "lora_down.weight" in tensors:
        return (tensors["lora_up.weight"].shape[0], *tensors["lora_down.weight"].shape[1:])
    if all(f"hada_{n}" in tensors for n in ("w1_a", "w1_b", "w2_a", "w2_b")):
        return tensors["hada_w1_a"].shape[0], tensors["hada_w1_b"].shape[1]
    w1 = _product_shape(tensors, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
    w2 = _product_shape(tensors, "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    if w1 is not None and w2 is not None:  # kron(w1, w2)
        return w1[0] * w2[0], w1[1] * w2[1]
    if "diff" in tensors:
        return tuple(tensors["diff"].shape)
    return None


def _fits(update: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """The host reshapes an update to the weight: same leading (output) size and element count."""
    return bool(weight) and update[0] == weight[0] and math.prod(update) == math.prod(weight)


def _rank(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank the host divides alpha by (LoKr: the last factored half)."""
    for name in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if name in tensors:
            return int(tensors[name].shape[0])
    return None


def _foreign(keys: Sequence[str]) -> str:
    for family, pattern in _FOREIGN:
        if any(pattern.search(key) for key in keys):
            return family
    return ""


def normalize_lora(tensors: Mapping[str, torch.Tensor], parameters: Mapping[str, Sequence[int]], *,
                   text_encoder: Mapping[str, Sequence[int]] | None = None, prefix: str = "diffusion_model.",
                   text_encoder_prefix: str = "text_encoder.") -> NormalizedLora:
    """Resolve a LoRA file's ``tensors`` against a model and rename them to ``<prefix><module>.<tensor>``.

    ``parameters``: the model's parameter names (``transformer_blocks.0.attn.to_q.weight``, biases too) and shapes;
    its modules are those with a ``.weight``.  ``text_encoder``: the same for a text encoder, whose keys (diffusers
    ``text_encoder.``, kohya ``lora_te_``) come back under ``text_encoder_prefix``; without it they are counted in
    the report as not applied.  Keys that name no module, and modules whose update would not fit the weight's
    shape, are left out and named in the report; a file with another model's module names gives no tensors.
    """
    dit, te = _Modules(parameters), _Modules(text_encoder or {})
    # module -> {normalised tensor name: tensor}, per target; with the formats and keys seen for each module
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    keys_of: dict[tuple[str, str], list[str]] = {}
    formats: dict[tuple[str, str], str] = {}
    unmatched, te_keys, bare_suffixes, bare_slots = [], [], set(), set()
    for key, tensor in tensors.items():
        parts = _split(key)
        if parts is None:
            unmatched.append(key)
            continue
        path, suffix = parts
        found = _resolve(path, _DIT_PREFIXES, dit, bare="")
        target = "dit"
        if found is None and text_encoder is not None:
            found, target = _resolve(path, _TEXT_ENCODER_PREFIXES, te, bare=None), "te"
        if found is None:
            (te_keys if text_encoder is None and path.startswith(tuple(p for p, _ in _TEXT_ENCODER_PREFIXES))
             else unmatched).append(key)
            continue
        module, label = found
        slot = (target, module)
        groups.setdefault(slot, {})[_TENSORS[suffix][0]] = tensor
        keys_of.setdefault(slot, []).append(key)
        if label:
            formats[slot] = label
        else:  # bare names: the adapter tensors' spelling tells the trainer
            bare_suffixes.add(suffix)
            bare_slots.add(slot)
    for slot in bare_slots:
        formats.setdefault(slot, _bare_format(bare_suffixes))

    foreign = _foreign(unmatched + te_keys)
    if not (foreign or groups or te_keys) and tensors:
        foreign = UNKNOWN_MODEL
    if foreign:
        return NormalizedLora(report=LoraReport(unmatched=tuple(sorted(unmatched)), foreign=foreign))

    out: dict[str, dict[str, torch.Tensor]] = {"dit": {}, "te": {}}
    matched: dict[str, list[str]] = {"dit": [], "te": []}
    mismatched, ranks, alphas, adapters = [], set(), set(), set()
    for (target, module), group in groups.items():
        modules = dit if target == "dit" else te
        update = _update_shape(group)
        if update is None and set(group) != {"diff_b"}:  # e.g. an alpha or a lora_up without its other half
            unmatched.extend(keys_of[(target, module)])
            continue
        weight_fits = update is None or _fits(update, modules.shapes[module + ".weight"])
        bias_fits = "diff_b" not in group or tuple(group["diff_b"].shape) == modules.shapes.get(module + ".bias")
        if not (weight_fits and bias_fits):
            mismatched.append(module)
            continue
        name_prefix = prefix if target == "dit" else text_encoder_prefix
        out[target].update({f"{name_prefix}{module}.{name}": t for name, t in group.items()})
        matched[target].append(module)
        adapters.update(_KINDS[name] for name in group if _KINDS[name])
        rank = _rank(group)
        if rank is not None:
            ranks.add(rank)
        if "alpha" in group:
            alphas.add(float(group["alpha"].float()))
    report = LoraReport(
        formats=tuple(sorted({formats[slot] for slot in groups})),
        adapters=tuple(kind for kind in (LORA, LOKR, LOHA, DIFF, DORA) if kind in adapters),
        matched=tuple(sorted(matched["dit"])), text_encoder_matched=tuple(sorted(matched["te"])),
        text_encoder_keys=tuple(te_keys), unmatched=tuple(sorted(unmatched)), mismatched=tuple(sorted(mismatched)),
        ranks=tuple(sorted(ranks)), alphas=tuple(sorted(alphas)))
    return NormalizedLora(out["dit"], out["te"], report)
