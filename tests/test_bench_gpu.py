"""bench/gpu.py: a quick CPU run writes one complete table, and its analytic FLOP count matches torch's counter.

No timing is asserted: the table's numbers depend on the machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models.common.ops import CastOps
from models.qwen_image.dit import DiTConfig

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"
ROWS = ["bf16, SDPA", "bf16, SageAttention", "bf16, FlashAttention 2", "diffusers bf16 (reference)",
        "fp8 e4m3fn, per-layer upcast", "fp8 e4m3fn, fast matmul", "GGUF Q8_0", "GGUF Q4_K_M"]
CPU_ROWS = ["bf16, SDPA", "diffusers bf16 (reference)", "fp8 e4m3fn, per-layer upcast", "GGUF Q8_0", "GGUF Q4_K_M"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_run_writes_every_row(tmp_path):
    out = tmp_path / "table.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU table, even where a GPU is present
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=SCRIPT.parent.parent,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "command: `python bench/gpu.py --quick --out" in result.stdout
    assert "CPU RUN" in result.stdout

    body = [line for line in out.read_text().splitlines() if line.startswith("| ") and not line.startswith("| row ")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in body]
    assert [row[0] for row in cells] == ROWS
    for label, ms, *_ in cells:
        assert re.fullmatch(r"\d+\.\d", ms) or ms.startswith(("skipped: ", "failed: ")), (label, ms)

    rows = {row["label"]: row for row in json.loads(out.with_suffix(".json").read_text())["rows"]}
    fast_fp8 = [] if load_bench().scaled_mm_missing(torch.device("cpu")) else ["fp8 e4m3fn, fast matmul"]
    for label in CPU_ROWS + fast_fp8:  # everything that can run on a CPU did
        assert rows[label]["status"] == "ok", (label, rows[label]["status"], result.stderr[-4000:])
        assert rows[label]["ms"] > 0 and rows[label]["rel_l2_vs_bf16"] < 0.2
    assert rows["bf16, SDPA"]["vs_bf16"] == 1.0


def test_analytic_flops_match_torch_flop_counter():
    bench = load_bench()
    shape = bench.Shape(DiTConfig(depth=2, heads=2, joint_dim=256), pixels=256, text=16)
    model = bench.build(shape, torch.device("cpu"), CastOps, bench.to_bf16)
    x, t, context = bench.step_inputs(shape, "cpu")
    with FlopCounterMode(display=False) as counter:
        model(x, t, context)
    analytic = bench.step_flops(shape.config, shape.image_tokens, shape.text)
    # the count leaves out the one-vector layers (modulation, timestep MLP): well under 1% here
    assert abs(analytic / counter.get_total_flops() - 1) < 0.05


def test_attention_adapters_hand_each_kernel_its_layout(monkeypatch):
    """Stand-ins with the packages' layouts: flash_attn_func on [B, L, heads, D], sageattn on "HND" = [B, heads, L, D];
    a mask (neither takes one) goes to SDPA."""
    def flash_attn_func(q, k, v, causal=False):
        heads_first = [t.transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*heads_first, is_causal=causal).transpose(1, 2)

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False):
        assert tensor_layout == "HND"
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    monkeypatch.setitem(sys.modules, "flash_attn", SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setitem(sys.modules, "sageattention", SimpleNamespace(sageattn=sageattn))
    bench = load_bench()
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 10, 8).unbind(0)  # [B, heads, L, D] with heads != L
    mask = torch.rand(2, 3, 10, 10) > 0.3
    for kernel in (bench.sage_kernel(), bench.flash_kernel()):
        for causal in (False, True):
            expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            assert torch.allclose(kernel(q, k, v, mask=None, causal=causal, options={}), expected, atol=1e-6)
        masked = kernel(q, k, v, mask=mask, causal=False, options={})
        assert torch.allclose(masked, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6)
