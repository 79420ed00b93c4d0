"""The sigma schedule equals diffusers' FlowMatchEulerDiscreteScheduler configured as Qwen-Image ships it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from models.common.schedule import flow_sigmas, resolution_shift
from models.qwen_image.latent import QWEN_IMAGE_LATENT

# The scheduler_config.json of Qwen/Qwen-Image.
QWEN_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                      max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                      stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                      use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)


@pytest.mark.parametrize("width,height,steps", [(1328, 1328, 50), (1664, 928, 40), (512, 512, 8), (1024, 768, 30),
                                                (64, 64, 4), (2048, 2048, 20)])
def test_sigmas_match_the_reference_scheduler(width, height, steps):
    tokens = QWEN_IMAGE_LATENT.image_tokens(height // 8, width // 8)
    mu_ref = calculate_shift(tokens, 256, 8192, 0.5, 0.9)
    assert resolution_shift(tokens) == pytest.approx(mu_ref, abs=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu_ref)
    ours = flow_sigmas(steps, resolution_shift(tokens))
    assert ours.dtype == torch.float32 and ours.shape == scheduler.sigmas.shape
    assert torch.equal(ours, scheduler.sigmas)
    assert ours[-2].item() == pytest.approx(0.02, abs=1e-6) and ours[-1] == 0


def test_shift_grows_with_resolution_and_single_step_is_finite():
    assert resolution_shift(256) == pytest.approx(0.5) and resolution_shift(8192) == pytest.approx(0.9)
    assert resolution_shift(QWEN_IMAGE_LATENT.image_tokens(166, 166)) > resolution_shift(QWEN_IMAGE_LATENT.image_tokens(64, 64))
    assert torch.isfinite(flow_sigmas(1, 0.8)).all()
