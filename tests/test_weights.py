"""assign_weights with "scaled fp8" layer classes that declare a scale for every Linear (as the host's do)."""

from __future__ import annotations

import torch
from torch import nn

from models.io.weights import assign_weights


class ScaledLinear(nn.Linear):
    """Like the host's scaled-fp8 Linear: a scale_weight parameter exists whether or not the file has one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale_weight = nn.Parameter(torch.ones((), device=self.weight.device), requires_grad=False)


def test_missing_scales_become_one_and_scales_stay_fp32():
    with torch.device("meta"):
        model = nn.Sequential(ScaledLinear(4, 4), ScaledLinear(4, 4))
    checkpoint = {
        "0.weight": torch.randn(4, 4).to(torch.float8_e4m3fn), "0.bias": torch.randn(4),
        "0.scale_weight": torch.tensor(0.5), "1.weight": torch.randn(4, 4), "1.bias": torch.randn(4),
    }
    assign_weights(model, checkpoint, dtype=torch.bfloat16)
    assert model[0].scale_weight.dtype == torch.float32 and model[0].scale_weight.item() == 0.5
    assert model[1].scale_weight.item() == 1.0  # the file leaves this layer unscaled
    assert model[0].weight.dtype == torch.float8_e4m3fn and model[1].weight.dtype == torch.bfloat16
