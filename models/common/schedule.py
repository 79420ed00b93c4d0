"""The Qwen-Image flow-matching sigma schedule (what the reference pipeline samples with).

``sigmas = linspace(1, 1/N, N)``, shifted exponentially by ``mu`` (which grows linearly with the number of image
tokens: 0.5 at 256 tokens, 0.9 at 8192), stretched so the last sigma is exactly the terminal value 0.02, then 0
appended.  Computed in float32 with the same operations as the reference scheduler, so the numbers are identical.
"""

from __future__ import annotations

import math

import torch

BASE_TOKENS, MAX_TOKENS = 256, 8192
BASE_SHIFT, MAX_SHIFT = 0.5, 0.9
TERMINAL_SIGMA = 0.02


def resolution_shift(tokens: int) -> float:
    """``mu`` for a target of ``tokens`` image tokens (linear from 0.5 at 256 tokens to 0.9 at 8192)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return tokens * slope + (BASE_SHIFT - slope * BASE_TOKENS)


def exponential_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    """``e^mu / (e^mu + 1/sigma - 1)``: the time shift Qwen-Image and Flux use."""
    # Divide tensor by tensor: torch evaluates ``scalar / tensor`` as a reciprocal and a product (one more
    # rounding), which would make the schedule differ from the reference in the last bit.
    e_mu = torch.full_like(sigma, math.exp(mu))
    return e_mu / (e_mu + (torch.ones_like(sigma) / sigma - 1))


def linear_timesteps(steps: int) -> torch.Tensor:
    """``linspace(1, 1/steps, steps)`` in float32: the unshifted timesteps of the reference."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).to(torch.float32)


def finish_schedule(sigmas: torch.Tensor, terminal: float | None = TERMINAL_SIGMA) -> torch.Tensor:
    """Stretch shifted sigmas so the last equals ``terminal`` (when given), then append the final 0."""
    if terminal and len(sigmas) > 1:  # one step has nothing to stretch (its only sigma is 1)
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def flow_sigmas(steps: int, mu: float, terminal: float | None = TERMINAL_SIGMA) -> torch.Tensor:
    """The ``steps + 1`` sigmas (last one 0) of the reference schedule, float32."""
    return finish_schedule(exponential_shift(mu, linear_timesteps(steps)), terminal)
