"""Our MODEL inside the real host behaves like core's Qwen model: its DIFFUSION_MODEL wrappers (EasyCache),
TorchCompileModel, the attention override, ``patches_replace`` and ``patches`` double-block patches.

The probes are test-only nodes (tests/host_nodes) that install hooks the way other packs do; the DiT calls they
record are replayed here with the library (standalone: PyTorch SDPA) to check the numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import BLOCK_HOOK, load_diffusion_model
from tiny_models.configs import TINY_DIT
from env import comfyui_path
from test_t2i_host import read_latent, save_latent, small_t2i

DEPTH = TINY_DIT["num_layers"]


def _graph(host, *, steps: int = 2, cfg: float = 4.0, size: int = 128, weight_dtype: str | None = None) -> dict:
    graph = small_t2i(host, steps=steps, cfg=cfg, size=size)
    if weight_dtype is not None:
        (loader,) = [n for n in graph.values() if n["class_type"] == "QIP_DiffusionModelLoader"]
        loader["inputs"]["weight_dtype"] = weight_dtype
    (sampler_id,) = [i for i, n in graph.items() if n["class_type"] == "SamplerCustomAdvanced"]
    save_latent(graph, [sampler_id, 0], "hooks")
    return graph


def _insert(graph: dict, class_type: str, **inputs) -> str:
    """Put a MODEL -> MODEL node just before the guider (after whatever was inserted before it)."""
    (guider,) = [n for n in graph.values() if n["class_type"] == "CFGGuider"]
    node_id = f"probe{len(graph)}"
    graph[node_id] = {"class_type": class_type, "inputs": {"model": guider["inputs"]["model"], **inputs}}
    guider["inputs"]["model"] = [node_id, 0]
    return node_id


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def dit(host_models_dir):
    return load_diffusion_model(host_models_dir / "diffusion_models" / "qwen_image_bf16.safetensors",
                                dtype=torch.float32)


def _replay(dit, record: Path, options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first recorded DiT call run by the library, and what the host returned for it."""
    saved = load_file(str(record) + ".safetensors")
    refs = [saved[k][:, :, 0] for k in sorted(k for k in saved if k.startswith("ref"))]
    out = dit(saved["x"][:, :, 0], saved["timestep"], saved["context"], ref_latents=refs or None, options=options)
    return out, saved["out"][:, :, 0]


def test_attention_override_sees_every_dit_attention_and_sdpa_is_bit_identical(host, dit, tmp_path):
    graph = _graph(host)
    calls, record = tmp_path / "attention.jsonl", tmp_path / "dit.jsonl"
    _insert(graph, "QIPTest_AttentionOverride", path=str(calls), sdpa=True)
    _insert(graph, "QIPTest_RecordDiT", path=str(record))
    host.run(graph)

    dit_calls, attention = _lines(record), _lines(calls)
    assert dit_calls and all(call["options_last"] for call in dit_calls)  # wrappers find transformer_options last
    assert len(attention) == len(dit_calls) * DEPTH  # one joint attention per block, every one overridden
    assert [a["block"] for a in attention] == list(range(DEPTH)) * len(dit_calls)
    assert {a["total"] for a in attention} == {DEPTH}
    ours, hosts = _replay(dit, record)
    assert torch.equal(ours, hosts)  # SDPA through the host's override == the library's own SDPA, bit for bit


def test_patches_replace_double_block_replaces_that_block(host, dit, tmp_path):
    record = tmp_path / "dit.jsonl"
    graph = _graph(host)
    _insert(graph, "QIPTest_ReplaceBlock", index=1, mode="skip")
    _insert(graph, "QIPTest_RecordDiT", path=str(record))
    host.run(graph)

    def skip_block_1(call):
        return (call.img, call.txt) if call.index == 1 else call.run(call.img, call.txt, call.temb, call.rope)

    expected, hosts = _replay(dit, record, {BLOCK_HOOK: skip_block_1})
    plain, _ = _replay(dit, record)
    torch.testing.assert_close(hosts, expected, rtol=1e-4, atol=1e-4)
    assert (hosts - plain).abs().max() > 1e-2  # the block really was skipped


def test_patches_replace_original_block_and_double_block_patches(host, dit, tmp_path):
    record = tmp_path / "dit.jsonl"
    graph = _graph(host)
    _insert(graph, "QIPTest_ReplaceBlock", index=0, mode="original")  # asserts the inputs stay unchanged
    _insert(graph, "QIPTest_AfterBlock", index=0, value=0.5)
    _insert(graph, "QIPTest_RecordDiT", path=str(record))
    host.run(graph)

    def add_after_block_0(call):
        img, txt = call.run(call.img, call.txt, call.temb, call.rope)
        return (img + 0.5 * torch.linspace(0, 1, img.shape[-1]) if call.index == 0 else img), txt

    expected, hosts = _replay(dit, record, {BLOCK_HOOK: add_after_block_0})
    plain, _ = _replay(dit, record)
    torch.testing.assert_close(hosts, expected, rtol=1e-4, atol=1e-4)
    assert (hosts - plain).abs().max() > 1e-2


def _core_model(graph: dict) -> None:
    """Load the same tiny DiT as core's own Qwen-Image model instead of ours."""
    (loader_id,) = [i for i, n in graph.items() if n["class_type"] == "QIP_DiffusionModelLoader"]
    config = {k: TINY_DIT[k] for k in ("in_channels", "out_channels", "num_layers", "attention_head_dim",
                                       "num_attention_heads", "joint_attention_dim", "axes_dims_rope")}
    graph[loader_id] = {"class_type": "QIPTest_CoreQwenImage",
                        "inputs": {"model_name": graph[loader_id]["inputs"]["model_name"],
                                   "config": json.dumps(config)}}


def test_easycache_skips_dit_calls_as_on_cores_model(host, tmp_path):
    """EasyCache decides from the DiT's inputs and outputs: on our MODEL it skips the same calls as on core's Qwen
    model with the same weights and gives the same latents (core's model is the bound its error is judged by)."""
    steps = 12
    results = {}
    for model in ("ours", "core"):
        for cache in (False, True):
            record = tmp_path / f"{model}-{cache}.jsonl"
            graph = _graph(host, steps=steps, cfg=1.0, weight_dtype="fp32")
            if model == "core":
                _core_model(graph)
            if cache:
                _insert(graph, "EasyCache", reuse_threshold=0.5, start_percent=0.15, end_percent=0.95, verbose=False)
            _insert(graph, "QIPTest_RecordDiT", path=str(record))
            latent = read_latent(host.run(graph))
            results[model, cache] = (len(_lines(record)), latent)
    assert results["ours", False][0] == steps  # CFG 1: one DiT call per step
    assert results["ours", True][0] < steps  # the cache skipped DiT calls ...
    assert results["ours", True][0] == results["core", True][0]  # ... the same ones as on core's model
    for cache in (False, True):
        ours, core = results["ours", cache][1], results["core", cache][1]
        error = ((ours - core).norm() / core.norm()).item()
        assert error < 1e-4, f"EasyCache={cache}: ours vs core's model, relative error {error:.2e}"


@pytest.mark.parametrize("weight_dtype", ["fp32", "bf16"])
def test_torch_compile_model_runs_compiled(host, tmp_path, weight_dtype):
    results = {}
    for compiled in (False, True):
        record = tmp_path / f"{compiled}.jsonl"
        graph = _graph(host, weight_dtype=weight_dtype)
        if compiled:
            _insert(graph, "TorchCompileModel", backend="inductor")
        _insert(graph, "QIPTest_RecordDiT", path=str(record))
        results[compiled] = read_latent(host.run(graph, timeout=900))
        assert all(call["compiling"] == compiled for call in _lines(record))  # our forward ran compiled
    tolerance = 1e-4 if weight_dtype == "fp32" else 3e-2
    error = ((results[True] - results[False]).norm() / results[False].norm()).item()
    assert error < tolerance, f"compiled vs eager ({weight_dtype}): relative error {error:.2e}"


def test_the_2_1_model_runs_under_the_host_wrappers(host, tmp_path):
    from test_qwen_image_2_1_host import graph_2_1

    record = tmp_path / "dit.jsonl"
    graph = graph_2_1([], prompt="a red fox", negative="", steps=3, seed=1, cfg=1.0, size=(128, 128))
    _insert(graph, "QIPTest_RecordDiT", path=str(record))
    host.run(graph)
    calls = _lines(record)
    assert len(calls) == 3 and all(call["options_last"] for call in calls)  # one call per step at CFG 1


MASK_PROBE = r"""
import sys
comfy_dir, repo, tests = sys.argv[1:4]
sys.path.insert(0, tests)
from host_process import load_pack, start_host
start_host(comfy_dir)
load_pack(repo)
import comfy.ldm.modules.attention as host
from qip.nodes.host.attention import masked_backend
assert masked_backend(host.attention_sage) is host.attention_pytorch
others = [host.attention_pytorch, host.attention_sub_quad, host.attention_split, host.attention_basic,
          host.attention_flash, host.attention_xformers]
assert all(masked_backend(f) is f for f in others)
import torch
from qip.nodes.host.attention import _additive
q = torch.zeros(1, 2, 5, 4, dtype=torch.bfloat16)
mask = torch.rand(1, 1, 5, 5) > 0.3
first = _additive(mask, False, q, q)
assert _additive(mask, False, q, q) is first  # made once per mask, not per block
assert torch.equal(first == 0, mask) and first.dtype == torch.bfloat16
assert _additive(mask, False, q.float(), q.float()).dtype == torch.float32  # another dtype: made anew
print("masked calls routed")
"""


def test_masked_calls_avoid_backends_that_may_drop_masks():
    # --use-sage-attention makes SageAttention the host's masked attention too; some of its releases accept
    # attn_mask and ignore it, which would let padded prompt tokens and EliGen entities act everywhere.
    tests = Path(__file__).parent
    done = subprocess.run([sys.executable, "-c", MASK_PROBE, str(comfyui_path()), str(tests.parent), str(tests)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "masked calls routed" in done.stdout, done.stderr[-3000:]
