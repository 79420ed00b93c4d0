"""GGUFOps layers: packed weights give the outputs of plain layers with the dequantized weights; caches; LoRA."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.io.gguf import QuantizedTensor
from models.io.gguf.layers import GGUFOps, enable_dequant_cache, memory_report
from models.io.gguf.quantize import quantize
from models.io.gguf.reader import GGMLType


def packed(shape, qtype: str = "Q8_0", seed: int = 0) -> QuantizedTensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return QuantizedTensor.wrap(quantize(x, GGMLType[qtype]), GGMLType[qtype], shape)


def oracle(weight: QuantizedTensor) -> torch.Tensor:
    """gguf-py's dequantization of the same bytes (independent of ours)."""
    raw = weight.as_subclass(torch.Tensor).numpy()
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(weight.qtype)))))


def install(layer: nn.Module, **params) -> nn.Module:
    for name, value in params.items():
        setattr(layer, name, None if value is None else nn.Parameter(value, requires_grad=False))
    return layer


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q5_1", "Q6_K"])
def test_linear_equals_plain_linear_with_dequantized_weight(qtype: str):
    weight = packed((48, 256), qtype)
    bias = torch.randn(48)
    layer = install(GGUFOps.Linear(256, 48, device="meta"), weight=weight, bias=bias)
    x = torch.randn(5, 256)
    expected = F.linear(x, oracle(weight), bias)
    assert torch.equal(layer(x), expected)
    # bf16 compute: weights dequantized straight to bf16
    assert torch.equal(layer(x.bfloat16()), F.linear(x.bfloat16(), oracle(weight).bfloat16(), bias.bfloat16()))


def test_conv_norm_embedding_layers():
    # ggml blocks run along the last (kernel width) dimension: kernels 32 wide so they quantize
    x2 = torch.randn(2, 32, 6, 40)
    conv2 = install(GGUFOps.Conv2d(32, 64, (1, 32), device="meta"), weight=packed((64, 32, 1, 32), "Q4_0"),
                    bias=torch.randn(64))
    assert torch.equal(conv2(x2), F.conv2d(x2, oracle(conv2.weight).view(64, 32, 1, 32), conv2.bias))
    x3 = torch.randn(1, 32, 2, 3, 33)
    conv3 = install(GGUFOps.Conv3d(32, 8, (1, 1, 32), device="meta"), weight=packed((8, 32, 1, 1, 32), "Q8_0"),
                    bias=None)
    assert torch.equal(conv3(x3), F.conv3d(x3, oracle(conv3.weight).view(8, 32, 1, 1, 32)))
    h = torch.randn(3, 64)
    ln = install(GGUFOps.LayerNorm(64, device="meta"), weight=packed((64,), "Q8_0"), bias=torch.randn(64))
    assert torch.equal(ln(h), F.layer_norm(h, (64,), oracle(ln.weight), ln.bias))
    rms = install(GGUFOps.RMSNorm(64, device="meta"), weight=packed((64,), "Q5_0"))
    assert torch.equal(rms(h), F.rms_norm(h, (64,), oracle(rms.weight)))
    gn = install(GGUFOps.GroupNorm(4, 32, device="meta"), weight=packed((32,), "Q8_0"), bias=torch.randn(32))
    assert torch.equal(gn(x2), F.group_norm(x2, 4, oracle(gn.weight).view(32), gn.bias))
    emb = install(GGUFOps.Embedding(100, 64, device="meta"), weight=packed((100, 64), "Q4_1"))
    ids = torch.tensor([[3, 99, 0], [7, 7, 1]])
    assert torch.equal(emb(ids), F.embedding(ids, oracle(emb.weight)))
    assert emb(ids, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_plain_weights_behave_like_cast_ops():
    layer = install(GGUFOps.Linear(8, 4, device="meta"), weight=torch.randn(4, 8).half(), bias=torch.randn(4))
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight.float(), layer.bias))


def test_quantized_tensor_survives_moves_copies_and_state_dict():
    weight = packed((16, 64))
    layer = install(GGUFOps.Linear(64, 16, device="meta"), weight=weight, bias=torch.randn(16))
    layer.to("cpu")
    layer.to(torch.float16)  # only floating tensors convert; the packed bytes stay as they are
    assert isinstance(layer.weight, QuantizedTensor) and isinstance(layer.weight, nn.Parameter)
    assert layer.weight.qtype == GGMLType.Q8_0 and tuple(layer.weight.logical_shape) == (16, 64)
    assert torch.equal(layer.weight.to(torch.float32).dequantize(), weight.dequantize())
    state = layer.state_dict()
    assert isinstance(state["weight"], QuantizedTensor) and state["weight"].qtype == GGMLType.Q8_0
    clone = copy.deepcopy(layer)
    assert isinstance(clone.weight, QuantizedTensor) and isinstance(clone.weight, nn.Parameter)
    assert clone.weight.data_ptr() != layer.weight.data_ptr()
    x = torch.randn(3, 64, dtype=torch.float16)
    assert torch.equal(clone(x), layer(x))
    for moved in (weight.clone(), weight.detach(), weight.contiguous(), weight.cpu()):
        assert isinstance(moved, QuantizedTensor) and moved.qtype == weight.qtype


def _model_with_modulation() -> nn.Module:
    model = nn.Module()
    model.img_mod = nn.Sequential(nn.SiLU(), install(GGUFOps.Linear(64, 384, device="meta"),
                                                     weight=packed((384, 64), seed=1), bias=torch.randn(384)))
    model.txt_mod = nn.Sequential(nn.SiLU(), install(GGUFOps.Linear(64, 384, device="meta"),
                                                     weight=packed((384, 64), "Q5_1", seed=2),
                                                     bias=torch.randn(384)))
    model.proj = install(GGUFOps.Linear(64, 64, device="meta"), weight=packed((64, 64), seed=3), bias=None)
    return model


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.img_mod(x) + model.txt_mod(x) + model.proj(x).sum()


def test_modulation_cache_is_exact_and_reports_its_bytes():
    model = _model_with_modulation()
    x = torch.randn(1, 64)
    before = _run(model, x)
    report = memory_report(model, torch.float32)
    assert report.dequant_cache_bytes == 0 and report.lora_cache_bytes == 0
    assert report.quantized_bytes == sum(p.numel() for p in model.parameters() if isinstance(p, QuantizedTensor))
    assert report.one_vector_cache_cost == 2 * 384 * 64 * 4
    assert enable_dequant_cache(model) == 2
    first, second = _run(model, x), _run(model, x)
    assert torch.equal(first, before) and torch.equal(second, before)
    held = model.img_mod[1].cached_weight.numel() * 4 + model.txt_mod[1].cached_weight.numel() * 4
    report = memory_report(model, torch.float32)
    assert report.dequant_cache_bytes == held == report.one_vector_cache_cost == report.extra_bytes
    assert model.proj.cached_weight is None
    cached = model.img_mod[1].cached_weight
    _run(model, x)
    assert model.img_mod[1].cached_weight is cached  # dequantized once
    _run(model, x.bfloat16())  # another dtype: rebuilt, the old cache dropped
    assert memory_report(model).dequant_cache_bytes == 2 * 384 * 64 * 2
    enable_dequant_cache(model, enabled=False)
    assert memory_report(model).extra_bytes == 0
    assert torch.equal(_run(model, x), before)


def test_lora_merged_once_equals_applying_the_delta_each_time():
    weight = packed((32, 64), "Q8_0", seed=4)
    bias = torch.randn(32)
    layer = install(GGUFOps.Linear(64, 32, device="meta"), weight=weight, bias=bias)
    g = torch.Generator().manual_seed(9)
    loras = [(torch.randn(32, 4, generator=g), torch.randn(4, 64, generator=g), 0.5),
             (torch.randn(32, 2, generator=g), torch.randn(2, 64, generator=g), -0.25)]
    layer.set_lora(loras)
    x = torch.randn(6, 64)
    merged = oracle(weight) + sum(s * (u @ d) for u, d, s in loras)
    expected = F.linear(x, merged, bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    cache = layer.cached_weight
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    assert layer.cached_weight is cache  # merged once, reused
    report = memory_report(layer, torch.float32)
    assert report.lora_cache_bytes == 32 * 64 * 4 and report.dequant_cache_bytes == 0
    dense_delta = merged - oracle(weight)
    layer.set_lora(dense_delta)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.set_lora(None)
    assert torch.equal(layer(x), F.linear(x, oracle(weight), bias))
    assert memory_report(layer).extra_bytes == 0


def test_lora_on_a_conv_and_on_plain_weights():
    conv = install(GGUFOps.Conv2d(8, 16, 3, device="meta"), weight=torch.randn(16, 8, 3, 3), bias=None)
    up, down = torch.randn(16, 2), torch.randn(2, 8, 3, 3)
    conv.set_lora([(up, down, 1.0)])
    x = torch.randn(1, 8, 5, 5)
    delta = (up @ down.flatten(1)).reshape(16, 8, 3, 3)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight + delta), atol=1e-5, rtol=1e-5)


def test_one_vector_weights_are_kept_dense_by_default_within_the_budget(tmp_path):
    from models import load_diffusion_model
    from models.io.gguf import open_dit_gguf
    from models.io.gguf.layers import ONE_VECTOR_LAYERS
    from tiny_models.gguf_factory import K_QUANT_DIT, make_dit_gguf

    path = make_dit_gguf(tmp_path, qtype="Q4_K", seed=3, config=K_QUANT_DIT)
    model = load_diffusion_model(path, dtype=torch.bfloat16)
    one_vector = [m for name, m in model.named_modules() if name.endswith(ONE_VECTOR_LAYERS)]
    assert len(one_vector) == 2 * K_QUANT_DIT["num_layers"] + 3  # modulations, norm_out, the timestep MLP
    assert all(isinstance(m.weight, QuantizedTensor) and m.keeps_dequantized() for m in one_vector)
    assert not model.transformer_blocks[0].attn.to_q.keeps_dequantized()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 5, K_QUANT_DIT["joint_attention_dim"], generator=g)
    t = torch.tensor([0.3])
    report = memory_report(model, torch.bfloat16)
    assert report.dequant_cache_bytes == 0 and report.dequant_cache_planned == report.one_vector_cache_cost > 0
    with torch.no_grad():
        cached = model(x, t, ctx)
        assert memory_report(model, torch.bfloat16).dequant_cache_bytes == report.dequant_cache_planned
        weights = [m.cached_weight for m in one_vector]
        assert torch.equal(model(x, t, ctx), cached)
        assert all(m.cached_weight is w for m, w in zip(one_vector, weights))  # dequantized once
        assert enable_dequant_cache(model, enabled=False) == len(one_vector)
        assert memory_report(model, torch.bfloat16).dequant_cache_planned == 0
        assert torch.equal(model(x, t, ctx), cached)  # the cache changes no bit
        assert memory_report(model).extra_bytes == 0
        enable_dequant_cache(model, enabled=None)  # back to the file's marks
        model(x, t, ctx)
        assert memory_report(model).extra_bytes > 0
    model.to(torch.float32)  # moved or converted: the dense copies go (they would be stale)
    assert memory_report(model).extra_bytes == 0

    # the budget counts parameters, the smallest weights first, then in file order: room for the three small
    # weights and one modulation keeps block 0's img_mod and no other modulation
    small = 256 * 256 + 256 * 256 + 2 * 256 * 256  # timestep MLP, norm_out.linear
    checkpoint, _ = open_dit_gguf(path, dense_budget=small + 6 * 256 * 256)
    kept = {n for n, v in checkpoint.items() if getattr(v, "keep_dense", False)}
    assert {n for n in kept if "_mod." in n} == {"transformer_blocks.0.img_mod.1.weight"} and len(kept) == 4
    checkpoint, _ = open_dit_gguf(path, dense_budget=0)
    assert not any(getattr(v, "keep_dense", False) for v in checkpoint.values())


def test_dequant_cache_is_safe_when_one_layer_runs_in_several_threads():
    import threading

    weight = packed((64, 256), "Q4_K", seed=8)
    layer = install(GGUFOps.Linear(256, 64, device="meta"), weight=weight, bias=None)
    layer.set_dequant_cache(True)
    x = torch.randn(3, 256)
    expected = F.linear(x, oracle(weight))
    results: list[torch.Tensor] = []
    barrier = threading.Barrier(4)

    def run():
        barrier.wait()
        results.extend(layer(x) for _ in range(20))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 80 and all(torch.equal(r, expected) for r in results)


def test_small_weights_are_dequantized_in_groups_and_stay_exact(monkeypatch):
    # several Linears of one checkpoint (one context), mixed types and one weight too big to group: the first round
    # learns the order, later rounds dequantize the small weights a group at a time; any order change is a miss
    # that falls back, never a wrong weight
    from models.io.gguf import layers as layers_module
    from models.io.gguf.layers import DequantContext

    monkeypatch.setattr(layers_module, "_GROUP_WEIGHT_ELEMENTS", 64 * 256)
    calls: list[tuple[str, int]] = []
    real = layers_module.dequantize_group

    def counting(raws, qtype, out, workspace):
        calls.append((qtype.name, len(raws)))
        return real(raws, qtype, out, workspace)

    monkeypatch.setattr(layers_module, "dequantize_group", counting)
    context = DequantContext()
    specs = [("Q4_K", 64), ("Q6_K", 32), ("Q4_K", 48), ("Q8_0", 96), ("Q4_K", 16), ("Q5_1", 64)]  # 96 rows: too big
    layers = []
    for i, (qtype, rows) in enumerate(specs):
        weight = packed((rows, 256), qtype, seed=20 + i)
        weight.context = context
        layers.append(install(GGUFOps.Linear(256, rows, device="meta"), weight=weight, bias=torch.randn(rows)))
    x = torch.randn(3, 256)
    for dtype in (torch.float32, torch.bfloat16):
        expected = [F.linear(x.to(dtype), oracle(layer.weight).to(dtype), layer.bias.to(dtype)) for layer in layers]
        for order in [range(6)] * 3 + [[0, 1, 3, 2, 4, 5], [5, 4, 0, 1, 2, 3], range(6), range(6)]:
            for i in order:
                assert torch.equal(layers[i](x.to(dtype)), expected[i]), (dtype, list(order), i)
    # grouped runs happened, several weights of one type at once, and the too-big weight never was in one
    assert any(n > 1 for _, n in calls) and ("Q8_0", 1) not in calls and all(q != "Q8_0" for q, _ in calls)
    # moving the weights drops what was dequantized ahead
    before = context.epoch
    layers[2].to("cpu")
    assert context.epoch > before
    assert torch.equal(layers[3](x), F.linear(x, oracle(layers[3].weight), layers[3].bias))


def test_grouped_dequantization_in_a_model_equals_one_weight_at_a_time(tmp_path):
    # a whole tiny DiT, several steps: from the second step on its Linears are dequantized in groups; the result is
    # the same as with grouping off (every weight alone), bit for bit
    from models import load_diffusion_model
    from models.io.gguf import layers as layers_module
    from tiny_models.gguf_factory import K_QUANT_DIT, make_dit_gguf

    model = load_diffusion_model(make_dit_gguf(tmp_path, qtype="Q4_K_M", config=K_QUANT_DIT), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, 16, generator=g).bfloat16()
    ctx = torch.randn(1, 8, K_QUANT_DIT["joint_attention_dim"], generator=g).bfloat16()
    with torch.no_grad():
        grouped = [model(x, torch.tensor([t]), ctx) for t in (0.9, 0.6, 0.3)]
        context = next(p.context for p in model.parameters() if isinstance(p, QuantizedTensor))
        assert context._scratch().group is not None  # grouping really ran
        limit = layers_module._GROUP_WEIGHT_ELEMENTS
        try:
            layers_module._GROUP_WEIGHT_ELEMENTS = 0
            single = [model(x, torch.tensor([t]), ctx) for t in (0.9, 0.6, 0.3)]
        finally:
            layers_module._GROUP_WEIGHT_ELEMENTS = limit
    assert all(torch.equal(a, b) for a, b in zip(grouped, single))
