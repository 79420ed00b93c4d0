"""LoRA key normalisation (models/io/lora.py) on tiny files in every layout trainers publish: every key resolves to
the tiny DiT's own module names, and the report says what was found, what matched and what did not."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from models import normalize_lora
from models.io.lora import UNKNOWN_MODEL
from tiny_models.configs import TINY_DIT, TINY_TEXT, TINY_VISION
from tiny_models.factory import _dit_spec, _text_encoder_spec
from tiny_models.loras import KINDS, LAYOUTS, dit_modules, write_foreign_lora, write_lora

DIT = {name: shape for name, (shape, _) in _dit_spec(TINY_DIT).items()}
TEXT_ENCODER = {name: shape for name, (shape, _) in _text_encoder_spec(TINY_TEXT, TINY_VISION).items()}
TOP_LEVEL = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1")
MODULES = dit_modules(modulation=True, top_level=TOP_LEVEL)
FORMATS = {
    "ai-toolkit": "ai-toolkit (diffusion_model.)", "diffsynth": "DiffSynth (bare names, .default)",
    "diffsynth-pipe": "DiffSynth (pipe.dit.)", "kohya": "kohya / musubi (lora_unet_)",
    "diffusers": "diffusers (transformer.)", "peft": "PEFT (base_model.model.)",
    "onetrainer": "OneTrainer (lora_transformer_)", "lightx2v": "lightx2v (bare names)",
    "lycoris": "LyCORIS (lycoris_)",
}


def normalized(path, **kwargs):
    return normalize_lora(load_file(str(path)), DIT, **kwargs)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_resolves_to_the_models_module_names(tmp_path, layout):
    path = write_lora(tmp_path / "a.safetensors", layout=layout, rank=4, alpha=2.0, modules=MODULES)
    lora = normalized(path)
    report = lora.report
    assert report.formats == (FORMATS[layout],) and report.adapters == ("LoRA",)
    assert report.matched == tuple(sorted(MODULES)) and not (report.unmatched or report.mismatched or report.foreign)
    assert report.ranks == (4,) and report.alphas == (2.0,)
    assert "scale alpha / rank = 0.5" in report.summary()
    assert set(lora.tensors) == {f"diffusion_model.{m}.{t}" for m in MODULES
                                 for t in ("lora_down.weight", "lora_up.weight", "alpha")}
    # the file's own tensors, renamed, not copies or conversions
    stored = load_file(str(path))
    down, up = LAYOUTS[layout][2:4]
    prefix, flat = LAYOUTS[layout][:2]
    for module in ("transformer_blocks.1.img_mod.1", "proj_out"):
        key = prefix + (module.replace(".", "_") if flat else module)
        assert torch.equal(lora.tensors[f"diffusion_model.{module}.lora_down.weight"], stored[f"{key}.{down}"])
        assert torch.equal(lora.tensors[f"diffusion_model.{module}.lora_up.weight"], stored[f"{key}.{up}"])


@pytest.mark.parametrize("kind", KINDS)
def test_every_adapter_kind_keeps_its_tensors(tmp_path, kind):
    modules = MODULES + (["transformer_blocks.0.attn.norm_q", "transformer_blocks.1.attn.norm_added_k"]
                         if kind == "diff" else [])
    alpha = None if kind == "diff" else 3.0
    lora = normalized(write_lora(tmp_path / "a.safetensors", layout="lycoris", kind=kind, alpha=alpha, modules=modules))
    expected = {"lora": ("LoRA",), "lokr": ("LoKr",), "loha": ("LoHa",), "diff": ("diff",), "dora": ("LoRA", "DoRA")}
    assert lora.report.adapters == expected[kind] and lora.report.matched == tuple(sorted(modules))
    names = {key.removeprefix("diffusion_model.img_in.") for key in lora.tensors
             if key.startswith("diffusion_model.img_in.")}
    expected_names = {
        "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
        "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "diff": {"diff", "diff_b"},
        "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    }
    assert names == expected_names[kind]
    assert lora.report.ranks == (() if kind == "diff" else (4,))


def test_keys_that_name_nothing_are_reported_by_name_and_the_rest_applies(tmp_path):
    tensors = load_file(str(write_lora(tmp_path / "a.safetensors", layout="diffusers", modules=MODULES)))
    extra = {"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 64),  # no block 7
             "transformer.transformer_blocks.0.attn.to_q.lora_magnitude": torch.zeros(64),  # no adapter tensor
             "transformer.img_in.lora_B.weight.extra": torch.zeros(1)}
    lora = normalize_lora({**tensors, **extra}, DIT)
    assert lora.report.unmatched == tuple(sorted(extra)) and not lora.report.foreign
    assert lora.report.matched == tuple(sorted(MODULES))
    summary = lora.report.summary()
    assert "unmatched keys (3)" in summary and "transformer_blocks.7" in summary


def test_an_incomplete_adapter_is_reported_not_applied(tmp_path):
    tensors = load_file(str(write_lora(tmp_path / "a.safetensors", layout="kohya", alpha=1.0, modules=MODULES)))
    del tensors["lora_unet_proj_out.lora_down.weight"]
    lora = normalize_lora(tensors, DIT)
    assert "proj_out" not in lora.report.matched and not any("proj_out" in key for key in lora.tensors)
    assert lora.report.unmatched == ("lora_unet_proj_out.alpha", "lora_unet_proj_out.lora_up.weight")


def test_a_lora_for_another_width_does_not_fit_and_changes_nothing(tmp_path):
    wide = {**TINY_DIT, "num_attention_heads": 4}
    lora = normalized(write_lora(tmp_path / "a.safetensors", layout="ai-toolkit", modules=dit_modules(wide),
                                 config=wide))
    assert lora.tensors == {} and set(lora.report.mismatched) == set(dit_modules(wide))
    assert "shape does not fit the model" in lora.report.summary()


@pytest.mark.parametrize("family, name", [("flux", "Flux"), ("sdxl", "SDXL")])
def test_a_lora_for_another_model_is_named_and_gives_nothing(tmp_path, family, name):
    tensors = load_file(str(write_foreign_lora(tmp_path / "a.safetensors", family)))
    if family == "flux":  # its double blocks' attention has our names and shapes: name matching alone would apply it
        assert normalize_lora({k: v for k, v in tensors.items() if ".transformer_blocks." in k
                               and ".attn." in k}, DIT).report.matched
    lora = normalize_lora(tensors, DIT, text_encoder=TEXT_ENCODER)
    assert lora.tensors == {} and lora.text_encoder_tensors == {} and not lora.report.matched
    assert lora.report.foreign == name
    assert lora.report.summary().startswith(f"for another model ({name}): nothing applied")


def test_a_file_of_unknown_names_is_for_another_model():
    lora = normalize_lora({"lora_unet_blocks_0_attn_qkv.lora_down.weight": torch.zeros(4, 8),
                           "lora_unet_blocks_0_attn_qkv.lora_up.weight": torch.zeros(8, 4)}, DIT)
    assert lora.tensors == {} and lora.report.foreign == UNKNOWN_MODEL
    assert lora.report.summary().startswith("for another model (no key names a module of this one)")


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_text_encoder_keys_resolve_against_the_text_encoder(tmp_path, layout):
    te_modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]
    path = write_lora(tmp_path / "a.safetensors", layout=layout, modules=MODULES, text_encoder_modules=te_modules)
    alone = normalized(path)
    assert alone.text_encoder_tensors == {} and len(alone.report.text_encoder_keys) == 4
    assert "text-encoder keys not applied: connect the text encoder" in alone.report.summary()
    assert alone.report.matched == tuple(sorted(MODULES)) and not alone.report.foreign
    both = normalized(path, text_encoder=TEXT_ENCODER, text_encoder_prefix="module.")
    assert both.report.text_encoder_matched == tuple(sorted(te_modules)) and not both.report.text_encoder_keys
    assert set(both.text_encoder_tensors) == {f"module.{m}.{t}" for m in te_modules
                                              for t in ("lora_down.weight", "lora_up.weight")}
    assert set(both.tensors) == set(alone.tensors)


def test_ambiguous_flat_names_never_match():
    parameters = {"a.b_c.weight": (2, 2), "a_b.c.weight": (2, 2)}
    tensors = {"lora_unet_a_b_c.lora_down.weight": torch.zeros(1, 2),
               "lora_unet_a_b_c.lora_up.weight": torch.zeros(2, 1),
               "a.b_c.lora_down.weight": torch.zeros(1, 2), "a.b_c.lora_up.weight": torch.zeros(2, 1)}
    lora = normalize_lora(tensors, parameters)
    assert lora.report.matched == ("a.b_c",)  # the dotted name is exact; the flat one could be either module
    assert lora.report.unmatched == ("lora_unet_a_b_c.lora_down.weight", "lora_unet_a_b_c.lora_up.weight")
