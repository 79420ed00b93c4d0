"""Benchmarks of the Qwen-Image DiT (models.qwen_image.dit) against diffusers' QwenImageTransformer2DModel.

Modes (run from the repository root with the project venv's python):

* ``step`` (default): one denoising step at a realistic shape (full width 3072, 24 heads, joint dim 3584,
  ``--blocks`` blocks, 1024x1024 image = 4096 image tokens, ``--text`` text tokens) on CPU, fp32 and bf16,
  ours and diffusers alternating in one process on the SAME weight tensors; prints the median time ratio.
* ``memory``: peak RSS of a fresh process that loads a synthetic full-width bf16 single file (``--blocks``
  blocks, 2-4 GB) compared with the file size, and the same for an fp8 file (which must stay 1 byte/weight).
* ``gpu``: bf16 on CUDA, 1328x1328, all 60 blocks of synthetic weights generated on the device; seconds per step
  and achieved TFLOP/s (matmul + attention FLOPs), diffusers on the same tensors alongside (``--no-diffusers``
  to skip it); ``--gguf Q4_K_M`` also times a synthetic GGUF of that layout (written to ``--tmp``, ~13 GB for 60
  blocks) against ours in bf16.

Examples::

    python bench/bench_dit.py step --blocks 2 --reps 3
    python bench/bench_dit.py memory --blocks 5
    python bench/bench_dit.py gpu --blocks 60 --reps 5
    python bench/bench_dit.py gpu --blocks 60 --no-diffusers --gguf Q4_K_M
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from models.io.gguf.reader import GGMLType  # noqa: E402
from models.qwen_image.dit import DiTConfig, QwenImageDiT  # noqa: E402
from models.qwen_image.latent import QWEN_IMAGE_LATENT  # noqa: E402
from tiny_models.configs import FULL_DIT  # noqa: E402


def full_config(blocks: int) -> DiTConfig:
    return DiTConfig(depth=blocks, heads=FULL_DIT["num_attention_heads"], head_dim=FULL_DIT["attention_head_dim"],
                     joint_dim=FULL_DIT["joint_attention_dim"], axes_dim=tuple(FULL_DIT["axes_dims_rope"]))


def synthetic_value(name: str, shape: tuple[int, ...], dtype: torch.dtype, device, generator) -> torch.Tensor:
    """Random weights that keep activations O(1): Linear std 1/sqrt(fan_in), norms 1 + 0.1 n, small biases."""
    t = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if len(shape) == 2:
        return t.mul_(1.0 / math.sqrt(shape[1]))
    if "norm" in name:
        return t.mul_(0.1).add_(1.0)
    return t.mul_(0.02)


def synthetic_models(blocks: int, dtype: torch.dtype, device: str, with_diffusers: bool = True):
    """Our model with synthetic weights made on ``device``, and diffusers' model sharing the very same tensors."""
    config = full_config(blocks)
    ours = QwenImageDiT(config, compute_dtype=dtype, device="meta", dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, param in list(ours.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = ours.get_submodule(owner_name)
        owner._parameters[leaf] = torch.nn.Parameter(
            synthetic_value(name, tuple(param.shape), dtype, device, generator), requires_grad=False)
    ours.eval()
    if not with_diffusers:
        return ours, None
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    with torch.device("meta"):
        reference = QwenImageTransformer2DModel(**{**FULL_DIT, "num_layers": blocks})
    reference.load_state_dict(ours.state_dict(), strict=True, assign=True)
    # the rope tables are plain attributes, which the meta context left empty
    reference.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(FULL_DIT["axes_dims_rope"]), scale_rope=True)
    return ours, reference.eval()


def step_inputs(latent_hw: tuple[int, int], text: int, dtype: torch.dtype, device: str):
    """The same values for every dtype (drawn in fp32)."""
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, 16, *latent_hw, generator=g, device=device)
    ctx = torch.randn(1, text, FULL_DIT["joint_attention_dim"], generator=g, device=device)
    return x.to(dtype), torch.tensor([0.6], device=device), ctx.to(dtype)


def run_ours(model, x, t, ctx):
    return model(x, t, ctx)


def run_diffusers(model, x, t, ctx):
    h, w = x.shape[2], x.shape[3]
    with torch.no_grad():
        out = model(hidden_states=QWEN_IMAGE_LATENT.pack(x), encoder_hidden_states=ctx, timestep=t.to(x.dtype),
                    img_shapes=[[(1, h // 2, w // 2)]], return_dict=False)[0]
    return QWEN_IMAGE_LATENT.unpack(out, h, w)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, *args) -> tuple[float, torch.Tensor]:
    _sync(device)
    start = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return time.perf_counter() - start, out


def step_flops(config: DiTConfig, image_tokens: int, text_tokens: int) -> float:
    """Matmul + attention FLOPs of one forward (multiply-add = 2 FLOPs; modulation rows are negligible)."""
    width, joint = config.width, config.joint_dim
    per_block = 0.0
    for tokens in (image_tokens, text_tokens):
        per_block += 2 * tokens * width * width * 4  # q, k, v, out
        per_block += 2 * tokens * width * 4 * width * 2  # MLP up + down
    total = image_tokens + text_tokens
    per_block += 4 * total * total * width  # QK^T and PV over all heads
    embed = 2 * image_tokens * config.in_channels * width + 2 * text_tokens * joint * width
    final = 2 * image_tokens * width * config.patch_size ** 2 * config.out_channels
    return config.depth * per_block + embed + final


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def compare(ours, reference, inputs, reps: int, device: str, label: str, truth: torch.Tensor | None = None) -> dict:
    """Alternate ours / diffusers ``reps`` times after one warm-up each; report medians and the output match
    (with each one's distance to ``truth``, an fp32 output, when given)."""
    t_ours, t_ref = [], []
    _, out_ours = timed(run_ours, device, ours, *inputs)
    _, out_ref = timed(run_diffusers, device, reference, *inputs)
    rel = rel_l2(out_ours, out_ref)
    for _ in range(reps):
        t_ours.append(timed(run_ours, device, ours, *inputs)[0])
        t_ref.append(timed(run_diffusers, device, reference, *inputs)[0])
    ratios = [a / b for a, b in zip(t_ours, t_ref)]
    row = {"case": label, "ours_s": statistics.median(t_ours), "diffusers_s": statistics.median(t_ref),
           "ratio": statistics.median(ratios), "rel_l2_vs_diffusers": rel, "out": out_ours}
    print(f"{label:<16} ours {row['ours_s']:8.3f} s   diffusers {row['diffusers_s']:8.3f} s   "
          f"median ratio {row['ratio']:.3f}   (ours vs diffusers rel L2 {rel:.2e})", flush=True)
    if truth is not None:
        print(f"{'':<16} rel L2 to the fp32 output: ours {rel_l2(out_ours, truth):.2e}, "
              f"diffusers {rel_l2(out_ref, truth):.2e}", flush=True)
    return row


def mode_step(args) -> None:
    print(f"one step, {args.blocks} full-width blocks, {args.size}x{args.size} px -> "
          f"{(args.size // 16) ** 2} image tokens + {args.text} text tokens, CPU threads {torch.get_num_threads()}")
    latent = (args.size // 8, args.size // 8)
    truth = None
    for dtype in (torch.float32, torch.bfloat16):
        ours, reference = synthetic_models(args.blocks, dtype, "cpu")
        row = compare(ours, reference, step_inputs(latent, args.text, dtype, "cpu"), args.reps, "cpu",
                      f"cpu {str(dtype).removeprefix('torch.')}", truth)
        truth = row["out"] if truth is None else truth
        del ours, reference, row


# --- memory -------------------------------------------------------------------------------------------------------
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3"}
_GGUF_FLOATS = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


def write_synthetic_file(path: Path, blocks: int, fp8: bool) -> int:
    """Stream a full-width Comfy-style single file (prefixed names) to disk one tensor at a time."""
    config = full_config(blocks)
    model = QwenImageDiT(config, device="meta", dtype=torch.bfloat16)
    entries, offset = [], 0
    for name, param in model.named_parameters():
        dtype = torch.float8_e4m3fn if fp8 and param.ndim == 2 and name.startswith("transformer_blocks") \
            else torch.bfloat16
        nbytes = param.numel() * (1 if dtype == torch.float8_e4m3fn else 2)
        entries.append((name, tuple(param.shape), dtype, offset, nbytes))
        offset += nbytes
    header = {"model.diffusion_model." + n: {"dtype": _ST_DTYPES[d], "shape": list(s), "data_offsets": [o, o + b]}
              for n, s, d, o, b in entries}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, _, _ in entries:
            value = synthetic_value(name, shape, torch.bfloat16, "cpu", generator).to(dtype)
            f.write(value.view(torch.uint8).numpy().tobytes())
    return path.stat().st_size


_LOAD_SCRIPT = """
import json, resource, sys, torch
sys.path.insert(0, {repo!r})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from models import load_diffusion_model
import models.qwen_image.dit_loader
after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = load_diffusion_model({path!r}, dtype=torch.bfloat16)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = {{}}
for n, p in model.named_parameters():
    weights.setdefault(str(p.dtype), [0, 0])
    weights[str(p.dtype)][0] += p.numel(); weights[str(p.dtype)][1] += p.numel() * p.element_size()
print(json.dumps({{"after_import_kb": after_import, "peak_kb": peak, "weights": weights}}))
"""


def write_synthetic_gguf(path: Path, blocks: int, tensor_type: Callable[[str, tuple[int, ...]], GGMLType]) -> Path:
    """A full-width GGUF DiT (arch ``qwen_image``, ``blocks`` blocks) with ``tensor_type(name, shape)`` per tensor:
    random valid blocks of :func:`synthetic_value`'s scale, float tensors as :func:`synthetic_value` draws them.
    Streamed one tensor at a time."""
    from bench_gguf import valid_blocks
    from models.io.gguf.writer import GGUFWriter

    model = QwenImageDiT(full_config(blocks), device="meta", dtype=torch.bfloat16)
    writer = GGUFWriter(path, "qwen_image")
    for index, (name, param) in enumerate(model.named_parameters()):
        shape, qtype = tuple(param.shape), tensor_type(name, tuple(param.shape))
        if qtype in _GGUF_FLOATS:
            def data(n=name, s=shape, q=qtype, i=index):
                value = synthetic_value(n, s, torch.float32, "cpu", torch.Generator().manual_seed(i))
                return value.to(_GGUF_FLOATS[q])
        else:
            def data(s=shape, q=qtype, i=index):
                return valid_blocks(q.name, s, 1.0 / math.sqrt(s[-1]), i).tobytes()
        writer.add_tensor(name, data, qtype, shape)
    return writer.write()


def measure_load(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT.format(repo=str(REPO), path=str(path))],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mode_memory(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for fp8 in (False, True):
            path = Path(tmp) / ("dit_fp8.safetensors" if fp8 else "dit_bf16.safetensors")
            size = write_synthetic_file(path, args.blocks, fp8)
            result = measure_load(path)
            path.unlink()
            peak, base = result["peak_kb"] * 1024, result["after_import_kb"] * 1024
            label = "fp8_e4m3fn" if fp8 else "bf16"
            print(f"{label:<11} file {size / 1e9:6.2f} GB   peak RSS {peak / 1e9:6.2f} GB "
                  f"(x{peak / size:.2f} of file)   above import baseline {(peak - base) / 1e9:6.2f} GB "
                  f"(x{(peak - base) / size:.2f})")
            for dtype, (numel, nbytes) in sorted(result["weights"].items()):
                print(f"            {dtype:<22} {numel / 1e6:9.1f} M weights  {nbytes / numel:.0f} byte/weight")


# --- gpu ----------------------------------------------------------------------------------------------------------
def mode_gpu(args) -> None:
    device = args.device
    size = args.size
    latent = (size // 8, size // 8)
    config = full_config(args.blocks)
    image_tokens = (latent[0] // 2) * (latent[1] // 2)
    flops = step_flops(config, image_tokens, args.text)
    ours, reference = synthetic_models(args.blocks, torch.bfloat16, device, with_diffusers=not args.no_diffusers)
    inputs = step_inputs(latent, args.text, torch.bfloat16, device)
    print(f"{device}: bf16, {args.blocks} blocks, {size}x{size} px = {image_tokens} image + {args.text} text tokens, "
          f"{flops / 1e12:.1f} TFLOP per step")
    if reference is not None:
        row = compare(ours, reference, inputs, args.reps, device, f"{device} bf16")
        times = {"ours": row["ours_s"], "diffusers": row["diffusers_s"]}
    else:
        timed(run_ours, device, ours, *inputs)
        times = {"ours": statistics.median(timed(run_ours, device, ours, *inputs)[0] for _ in range(args.reps))}
    for who, seconds in times.items():
        print(f"  {who:<10} {seconds:8.3f} s/step   {flops / seconds / 1e12:7.1f} TFLOP/s")
    if args.gguf:
        del reference
        gguf_step(args, ours, inputs)
    if device.startswith("cuda"):
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def gguf_step(args, ours, inputs) -> None:
    """The same step with a synthetic GGUF of ``args.gguf``'s layout (e.g. Q4_K_M: the usual Qwen-Image rules),
    loaded like a file (packed weights, the one-vector cache on by default), alternating with the bf16 model."""
    from models import load_diffusion_model
    from models.io.gguf.quantize import dit_tensor_type

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = write_synthetic_gguf(Path(tmp) / "dit.gguf", args.blocks,
                                    lambda name, shape: dit_tensor_type(name, shape, args.gguf, args.blocks))
        size = path.stat().st_size
        model = load_diffusion_model(path, dtype=torch.bfloat16, device=args.device)
    timed(run_ours, args.device, model, *inputs)
    pairs = [(timed(run_ours, args.device, ours, *inputs)[0], timed(run_ours, args.device, model, *inputs)[0])
             for _ in range(args.reps)]
    bf16, gguf = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    print(f"  gguf {args.gguf} ({size / 1e9:.2f} GB file): {gguf:8.3f} s/step vs bf16 {bf16:.3f} s: "
          f"{gguf / bf16:.3f}x (goal at 1328x1328: <= 1.15x); median ratio of pairs "
          f"{statistics.median(g / b for b, g in pairs):.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="step", choices=["step", "memory", "gpu"])
    parser.add_argument("--blocks", type=int, help="DiT blocks (default: step 2, memory 5, gpu 60)")
    parser.add_argument("--size", type=int, help="image side in pixels (default: step 1024, gpu 1328)")
    parser.add_argument("--text", type=int, default=100, help="text tokens")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per model")
    parser.add_argument("--device", default="cuda", help="gpu mode: torch device")
    parser.add_argument("--no-diffusers", action="store_true", help="gpu mode: time ours only")
    parser.add_argument("--gguf", default=None, help="gpu mode: also time a synthetic GGUF of this type or preset "
                        "(e.g. Q4_K_M) against ours in bf16")
    parser.add_argument("--tmp", default=None, help="memory / gguf: folder for the temporary file")
    args = parser.parse_args()
    args.blocks = args.blocks or {"step": 2, "memory": 5, "gpu": 60}[args.mode]
    args.size = args.size or (1328 if args.mode == "gpu" else 1024)
    {"step": mode_step, "memory": mode_memory, "gpu": mode_gpu}[args.mode](args)
    if args.mode != "memory":
        print(f"(process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB)")


if __name__ == "__main__":
    main()
