"""LoRA on GGUF weights in the real host, at bounded memory: Q8_0 and Q4_K DiTs with one and two stacked LoRAs of
every adapter kind, applied with our node (and core's), equal a DiT whose dequantized weights were merged by hand
with core's rule; no GGUF layer holds a dense patched copy; the model size the host plans with grows by the LoRA's
own tensors only; partial (low-VRAM) loads, and the host making room by unloading part of the model, give the same
output and keep within the host's budget.

One process imports the host and the pack (this file run as a script, like tests/test_lora_host.py): the real
diffusion-model loader, our LoRA node chained as in a graph, the host's ModelPatcher loading the patched model
fully and partially.  The expected weights are merged by hand from the files (``merge`` of tests/test_lora_host.py)
on the GGUF's dequantized weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
MARKER = "QIP-LORA-GGUF-PROBE "
QTYPES = ("Q8_0", "Q4_K")
TOP_LEVEL = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2")
NORMS = ("transformer_blocks.0.attn.norm_q", "transformer_blocks.1.attn.norm_added_k")
LOW_RANK = ("lora", "lokr", "loha", "dora")  # adapters whose tensors are much smaller than the weights


def _cases() -> dict:
    from test_lora_host import Part

    return {
        "lora alpha != rank": [Part("kohya", alpha=2.0, strength=0.8)],
        "lokr": [Part("lycoris", "lokr", alpha=2.0, strength=0.9)],
        "loha": [Part("lycoris", "loha", alpha=6.0, strength=0.7)],
        "diff": [Part("ai-toolkit", "diff", strength=0.6)],
        "dora": [Part("kohya", "dora", alpha=2.0)],
        "lora + lokr": [Part("lightx2v", alpha=8.0, strength=0.7), Part("lycoris", "lokr", alpha=2.0, strength=-0.5)],
        "loha + dora input axis": [Part("lycoris", "loha", alpha=6.0, strength=0.6),
                                   Part("lycoris", "dora", alpha=8.0, dora_axis="input", strength=1.0)],
        "ours + core's loader": [Part("onetrainer", alpha=8.0, strength=0.6),
                                 Part("diffusers", strength=0.9, loader="core")],
    }


CASES = _cases() if __name__ != "__main__" else {}


def _file_name(case: str, index: int) -> str:
    return f"gguf_{''.join(c if c.isalnum() else '_' for c in case)}_{index}.safetensors"


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    from env import comfyui_path, venv_python
    from tiny_models.gguf_factory import K_QUANT_DIT, make_dit_gguf
    from tiny_models.loras import LAYOUTS, dit_modules, write_lora

    root = tmp_path_factory.mktemp("lora-gguf")
    models, loras = root / "diffusion_models", root / "loras"
    for qtype in QTYPES:
        make_dit_gguf(models, qtype=qtype, config=K_QUANT_DIT)
    spec = {"qtypes": {q: f"qwen-image-{q}.gguf" for q in QTYPES}, "cases": {}, "models": str(models),
            "loras": str(loras)}
    for case, parts in CASES.items():
        chain = []
        for index, part in enumerate(parts):
            part.modules = dit_modules(K_QUANT_DIT, modulation=True, top_level=TOP_LEVEL) + \
                (list(NORMS) if part.kind == "diff" else [])
            name = _file_name(case, index)
            write_lora(loras / name, layout=part.layout, kind=part.kind, rank=part.rank, alpha=part.alpha,
                       modules=part.modules, dora_axis=part.dora_axis, seed=300 + 7 * index + sum(map(ord, case)),
                       config=K_QUANT_DIT)
            chain.append({"loader": part.loader, "file": name, "strength": part.strength,
                          "merge": [*LAYOUTS[part.layout][:4], part.modules]})
        spec["cases"][case] = chain
    (root / "spec.json").write_text(json.dumps(spec))
    result = subprocess.run([str(venv_python()), __file__, str(comfyui_path()), str(REPO_ROOT), str(root / "spec.json"),
                             str(root / "out.pt")], cwd=comfyui_path(), capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, PYTHONPATH=str(comfyui_path())))
    assert result.returncode == 0 and MARKER in result.stdout, result.stderr[-6000:]
    return torch.load(root / "out.pt")


def _lora_bytes(loras: Path, case: str, dtype_size: int) -> int:
    """The LoRA tensors that patch the DiT's GGUF-layer weights, in the compute dtype (no alphas, no bias diffs)."""
    from safetensors.torch import load_file

    return sum(t.numel() * dtype_size for index in range(len(CASES[case]))
               for key, t in load_file(str(loras / _file_name(case, index))).items()
               if not key.endswith((".alpha", ".diff_b")))


PARAMS = [(q, c) for q in QTYPES for c in CASES]


@pytest.mark.parametrize("qtype, case", PARAMS)
def test_the_patched_gguf_dit_equals_merging_by_hand(probe, qtype, case):
    got = probe[qtype][case]
    print(f"{qtype} {case}: weights {got['weight_error']:.1e}, biases {got['bias_error']:.1e}, "
          f"output {got['output_error']:.1e} (LoRA effect {got['lora_effect']:.2f})")
    assert got["patched_layers"] >= len(CASES[case][0].modules)
    assert got["weight_error"] <= 1e-5 and got["bias_error"] <= 1e-5
    assert got["output_error"] <= 1e-5 and got["lora_effect"] > 1e-2


@pytest.mark.parametrize("qtype, case", PARAMS)
def test_no_dense_copy_and_the_size_grows_by_the_lora_tensors(probe, qtype, case):
    got = probe[qtype][case]
    loras = Path(probe["loras"])
    # what the host plans with: the LoRA tensors (fp32 compute), nothing of the weights' size
    assert got["size_growth"] == got["patch_bytes"] == _lora_bytes(loras, case, 4)
    assert got["cached"] == got["planned_cache"]  # the one-vector cache keeps the patched weight, counted as before
    assert got["left_after_unpatch"] == 0
    if all(part.kind in LOW_RANK for part in CASES[case]):
        assert got["dense_copies"] == 0, "a layer holds a tensor of its weight's size outside the counted cache"
        assert got["size_growth"] < 0.1 * got["old_dense"]  # the previous design's dense copies


@pytest.mark.parametrize("qtype, case", PARAMS)
def test_partial_loads_give_the_same_output_within_the_budget(probe, qtype, case):
    got = probe[qtype][case]
    assert got["lowvram_functions"] > 0 and got["lowvram_error"] <= 1e-6
    assert got["partial_loaded_layers"] > 0 and got["partial_lowvram_layers"] > 0
    assert got["partial_error"] <= 1e-6
    assert got["partial_patch_bytes"] <= got["partial_memory"] <= got["partial_budget"]
    # the host makes room: it unloads part of the model, restoring those weights; their patch moves to its
    # per-call functions and the dropped per-call patches free their tensors at once
    assert got["unloaded_error"] <= 1e-6 and got["stale_patches"] == 0


def test_merging_two_gguf_models_with_cores_node_equals_merging_by_hand(probe):
    got = probe["model merge"]
    assert got["patched_layers"] > 20 and got["weight_error"] <= 1e-5
    assert got["dense_copies"] == 0


def test_the_per_call_rules_equal_the_hosts_own(probe):
    """The fast paths (LoRA merged by one matmul or bypassed, LoKr merged by one fused pass) against the host's
    ``calculate_weight`` on the same fp32 weight, for factorings and options the tiny files do not have."""
    for name, error in probe["rules"].items():
        print(f"{name}: {error:.1e}")
        assert error <= 2e-6, f"{name}: {error:.1e}"


def _rules() -> dict[str, float]:
    """Max abs difference between :class:`DequantPatch` and ``comfy.lora.calculate_weight`` (and, for plain LoRAs,
    the bypass against the merged weight's matmul) on random fp32 weights."""
    import torch.nn.functional as F
    from comfy.lora import calculate_weight
    from comfy.weight_adapter import LoKrAdapter, LoRAAdapter
    from qip.nodes.host.ops import DequantPatch

    g = torch.Generator().manual_seed(7)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    def lora(alpha, rank=4, mid=None):
        return LoRAAdapter(set(), (rand(48, rank), rand(rank, 32), alpha, mid, None, None))

    def lokr(w1=False, w2=False, alpha=None, rank=3):  # w1 / w2: the block in factors
        return LoKrAdapter(set(), (None if w1 else rand(4, 2), None if w2 else rand(12, 16), alpha,
                                   rand(4, rank) if w1 else None, rand(rank, 2) if w1 else None,
                                   rand(12, rank) if w2 else None, rand(rank, 16) if w2 else None, None, None))

    cases = {
        "lora alpha 6 rank 4": [(0.7, lora(6.0), 1.0, None, None)],
        "lora no alpha": [(1.3, lora(None), 1.0, None, None)],
        "lora strength_model 0.5 (host path)": [(0.7, lora(2.0), 0.5, None, None)],
        "lora with a function (host path)": [(0.7, lora(2.0), 1.0, None, lambda a: a * 0.5)],
        "lokr blocks whole, alpha unused": [(0.9, lokr(alpha=5.0), 1.0, None, None)],
        "lokr w1 factored": [(0.9, lokr(w1=True, alpha=5.0), 1.0, None, None)],
        "lokr both factored": [(0.9, lokr(w1=True, w2=True, alpha=2.0), 1.0, None, None)],
        "lokr both factored, no alpha": [(-0.4, lokr(w1=True, w2=True), 1.0, None, None)],
        "lora + lokr + lora": [(0.5, lora(2.0), 1.0, None, None), (0.9, lokr(w2=True, alpha=2.0), 1.0, None, None),
                               (1.1, lora(None, rank=8), 1.0, None, None)],
        "diff then lora": [(0.3, (rand(48, 32),), 1.0, None, None), (0.8, lora(1.0), 1.0, None, None)],
        "two loras, bypassed": [(0.5, lora(2.0), 1.0, None, None), (1.1, lora(None, rank=8), 1.0, None, None)],
    }
    errors = {}
    for name, patches in cases.items():
        weight = rand(48, 32)
        expected = calculate_weight(patches, weight.clone(), "w")
        patch = DequantPatch("w", patches)
        errors[name] = (patch(weight.clone()) - expected).abs().max().item()
        x = rand(5, 32)
        if patch.bypasses(x, weight.shape):
            got = patch.add_low_rank(x, F.linear(x, weight), weight.shape)
            errors[name + " (bypass)"] = (got - F.linear(x, expected)).abs().max().item()
    errors["bypass used"] = float(not any(name.endswith("(bypass)") for name in errors))  # 0: it was
    return errors


# -- run as a script: the probe inside the host's folder -----------------------------------------------------------
def _probe(comfy_dir: str, repo: str, spec_file: str, out_file: str) -> None:
    from host_process import load_pack, start_host

    folder_paths = start_host(comfy_dir)

    spec = json.loads(Path(spec_file).read_text())
    for folder in ("diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, spec[{"diffusion_models": "models"}.get(folder, folder)],
                                           is_default=True)
    load_pack(repo)
    sys.path += [repo + "/tools", repo]  # after the host's folder: its `nodes` module, not our package
    import comfy.model_management
    import nodes as core_nodes
    from safetensors.torch import load_file, save_file
    from qip.models import QuantizedTensor
    from qip.models.io.gguf import load_gguf_state_dict
    from qip.nodes.host.ops import HostPatchable, LowVramPatch
    from qip.nodes.loaders import DiffusionModelLoader
    from qip.nodes.lora import LoraLoader
    from test_lora_host import merge

    cpu = torch.device("cpu")
    generator = torch.manual_seed(0)
    # 256 image tokens: their Linears merge the LoRA into the weight; the 7 text tokens' ones bypass it
    x = torch.randn(1, 16, 1, 32, 32, generator=generator)
    sigma = torch.tensor([0.7])
    context = torch.randn(1, 7, 256, generator=generator)

    def run(model) -> torch.Tensor:
        with torch.no_grad():
            return model.model.apply_model(x, sigma, c_crossattn=context).clone()

    def layers(model):
        return [(n, m) for n, m in model.model.diffusion_model.named_modules()
                if isinstance(m, HostPatchable) and m.weight is not None]

    def dense_copies(model) -> int:
        """Layers holding a tensor of half their weight's size or more (fp32) outside their parameters and their
        (counted) dequant cache, or as much in their patch's tensors."""
        count = 0
        for _, m in layers(model):
            size = m.weight.logical_shape.numel() if isinstance(m.weight, QuantizedTensor) else m.weight.numel()
            values = [v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules", "_cache")]
            held = [t for v in values for t in (v if isinstance(v, tuple) else (v,))
                    if isinstance(t, torch.Tensor) and t.data_ptr() != m.weight.data_ptr()]
            count += any(t.numel() >= size // 2 for t in held) or m.patch_held_bytes() >= size * 2
        return count

    def leftovers(model) -> int:
        return sum(any(k in vars(m) for k in ("_patched", "_host_patch", "_lowvram_memo")) for _, m in layers(model))

    results = {"loras": spec["loras"]}
    for qtype, file_name in spec["qtypes"].items():
        (plain,) = DiffusionModelLoader.execute(file_name, "fp32", "auto (from the file)")
        base = load_gguf_state_dict(Path(spec["models"]) / file_name, dequantize=True, dtype=torch.float32)
        plain.load(cpu, full_load=True)
        plain_out = run(plain)
        plain.unpatch_model(cpu)
        results[qtype] = {}
        for case, chain in spec["cases"].items():
            model, expected = plain, base
            for part in chain:
                if part["loader"] == "core":
                    (model,) = core_nodes.LoraLoaderModelOnly().load_lora_model_only(model, part["file"],
                                                                                       part["strength"])
                else:
                    model = LoraLoader.execute(model, part["file"], part["strength"], 0.0).result[0]
                tensors = load_file(str(Path(spec["loras"]) / part["file"]))
                expected = merge(expected, tensors, *part["merge"][:4], part["merge"][4], part["strength"])
            r = {"size_growth": model.model_size() - plain.model_size(), "patch_bytes": model.patched_gguf_bytes(),
                 "old_dense": sum(m.weight.logical_shape.numel() * 4 for n, m in layers(model)
                                  if f"diffusion_model.{n}.weight" in model.patches
                                  and isinstance(m.weight, QuantizedTensor))}
            model.load(cpu, full_load=True)
            out = run(model)
            like = torch.empty(0)
            r["weight_error"] = max((m._weight(like) - expected[f"{n}.weight"]).abs().max().item()
                                    for n, m in layers(model))
            dit_state = model.model.diffusion_model.state_dict()
            r["bias_error"] = max((dit_state[k].float() - v).abs().max().item() for k, v in expected.items()
                                  if k.endswith(".bias"))
            r["patched_layers"] = sum(m._held("_host_patch") is not None for _, m in layers(model))
            r["dense_copies"] = dense_copies(model)
            r["cached"] = sum(m.cached_bytes() for _, m in layers(model))
            r["planned_cache"] = model.gguf_cache_bytes()
            # the same DiT merged by hand, through the same loader and host
            merged_name = f"merged_{qtype}.safetensors"
            save_file({k: v.contiguous() for k, v in expected.items()}, str(Path(spec["models"]) / merged_name))
            (merged,) = DiffusionModelLoader.execute(merged_name, "fp32", "auto (from the file)")
            merged.load(cpu, full_load=True)
            r["output_error"] = (out - run(merged)).abs().max().item()
            r["lora_effect"] = (out - plain_out).abs().max().item()
            merged.unpatch_model(cpu)
            model.unpatch_model(cpu)
            r["left_after_unpatch"] = leftovers(model)
            # low VRAM: every layer offloaded, the host's per-call patches
            model.load(cpu, lowvram_model_memory=1, full_load=False)
            r["lowvram_functions"] = sum(isinstance((m.weight_function or [None])[0], LowVramPatch)
                                         for _, m in layers(model))
            r["lowvram_error"] = (run(model) - out).abs().max().item()
            model.unpatch_model(cpu)
            # partial: a budget of the model's size, which the host's offload buffers leave short; then the host
            # frees room by unloading what it loaded
            budget = model.model_size()
            model.load(cpu, lowvram_model_memory=budget, full_load=False)
            r["partial_budget"], r["partial_memory"] = budget, model.model.model_loaded_weight_memory
            r["partial_patch_bytes"] = model.patched_gguf_bytes()
            r["partial_loaded_layers"] = sum(m._held("_host_patch") is not None for _, m in layers(model))
            r["partial_lowvram_layers"] = sum(bool(m.weight_function) for _, m in layers(model))
            r["partial_error"] = (run(model) - out).abs().max().item()
            model.partially_unload(cpu, memory_to_free=budget)
            r["stale_patches"] = sum("_host_patch" in vars(m) and m.weight_function for _, m in layers(model))
            r["unloaded_error"] = (run(model) - out).abs().max().item()
            model.unpatch_model(cpu)
            comfy.model_management.soft_empty_cache()
            results[qtype][case] = r
    results["rules"] = _rules()
    # core's model merging: the other model's weights arrive as nested patches, dequantized at each call too
    from comfy_extras.nodes_model_merging import ModelMergeSimple

    ratio = 0.3
    names = list(spec["qtypes"].values())
    first, second = (DiffusionModelLoader.execute(name, "fp32", "auto (from the file)")[0] for name in names)
    (mixed,) = ModelMergeSimple().merge(first, second, ratio)
    first_w, second_w = (load_gguf_state_dict(Path(spec["models"]) / name, dequantize=True, dtype=torch.float32)
                         for name in names)
    expected = {k: ratio * v + (1 - ratio) * second_w[k] for k, v in first_w.items()}
    mixed.load(cpu, full_load=True)
    like = torch.empty(0)
    results["model merge"] = {
        "weight_error": max((m._weight(like) - expected[f"{n}.weight"]).abs().max().item() for n, m in layers(mixed)),
        "patched_layers": sum(m._held("_host_patch") is not None for _, m in layers(mixed)),
        "dense_copies": dense_copies(mixed)}
    mixed.unpatch_model(cpu)
    torch.save(results, out_file)
    print(MARKER + "done")


if __name__ == "__main__":
    _probe(*sys.argv[1:5])
