"""Load Qwen-Image LoRA in the real host: every format patches the DiT exactly like merging by hand with core's rule,
sampling with the node equals sampling with a merged file, other models' LoRAs change nothing, Lightning warnings
and the Lightning workflows' schedule.

The patched weights come from one process that imports the host and the pack (this file run as a script, like
tests/test_nodes_fail_soft.py): the real loader nodes, our LoRA node chained as in a graph, the host's
ModelPatcher loading the patched model.  The expected weights are merged here, independently, from the files:
``delta = strength * (alpha / rank) * up @ down`` (scale 1 without alpha, also for lora_A/B files), LoKr
``kron(w1, w2_a @ w2_b)``, LoHa ``(w1_a @ w1_b) * (w2_a @ w2_b)``, full diffs, DoRA as core decomposes the weight.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / "example_workflows"
MARKER = "QIP-LORA-PROBE "
BASE = "qwen_image_bf16.safetensors"
TEXT_ENCODER = "qwen_2.5_vl_7b.safetensors"
TE_MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.self_attn.v_proj"]


@dataclass
class Part:
    """One LoRA of a chain: how its file is written and the strengths it is applied with."""

    layout: str = "diffusers"
    kind: str = "lora"
    alpha: float | None = None
    strength: float = 0.8
    rank: int = 4
    dora_axis: str = "output"
    text_encoder: bool = False
    text_encoder_strength: float = 1.0
    loader: str = "ours"  # or "core": the host's LoraLoaderModelOnly on the same MODEL
    modules: list[str] | None = field(default=None, repr=False)


def _parts() -> dict[str, list[Part]]:
    from tiny_models.loras import LAYOUTS

    a_b = {"ai-toolkit", "diffsynth", "diffsynth-pipe", "diffusers", "peft"}  # lora_A / lora_B layouts
    cases = {layout: [Part(layout, alpha=None if layout in a_b else 2.0 + i)] for i, layout in enumerate(LAYOUTS)}
    cases.update({
        "ai-toolkit with alpha": [Part("ai-toolkit", alpha=2.0)],  # core applies .alpha to lora_A/B files too
        "lokr": [Part("lycoris", "lokr", alpha=2.0, strength=0.9)],
        "lokr rank 2": [Part("kohya", "lokr", alpha=1.0, rank=2, strength=1.1)],
        "loha": [Part("lycoris", "loha", alpha=6.0, strength=0.7)],
        "diff": [Part("ai-toolkit", "diff", strength=0.6)],
        "dora output axis": [Part("kohya", "dora", alpha=2.0)],
        "dora input axis": [Part("lycoris", "dora", alpha=8.0, dora_axis="input", strength=1.0)],
        "stacked": [Part("kohya", alpha=2.0, strength=0.7), Part("lycoris", "loha", alpha=6.0, strength=-0.4),
                    Part("diffsynth", strength=1.3)],
        "with core's loader": [Part("onetrainer", alpha=8.0, strength=0.6), Part("diffusers", strength=0.9,
                                                                                  loader="core")],
        "text encoder kohya": [Part("kohya", alpha=2.0, text_encoder=True, text_encoder_strength=0.5)],
        "text encoder diffusers": [Part("diffusers", text_encoder=True, text_encoder_strength=1.5)],
    })
    return cases


CASES = _parts() if __name__ != "__main__" else {}  # the probe script gets its cases in the spec file
TOP_LEVEL = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2")
NORMS = ("transformer_blocks.0.attn.norm_q", "transformer_blocks.1.attn.norm_added_k")


def _file_name(case: str, index: int) -> str:
    return f"test_{case.replace(' ', '_').replace(chr(39), '')}_{index}.safetensors"


def _write(loras_dir: Path, case: str, index: int, part: Part) -> str:
    from tiny_models.loras import dit_modules, write_lora

    part.modules = dit_modules(modulation=True, top_level=TOP_LEVEL) + (list(NORMS) if part.kind == "diff" else [])
    name = _file_name(case, index)
    write_lora(loras_dir / name, layout=part.layout, kind=part.kind, rank=part.rank, alpha=part.alpha,
               modules=part.modules, text_encoder_modules=TE_MODULES if part.text_encoder else (),
               dora_axis=part.dora_axis, seed=100 + 7 * index + sum(map(ord, case)))
    return name


# -- the merge by hand -----------------------------------------------------------------------------------------------
def _module_tensors(tensors: dict, prefix: str, flat: bool, module: str) -> dict[str, torch.Tensor]:
    base = prefix + (module.replace(".", "_") if flat else module) + "."
    return {key[len(base):]: value.float() for key, value in tensors.items() if key.startswith(base)}


def _dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float) -> torch.Tensor:
    """Core's weight decomposition: the merged weight rescaled to the magnitudes, by the ORIGINAL weight's row norms
    when the magnitudes are per output row, by the merged weight's column norms when per input column."""
    merged = weight + delta
    if magnitude.shape[0] == weight.shape[0]:
        norm = weight.norm(dim=1, keepdim=True)
    else:
        norm = merged.norm(dim=0, keepdim=True)
    merged = merged * (magnitude / (norm + torch.finfo(torch.float32).eps))
    return weight + strength * (merged - weight)


def merge(weights: dict[str, torch.Tensor], tensors: dict, prefix: str, flat: bool, down: str, up: str,
          modules: list[str], strength: float) -> dict[str, torch.Tensor]:
    """``weights`` with one LoRA file merged in by core's rule (every value in fp32)."""
    weights = dict(weights)
    for module in modules:
        t = _module_tensors(tensors, prefix, flat, module)
        if "lokr_w1" in t:
            delta, rank = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]), t["lokr_w2_b"].shape[0]
        elif "hada_w1_a" in t:
            delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
            rank = t["hada_w1_b"].shape[0]
        elif "diff" in t:
            delta, rank = t["diff"], None
        else:
            delta, rank = t[up] @ t[down], t[down].shape[0]
        scale = t["alpha"].item() / rank if "alpha" in t and rank else 1.0
        weight = weights[f"{module}.weight"]
        if "dora_scale" in t:
            weights[f"{module}.weight"] = _dora(weight, scale * delta, t["dora_scale"], strength)
        else:
            weights[f"{module}.weight"] = weight + strength * scale * delta
        if "diff_b" in t:
            weights[f"{module}.bias"] = weights[f"{module}.bias"] + strength * t["diff_b"]
    return weights


def expected_weights(case: str, base_dit: dict, base_te: dict, loras_dir: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file
    from tiny_models.factory import LORA_TARGETS
    from tiny_models.loras import LAYOUTS

    dit, te = base_dit, base_te
    for index, part in enumerate(CASES[case]):
        if part.loader == "core":  # the factory's diffusers LoRA of make_all
            tensors = load_file(str(loras_dir / "qwen_image_tiny_lora_diffusers.safetensors"))
            modules = [f"transformer_blocks.{i}.{t}" for i in range(2) for t in LORA_TARGETS]
            dit = merge(dit, tensors, "transformer.", False, "lora_A.weight", "lora_B.weight", modules, part.strength)
            continue
        tensors = load_file(str(loras_dir / _file_name(case, index)))
        prefix, flat, down, up, te_prefix = LAYOUTS[part.layout]
        dit = merge(dit, tensors, prefix, flat, down, up, part.modules, part.strength)
        if part.text_encoder:
            te = merge(te, tensors, te_prefix, flat, down, up, TE_MODULES, part.text_encoder_strength)
    return dit, te


# -- the probe: one host process ---------------------------------------------------------------------------------
LIGHTNING_REPORTS = {  # base model -> whether the Lightning LoRA draws the fp8 warning
    "qwen_image_fp8_e4m3fn.safetensors": True,
    "qwen_image_fp8_e4m3fn_scaled.safetensors": False,
    BASE: False,
}
FP8_DISTILLED = "Qwen-Image-fp8-e4m3fn-Lightning-4steps-V1.0-bf16.safetensors"


@pytest.fixture(scope="module")
def probe(host_models_dir, tmp_path_factory) -> dict:
    import shutil

    from env import comfyui_path, venv_python
    from build_workflows import LIGHTNING_LORAS
    from tiny_models.factory import make_dit
    from tiny_models.loras import write_foreign_lora

    loras = host_models_dir / "loras"
    chains = {}
    for case, parts in CASES.items():
        chains[case] = {"base": BASE, "dump": True, "chain": [
            ["core", "qwen_image_tiny_lora_diffusers.safetensors", part.strength, 0.0] if part.loader == "core" else
            ["ours", _write(loras, case, i, part), part.strength, part.text_encoder_strength]
            for i, part in enumerate(parts)], "text_encoder": any(p.text_encoder for p in parts)}
    for family in ("flux", "sdxl"):
        write_foreign_lora(loras / f"test_{family}.safetensors", family)
        chains[family] = {"base": BASE, "dump": True, "text_encoder": True,
                          "chain": [["ours", f"test_{family}.safetensors", 1.0, 1.0]]}
    for dtype in ("fp8_e4m3fn", "fp8_e4m3fn_scaled"):
        make_dit(host_models_dir / "diffusion_models", dtype=dtype, seed=0)
    shutil.copyfile(loras / LIGHTNING_LORAS["qwen_image"], loras / FP8_DISTILLED)
    for base in LIGHTNING_REPORTS:
        for lora in (LIGHTNING_LORAS["qwen_image"], FP8_DISTILLED):
            chains[f"lightning {base} {lora}"] = {"base": base, "dump": False, "text_encoder": False,
                                                  "chain": [["ours", lora, 1.0, 1.0]]}
    work = tmp_path_factory.mktemp("lora-probe")
    workflow = WORKFLOWS / "qwen_image_t2i_lightning.json"
    (work / "spec.json").write_text(json.dumps({"cases": chains, "workflow": str(workflow)}))
    result = subprocess.run([str(venv_python()), __file__, str(comfyui_path()), str(REPO_ROOT), str(host_models_dir),
                             str(work / "spec.json"), str(work / "out.pt")],
                            cwd=comfyui_path(), capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, PYTHONPATH=str(comfyui_path())))
    assert result.returncode == 0 and MARKER in result.stdout, result.stderr[-6000:]
    return torch.load(work / "out.pt")


@pytest.fixture(scope="module")
def base_weights(host_models_dir) -> tuple[dict, dict]:
    from references import comfy_tensors
    from tiny_models.factory import DIT_PREFIX

    dit = {k.removeprefix(DIT_PREFIX): v for k, v in comfy_tensors(host_models_dir / "diffusion_models" / BASE).items()}
    te = {k: v for k, v in comfy_tensors(host_models_dir / "text_encoders" / TEXT_ENCODER).items()
          if k.startswith("model.layers.")}
    return dit, te


def _compare(got: dict, expected: dict, what: str) -> None:
    assert set(got) == set(expected), f"{what}: other tensor names"
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    print(f"{what}: patched vs merged by hand, max abs error {worst:.1e}")
    assert worst <= 1e-5, f"{what}: the patched weights differ from the hand merge by {worst:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_the_patched_dit_equals_merging_by_hand(probe, base_weights, host_models_dir, case):
    dit, te = expected_weights(case, *base_weights, host_models_dir / "loras")
    got = probe[case]
    _compare(got["dit"], dit, case)
    changed = sum(not torch.equal(got["dit"][k], base_weights[0][k]) for k in dit)
    modules = {m for part in CASES[case] if part.loader == "ours" for m in part.modules}
    assert changed >= len(modules), f"{case}: only {changed} weights changed"
    if any(part.text_encoder for part in CASES[case]):
        _compare(got["te"], te, case + " (text encoder)")
        assert sum(not torch.equal(got["te"][k], base_weights[1][k]) for k in te) == len(TE_MODULES)
        assert f"{len(TE_MODULES)} of the text encoder" in got["reports"][0]
    else:
        assert all(torch.equal(got["te"][k], base_weights[1][k]) for k in te)
    for report, part in zip(got["reports"], (p for p in CASES[case] if p.loader == "ours")):
        assert "unmatched" not in report and "another model" not in report and "WARNING" not in report, report
        assert f"strength {part.strength:g}" in report


def test_reports_name_format_rank_and_alpha(probe):
    report = probe["kohya"]["reports"][0]
    assert "kohya / musubi (lora_unet_)" in report and "rank 4" in report and "alpha 5 (scale alpha / rank = 1.25)" \
        in report, report
    assert "patched" in report and "diffusion-model weights" in report
    assert "LoKr" in probe["lokr"]["reports"][0] and "LoHa" in probe["loha"]["reports"][0]
    assert "LoRA + DoRA" in probe["dora output axis"]["reports"][0]


@pytest.mark.parametrize("family, name", [("flux", "Flux"), ("sdxl", "SDXL")])
def test_another_models_lora_changes_nothing_and_is_named(probe, base_weights, family, name):
    got = probe[family]
    assert all(torch.equal(got["dit"][k], v) for k, v in base_weights[0].items())
    assert all(torch.equal(got["te"][k], v) for k, v in base_weights[1].items())
    assert f"for another model ({name}): nothing applied" in got["reports"][0]
    assert "patched" not in got["reports"][0]


@pytest.mark.parametrize("base", list(LIGHTNING_REPORTS))
def test_lightning_lora_warns_only_on_a_plain_fp8_base(probe, base):
    from build_workflows import LIGHTNING_LORAS

    plain = probe[f"lightning {base} {LIGHTNING_LORAS['qwen_image']}"]["reports"][0]
    assert ("WARNING" in plain) == LIGHTNING_REPORTS[base], plain
    if LIGHTNING_REPORTS[base]:
        assert "fp8-distilled Lightning LoRA" in plain and "scaled fp8" in plain
    assert "WARNING" not in probe[f"lightning {base} {FP8_DISTILLED}"]["reports"][0]
    assert "lightx2v (bare names)" in plain


def test_the_lightning_workflow_schedule_is_the_lightning_reference(probe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # lightx2v's scheduler config for Qwen-Image-Lightning: exponential shift mu = ln 3, no terminal stretch.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=math.log(3), max_image_seq_len=8192, max_shift=math.log(3),
        num_train_timesteps=1000, shift=1.0, shift_terminal=None, time_shift_type="exponential",
        use_dynamic_shifting=True)
    steps = len(probe["schedule"]) - 1
    scheduler.set_timesteps(sigmas=torch.linspace(1, 1 / steps, steps).tolist(), mu=math.log(3))
    assert steps == 4
    assert (probe["schedule"] - scheduler.sigmas.float()).abs().max() < 1e-6


# -- sampling through the real host --------------------------------------------------------------------------------
def _sample(host, model_name: str, lora: tuple[str, float] | None = None) -> tuple[torch.Tensor, str]:
    from test_t2i_host import node_id, read_latent, save_latent, small_t2i

    graph = small_t2i(host, steps=3, seed=5)
    loader = node_id(graph, "QIP_DiffusionModelLoader")
    graph[loader]["inputs"]["model_name"] = model_name
    if lora is not None:
        graph["lora"] = {"class_type": "QIP_LoraLoader", "inputs": {
            "model": [loader, 0], "lora_name": lora[0], "strength": lora[1], "text_encoder_strength": 1.0}}
        for node in graph.values():
            for name, value in node["inputs"].items():
                if value == [loader, 0] and node["class_type"] != "QIP_LoraLoader":
                    node["inputs"][name] = ["lora", 0]
    save_latent(graph, [node_id(graph, "SamplerCustomAdvanced"), 0], "lora" if lora else "plain")
    result = host.run(graph)
    return read_latent(result), (result.outputs.get("lora", {}).get("text") or [""])[0]


@pytest.mark.parametrize("case", ["diffusers", "lokr"])
def test_sampling_with_the_node_equals_sampling_the_merged_file(host, host_models_dir, probe, base_weights, case):
    from safetensors.torch import save_file

    (part,) = CASES[case]
    dit, _ = expected_weights(case, *base_weights, host_models_dir / "loras")
    merged = f"merged_lora_{case}_fp32.safetensors"
    save_file({k: v.contiguous() for k, v in dit.items()}, str(host_models_dir / "diffusion_models" / merged))
    with_lora, report = _sample(host, BASE, (_file_name(case, 0), part.strength))
    from_merged, _ = _sample(host, merged)
    plain, _ = _sample(host, BASE)
    assert (with_lora - plain).abs().max() > 1e-2, "the LoRA did not change the output"
    assert (with_lora - from_merged).abs().max() < 1e-4
    assert "patched" in report and "unmatched" not in report


@pytest.mark.parametrize("case", ["diffusers", "lokr"])
def test_sampling_a_gguf_model_with_the_node_equals_sampling_the_merged_file(host, host_models_dir, probe,
                                                                             base_weights, case):
    """The same on the tiny DiT's Q8_0 GGUF, whose layers apply the LoRA each time they dequantize a weight."""
    from models.io.gguf import load_gguf_state_dict
    from safetensors.torch import save_file

    gguf = "qwen-image-Q8_0.gguf"
    (part,) = CASES[case]
    base = load_gguf_state_dict(host_models_dir / "diffusion_models" / gguf, dequantize=True, dtype=torch.float32)
    dit, _ = expected_weights(case, base, base_weights[1], host_models_dir / "loras")
    merged = f"merged_lora_{case}_gguf_fp32.safetensors"
    save_file({k: v.contiguous() for k, v in dit.items()}, str(host_models_dir / "diffusion_models" / merged))
    with_lora, report = _sample(host, gguf, (_file_name(case, 0), part.strength))
    from_merged, _ = _sample(host, merged)
    plain, _ = _sample(host, gguf)
    assert (with_lora - plain).abs().max() > 1e-2, "the LoRA did not change the output"
    assert (with_lora - from_merged).abs().max() < 1e-4
    assert "patched" in report and "unmatched" not in report


def test_a_flux_lora_leaves_sampling_unchanged_and_says_so(host, probe):
    plain, _ = _sample(host, BASE)
    with_flux, report = _sample(host, BASE, ("test_flux.safetensors", 1.0))
    assert torch.equal(with_flux, plain)
    assert "for another model (Flux): nothing applied" in report


# -- run as a script: the probe inside the host's folder -----------------------------------------------------------
def _probe(comfy_dir: str, repo: str, models_dir: str, spec_file: str, out_file: str) -> None:
    from host_process import load_pack, start_host

    folder_paths = start_host(comfy_dir)

    for folder in ("diffusion_models", "text_encoders", "loras"):
        folder_paths.add_model_folder_path(folder, os.path.join(models_dir, folder), is_default=True)
    load_pack(repo)
    import nodes as core_nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow
    from qip.nodes.loaders import DiffusionModelLoader, TextEncoderLoader
    from qip.nodes.lora import LoraLoader
    from qip.nodes.sampling import Scheduler

    cpu = torch.device("cpu")
    spec = json.loads(Path(spec_file).read_text())
    models = {}
    (text_encoder,) = TextEncoderLoader.execute(TEXT_ENCODER, "fp32")
    results = {}
    for case, entry in spec["cases"].items():
        if entry["base"] not in models:
            models[entry["base"]] = DiffusionModelLoader.execute(entry["base"], "fp32", "auto (from the file)")[0]
        model, te, reports = models[entry["base"]], text_encoder if entry["text_encoder"] else None, []
        for loader, name, strength, te_strength in entry["chain"]:
            if loader == "core":
                (model,) = core_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)
                continue
            output = LoraLoader.execute(model, name, strength, te_strength, te)
            model, te, report = output.result
            assert output.ui["text"] == [report]
            reports.append(report)
        results[case] = {"reports": reports}
        if entry["dump"]:
            model.load(cpu, full_load=True)
            results[case]["dit"] = {k: v.detach().float().clone()
                                    for k, v in model.model.diffusion_model.state_dict().items()}
            model.unpatch_model(cpu)
            te = te or text_encoder
            te.patcher.load(cpu, full_load=True)
            results[case]["te"] = {k: v.detach().float().clone() for k, v in te.encoder.model.state_dict().items()
                                   if k.startswith("model.layers.")}
            te.patcher.unpatch_model(cpu)
    # The Lightning workflow's sampling: its shift node and scheduler settings on our MODEL.
    nodes = json.loads(Path(spec["workflow"]).read_text())["nodes"]
    workflow = {node["type"]: node["widgets_values"] for node in nodes}
    (shifted,) = ModelSamplingAuraFlow().patch_aura(models[BASE], *workflow["ModelSamplingAuraFlow"])
    steps, denoise, shift, terminal = workflow["QIP_Scheduler"]
    latent = {"samples": torch.zeros(1, 16, 1, 16, 16)}
    (results["schedule"],) = Scheduler.execute(shifted, latent, steps, denoise, shift, terminal)
    torch.save(results, out_file)
    print(MARKER + "done")


if __name__ == "__main__":
    _probe(*sys.argv[1:6])
