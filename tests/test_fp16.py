"""fp16 execution of the DiT (GPUs without bf16: Pascal, Turing, older Macs): Qwen's residual streams reach about
2e7, far beyond fp16's 65504.  The DiT computes its layers in fp16 and keeps the streams in fp32, so a model whose
activations are scaled to that size stays finite and close to fp32 (CPU has fp16 matmuls)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import BLOCK_HOOK, load_diffusion_model
from tiny_models.configs import TINY_DIT
from tiny_models.factory import make_dit

GATE_BIAS = 3e4  # representable in fp16; gate x layer output then reaches ~1e7 in the streams
OUTPUT_SCALE = 100.0


@pytest.fixture(scope="module")
def large_activation_dit(tmp_path_factory):
    """The tiny DiT with its gates and attention / MLP outputs scaled so the streams reach real magnitudes."""
    root = tmp_path_factory.mktemp("fp16")
    tensors = load_file(str(make_dit(root, dtype="fp32", seed=3)))
    width = TINY_DIT["num_attention_heads"] * TINY_DIT["attention_head_dim"]
    for name in list(tensors):
        if name.endswith(("img_mod.1.bias", "txt_mod.1.bias")):
            bias = tensors[name].clone().view(6, width)
            bias[[2, 5]] += GATE_BIAS  # gate1, gate2
            tensors[name] = bias.view(-1)
        elif name.endswith(("mlp.net.2.weight", "attn.to_out.0.weight", "attn.to_add_out.weight")):
            tensors[name] = tensors[name] * OUTPUT_SCALE
    path = root / "large_activations.safetensors"
    save_file(tensors, str(path))
    return path


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 10, generator=g)
    ref = torch.randn(1, 16, 6, 6, generator=g)
    context = torch.randn(1, 7, TINY_DIT["joint_attention_dim"], generator=g)
    return x, torch.tensor([0.6]), context, [ref]


def test_fp16_dit_is_finite_and_close_to_fp32_at_2e7_activations(large_activation_dit):
    x, t, context, refs = _inputs()
    reference = load_diffusion_model(large_activation_dit, dtype=torch.float32)
    peak = []

    def record(call):
        img, txt = call.run(call.img, call.txt, call.temb, call.rope)
        peak.append(max(img.abs().max().item(), txt.abs().max().item()))
        return img, txt

    expected = reference(x, t, context, ref_latents=refs, options={BLOCK_HOOK: record})
    assert max(peak) > 1e7  # far beyond fp16's range: the test exercises the overflow it guards against

    dit = load_diffusion_model(large_activation_dit, dtype=torch.float16)
    assert dit.stream_dtype == torch.float32
    out = dit(x, t, context, ref_latents=refs)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    relative = ((out.float() - expected).norm() / expected.norm()).item()
    assert relative < 1e-2, f"fp16 vs fp32 relative L2 {relative:.2e}"


def test_bf16_and_fp32_streams_are_the_compute_dtype(large_activation_dit):
    for dtype in (torch.bfloat16, torch.float32):
        assert load_diffusion_model(large_activation_dit, dtype=dtype).stream_dtype == dtype
