"""ComfyUI's mixed-precision ("comfy_quant") checkpoints in the library, without a host: per-layer casting runs the
fp8 formats (weight x weight_scale), other formats are refused by name, and layers that load themselves (a host's
mixed-precision Linear) get their tensors, marker included, through torch's state-dict protocol."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models import WeightFileError, identify, load_diffusion_model
from models.common.ops import CastOps
from models.io.weights import assign_weights, quant_config, quant_marker
from tiny_models.comfy_quant import make_companions, make_dit_comfy_quant


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return make_dit_comfy_quant(tmp_path_factory.mktemp("comfy-quant"), prefix=True, input_scale=1.0)


def test_marker_round_trip():
    config = {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    assert quant_config(quant_marker(config)) == config
    with pytest.raises(WeightFileError, match="not a quantization marker"):
        quant_config(torch.tensor(list(b"[1, 2]"), dtype=torch.uint8))


def test_mixed_file_is_identified_and_runs_on_per_layer_casting(mixed):
    assert identify(mixed).role == "diffusion_model" and identify(mixed).supported
    dit = load_diffusion_model(mixed, dtype=torch.float32)
    q = dit.transformer_blocks[0].attn.to_q
    assert isinstance(q, CastOps.Linear) and q.weight.dtype == torch.float8_e4m3fn
    assert q.weight_scale.dtype == torch.float32 and dit.img_in.weight.dtype == torch.float32
    twin = load_diffusion_model(make_companions(mixed)["twin"], dtype=torch.float32)
    x = torch.randn(1, 16, 8, 12, generator=torch.manual_seed(0))
    context = torch.randn(1, 7, dit.config.joint_dim, generator=torch.manual_seed(1))
    with torch.no_grad():
        out, expected = dit(x, torch.tensor([0.7]), context), twin(x, torch.tensor([0.7]), context)
    # the twin holds fp8 x weight_scale rounded to bf16: that rounding is all that differs
    assert ((out - expected).norm() / expected.norm()).item() < 2e-3


def test_formats_per_layer_casting_cannot_compute_are_refused(mixed, tmp_path):
    tensors = load_file(str(mixed))
    marker = "model.diffusion_model.transformer_blocks.1.img_mlp.net.2.comfy_quant"
    tensors[marker] = quant_marker({"format": "nvfp4"})
    save_file(tensors, str(tmp_path / "nvfp4.safetensors"))
    with pytest.raises(WeightFileError, match=r"transformer_blocks\.1\.img_mlp\.net\.2' is quantized as nvfp4"):
        load_diffusion_model(tmp_path / "nvfp4.safetensors", dtype=torch.float32)


class SelfLoadingLinear(nn.Module):
    """Like a host's mixed-precision Linear: no weight until its state dict arrives, then built from it."""

    def __init__(self, features: int, device=None):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(features, device=device))
        self.received: dict = {}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        self.received = {k[len(prefix):]: v for k, v in state_dict.items()}
        weight = state_dict.pop(prefix + "weight")
        scale = state_dict.pop(prefix + "weight_scale")
        state_dict.pop(prefix + "comfy_quant")
        self.weight = nn.Parameter(weight.to(torch.float32) * scale, requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        missing.remove(prefix + "weight")  # loaded by hand, as the host's layers do


def test_layers_that_load_themselves_get_all_their_tensors():
    model = nn.Sequential(SelfLoadingLinear(4, device="meta"), nn.Linear(4, 4, device="meta"))
    weight = torch.randn(4, 4)
    checkpoint = {"0.weight": weight.to(torch.float8_e4m3fn), "0.weight_scale": torch.tensor(0.5),
                  "0.comfy_quant": quant_marker({"format": "float8_e4m3fn"}), "0.bias": torch.randn(4),
                  "1.weight": torch.randn(4, 4), "1.bias": torch.randn(4)}
    assign_weights(model, checkpoint, dtype=torch.bfloat16)
    layer = model[0]
    assert set(layer.received) == {"weight", "weight_scale", "comfy_quant", "bias"}
    # fp8 stays fp8, the scale fp32 and the marker uint8; other floats arrive in the compute dtype
    assert layer.received["weight"].dtype == torch.float8_e4m3fn and layer.received["weight_scale"].dtype == \
        torch.float32 and layer.received["comfy_quant"].dtype == torch.uint8
    assert layer.bias.dtype == torch.bfloat16 and not layer.bias.is_meta  # assigned, not copied into meta
    assert torch.equal(layer.weight, weight.to(torch.float8_e4m3fn).float() * 0.5)
    with pytest.raises(WeightFileError, match=r"missing \(e\.g\. 0\.weight\)"):
        assign_weights(nn.Sequential(SelfLoadingLinear(4, device="meta")), {}, dtype=torch.float32)
