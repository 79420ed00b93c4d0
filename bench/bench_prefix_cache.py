"""Speed-up of the Qwen-Image 2.1 prefix KV cache on a multi-step edit (models.qwen_image_2_1).

One run: an Euler sampling loop with true CFG (two branches, different prompt lengths) and two condition images,
``--steps`` steps, synthetic weights.  Our DiT without and with a :class:`PrefixCache`, and diffusers'
``QwenImage21Transformer2DModel`` on the very same weight tensors without and with its ``QwenImage21KVCache``
(``--no-diffusers`` to skip it), alternating in one process; prints seconds per run, the cache speed-ups and the
largest difference of the final latents.  CPU in fp32 at a small width (about a minute); then, when CUDA is
available, the same in bf16 at the real width with ``--gpu-depth`` blocks and 1024x1024 images.

    python bench/bench_prefix_cache.py [--steps 8] [--reps 2] [--width 256] [--depth 6] [--size 384] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from models.qwen_image_2_1.dit import DiT21Config, QwenImage21DiT  # noqa: E402
from models.qwen_image_2_1.prefix_cache import PrefixCache  # noqa: E402

LATENT_PIXELS = 16  # one latent token per 16x16 pixels
# Text runs around the two condition images (system/user template, "Picture" prefixes, the prompt).
POSITIVE_TEXT, NEGATIVE_TEXT = (24, 12, 60), (24, 12, 8)


def synthetic_model(config: DiT21Config, dtype: torch.dtype, device: str) -> QwenImage21DiT:
    """Our DiT with random weights made on ``device``: Linear std 1/sqrt(fan_in), q/k norms 1 + 0.1 n, the
    zero-centred text norm 0.1 n."""
    model = QwenImage21DiT(config, compute_dtype=dtype, device="meta", dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, param in list(model.named_parameters()):
        value = torch.randn(param.shape, generator=generator, device=device, dtype=dtype)
        if param.ndim == 2:
            value.mul_(1.0 / math.sqrt(param.shape[1]))
        else:
            value.mul_(0.1).add_(0.0 if "text_norm" in name else 1.0)
        owner_name, _, leaf = name.rpartition(".")
        model.get_submodule(owner_name)._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    return model.eval()


def reference_on(ours: QwenImage21DiT):
    """diffusers' model sharing ``ours``' weight tensors."""
    from diffusers import QwenImage21Transformer2DModel
    from diffusers.models.transformers.transformer_qwenimage21 import (QwenImage21Rope,
                                                                       QwenImage21TemporalTimesteps)

    c = ours.config
    with torch.device("meta"):
        reference = QwenImage21Transformer2DModel(
            num_layers=c.depth, attention_head_dim=c.head_dim, num_attention_heads=c.heads,
            context_in_dim=c.context_dim, mlp_ratio=c.mlp_ratio, axes_dims_rope=c.axes_dim)
    reference.load_state_dict(ours.state_dict(), strict=True, assign=True)
    # plain attributes / non-persistent buffers, left empty by the meta context
    reference.pos_embed = QwenImage21Rope(theta=10000, axes_dim=list(c.axes_dim))
    device = next(ours.parameters()).device
    reference.time_text_embed.time_proj = QwenImage21TemporalTimesteps(256).to(device)
    return reference.eval()


class Branch:
    """One CFG branch: context with image slots, and both implementations' calls on it."""

    def __init__(self, text: tuple[int, ...], grids: list[tuple[int, int]], context_dim: int, device, dtype,
                 seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        slots = [False] * text[0]
        for (h, w), run in zip(grids, text[1:]):
            slots += [True] * (h * w // 4) + [False] * run
        self.slots = torch.tensor(slots, device=device)
        self.context = torch.randn(1, len(slots), context_dim, generator=g, device=device, dtype=dtype) * 2

    def ours(self, model, x, sigma, refs, cache):
        return model(x, sigma, self.context, ref_latents=refs, image_slots=self.slots, kv_cache=cache)

    def reference(self, model, x, sigma, refs, cache, step):
        batch, _, h, w = x.shape
        pack = lambda z: z.flatten(2).transpose(1, 2)  # noqa: E731
        hidden = torch.cat([pack(r) for r in refs] + [pack(x)], dim=1)
        img_mask = torch.cat([self.slots, self.slots.new_ones(h * w // 4)])[None]
        shapes = [[(1, r.shape[2], r.shape[3]) for r in refs] + [(1, h, w)]]
        mode = None if cache is None else "extract" if step == 0 else "cached"
        out = model(hidden_states=hidden, encoder_hidden_states=self.context, timestep=sigma, img_shapes=shapes,
                    img_mask=img_mask, kv_cache=cache, kv_cache_mode=mode, return_dict=False)[0]
        return out[:, -h * w:].transpose(1, 2).reshape(batch, -1, h, w)


@torch.no_grad()
def sample(run, branches, x, refs, steps: int, cached: bool, depth: int, diffusers: bool) -> tuple[torch.Tensor, float]:
    """Euler with true CFG 4; returns the final latent and the seconds it took."""
    if diffusers:
        from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

        caches = [QwenImage21KVCache(depth) if cached else None for _ in branches]
    else:
        caches = [PrefixCache() if cached else None] * len(branches)  # one cache serves both branches
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=x.device)
    synchronize(x.device)
    start = time.perf_counter()
    for step in range(steps):
        sigma = sigmas[step].reshape(1).to(x.dtype)
        if diffusers:
            cond, uncond = (b.reference(run, x, sigma, refs, c, step) for b, c in zip(branches, caches))
        else:
            cond, uncond = (b.ours(run, x, sigma, refs, c) for b, c in zip(branches, caches))
        x = x + (sigmas[step + 1] - sigmas[step]) * (uncond + 4.0 * (cond - uncond))
    synchronize(x.device)
    return x, time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(config: DiT21Config, size: int, steps: int, reps: int, dtype: torch.dtype, device: str,
          with_diffusers: bool) -> None:
    grid = size // LATENT_PIXELS
    grids = [(grid, grid), (grid, grid * 3 // 4 // 2 * 2)]  # two condition images of different shapes
    ours = synthetic_model(config, dtype, device)
    reference = reference_on(ours) if with_diffusers else None
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, config.in_channels, grid, grid, generator=g, device=device, dtype=dtype)
    refs = [torch.randn(1, config.in_channels, h, w, generator=g, device=device, dtype=dtype) for h, w in grids]
    branches = [Branch(POSITIVE_TEXT, grids, config.context_dim, device, dtype, 2),
                Branch(NEGATIVE_TEXT, grids, config.context_dim, device, dtype, 3)]
    prefix = sum(POSITIVE_TEXT) + sum(h * w for h, w in grids)
    print(f"\n{device} {str(dtype).removeprefix('torch.')}: width {config.width}, {config.depth} blocks, {steps} steps "
          f"x 2 CFG branches, target {grid}x{grid} = {grid * grid} tokens, prefix {prefix} tokens "
          f"(2 condition images {grids}), {reps} reps")
    runs = {"ours": (ours, False)} | ({"diffusers": (reference, True)} if reference is not None else {})
    times: dict[tuple[str, bool], list[float]] = {}
    finals: dict[tuple[str, bool], torch.Tensor] = {}
    sample(ours, branches, x, refs, 1, True, config.depth, False)  # warm-up (allocator, kernels)
    for _ in range(reps):
        for name, (model, is_diffusers) in runs.items():
            for cached in (False, True):
                final, seconds = sample(model, branches, x, refs, steps, cached, config.depth, is_diffusers)
                times.setdefault((name, cached), []).append(seconds)
                finals[(name, cached)] = final.float()
    median = {key: statistics.median(values) for key, values in times.items()}
    for name in runs:
        uncached, cached = median[(name, False)], median[(name, True)]
        diff = (finals[(name, True)] - finals[(name, False)]).abs().max().item()
        print(f"  {name:9s} no cache {uncached:7.2f} s   cache {cached:7.2f} s   speed-up x{uncached / cached:.2f}   "
              f"max |cached - uncached| final latent {diff:.2e}")
    if reference is not None:
        diff = (finals[("ours", True)] - finals[("diffusers", True)]).abs().max().item()
        print(f"  ours / diffusers time with cache: {median[('ours', True)] / median[('diffusers', True)]:.2f} "
              f"(without: {median[('ours', False)] / median[('diffusers', False)]:.2f}); "
              f"max |ours - diffusers| final latent {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--width", type=int, default=256, help="CPU model width (heads of 64)")
    parser.add_argument("--depth", type=int, default=6, help="CPU model blocks")
    parser.add_argument("--size", type=int, default=384, help="CPU image side in pixels (target and references)")
    parser.add_argument("--gpu-depth", type=int, default=8, help="CUDA: blocks of the real-width model")
    parser.add_argument("--gpu-size", type=int, default=1024, help="CUDA: image side in pixels")
    parser.add_argument("--no-diffusers", action="store_true", help="skip diffusers' model")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default: torch's); 1 gives steady timings on a loaded machine")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU threads: {torch.get_num_threads()}")
    cpu = DiT21Config(depth=args.depth, heads=args.width // 64, head_dim=64, context_dim=args.width,
                      axes_dim=(8, 28, 28))
    bench(cpu, args.size, args.steps, args.reps, torch.float32, "cpu", not args.no_diffusers)
    if torch.cuda.is_available():
        bench(DiT21Config(depth=args.gpu_depth), args.gpu_size, args.steps, args.reps, torch.bfloat16, "cuda",
              not args.no_diffusers)
    else:
        print("\nCUDA: not available, skipped")


if __name__ == "__main__":
    main()
