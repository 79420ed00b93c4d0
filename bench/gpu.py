"""One table for the Qwen-Image DiT step on a GPU: every weight format and attention kernel, against diffusers.

With CUDA: full-size synthetic weights (the real config: 60 blocks, width 3072, joint 3584; ``--blocks`` fewer, and
fewer by default when the GPU's memory is short) made on the device, one denoising step at 1328x1328 (6889 image
tokens + ``--text`` text tokens, batch 1, bf16 compute).  Rows:

* bf16, PyTorch SDPA (the row every "vs bf16" ratio divides by);
* bf16 with SageAttention / FlashAttention 2 through the library's attention seam (``ATTENTION_KERNEL``), where
  the packages ``sageattention`` / ``flash_attn`` are importable;
* fp8 e4m3fn block weights upcast per layer (``CastOps``), and fp8 with fast matmul (``torch._scaled_mm``,
  per-tensor scales; compute capability >= 8.9, or a CPU whose torch multiplies fp8);
* GGUF Q8_0 and Q4_K_M (``GGUFOps``, the preset rules of ``models.io.gguf.quantize``, the loader's one-vector cache);
* diffusers' ``QwenImageTransformer2DModel`` on the very same bf16 tensors (where ``diffusers`` is importable).

Each row: median step time after warm-up (CUDA events), ratios vs our bf16 row and vs diffusers, achieved TFLOP/s
(analytic: Linear matmuls + attention) and share of the GPU's dense bf16 peak, peak VRAM (max_memory_allocated over
the timed steps, reset after each build) and the output's relative L2 distance to the bf16 row: every format holds
the same values (block 0's tensors are drawn once in fp32 and each block gets its own copy in the row's format, so
quantizing 20 B parameters costs one block).  A row that breaks says "failed: <reason>" and the run goes on; a hard
time budget (``--budget``, default 7 min) skips rows that would not fit and cuts timed steps short.  The table is
printed and written after every row to ``--out`` (markdown) and beside it as ``.json``.

Without CUDA the same rows run on the CPU at a small size (width 256, 3 blocks, 1024 image tokens) and the table
says CPU: only its ratios mean something.  ``--quick``: a smoke run of a tiny model (seconds).

Goals at 1328x1328 on an H100/H200: bf16 >= 55% of peak; Q4_K_M step <= 1.15x bf16; fp8 fast matmul faster than
bf16.  Needs the pack's requirements (gguf) and, for the reference row, diffusers==0.42.1.

    python bench/gpu.py                                   # the GPU table (or the CPU one)
    python bench/gpu.py --blocks 20 --reps 3 --out /tmp/gpu.md
    python bench/gpu.py --quick --out /tmp/smoke.md
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.util
import json
import os
import re
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(BENCH)]

from bench_dit import rel_l2, run_diffusers, step_flops, synthetic_value  # noqa: E402
from models.common.attention import ATTENTION_KERNEL, AttentionKernel, attention  # noqa: E402
from models.common.ops import CastOps, cast_bias  # noqa: E402
from models.qwen_image.dit import DiTConfig, QwenImageDiT  # noqa: E402

# Dense bf16 tensor-core peaks in TFLOP/s (no sparsity), by a fragment of the CUDA device name; first match wins.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("RTX 4090", 165.0))
GOAL_PEAK_SHARE, GOAL_Q4_K_M, GOAL_FP8_FAST = 0.55, 1.15, 1.0
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
_BLOCK = re.compile(r"^transformer_blocks\.\d+\.")
Step = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    """What a run measures: the DiT's config, the image side in pixels (a multiple of 16) and the text tokens."""

    config: DiTConfig
    pixels: int
    text: int

    @property
    def latent(self) -> tuple[int, int]:
        return self.pixels // 8, self.pixels // 8  # the VAE's spatial factor

    @property
    def image_tokens(self) -> int:
        return (self.pixels // 8 // self.config.patch_size) ** 2


# Per mode: the config (depth from --blocks), pixels, text tokens, warm-up steps, timed steps.
GPU_MODE = (DiTConfig(), 1328, 128, 2, 5)  # the real model
# width 256: K-quant rows still fit; 3 blocks: Q4_K_M's middle block is Q4_K (blocks 0 and last are one type higher)
CPU_MODE = (DiTConfig(depth=3, heads=2, joint_dim=256), 512, 64, 2, 5)
QUICK_MODE = (DiTConfig(depth=1, heads=2, joint_dim=256), 256, 16, 1, 2)


class Skipped(Exception):
    """A row that cannot run here (no CUDA, a package missing, the time budget)."""


def parameter_counts(config: DiTConfig) -> tuple[int, int]:
    """Parameters outside the blocks and per block."""
    meta = QwenImageDiT(replace(config, depth=1), device="meta")
    block = sum(p.numel() for p in meta.transformer_blocks.parameters())
    return sum(p.numel() for p in meta.parameters()) - block, block


def fitting_blocks(config: DiTConfig, device: torch.device) -> int:
    """The most blocks (up to ``config.depth``) whose bf16 weights fit the GPU with room for a build and a step."""
    outside, per_block = parameter_counts(config)
    room = 0.9 * torch.cuda.get_device_properties(device).total_memory - 2 * outside - 6 * 2**30
    return max(1, min(config.depth, int(room // (2 * per_block))))


def template(config: DiTConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """fp32 values of the tensors outside the blocks and of block 0 (bench_dit's scales), drawn on ``device``."""
    meta = QwenImageDiT(replace(config, depth=1), device="meta")
    generator = torch.Generator(device=device).manual_seed(0)
    return {name: synthetic_value(name, tuple(p.shape), torch.float32, device, generator)
            for name, p in meta.named_parameters()}


Convert = Callable[[str, torch.Tensor], torch.Tensor]  # (parameter name, fp32 value) -> the stored tensor


def build(shape: Shape, device: torch.device, ops, convert: Convert) -> QwenImageDiT:
    """Our DiT on ``device`` (bf16 compute) with each parameter ``convert(name, fp32 template value)``; blocks take
    block 0's values, so ``convert`` must return a tensor of its own for each call."""
    values = template(shape.config, device)
    model = QwenImageDiT(shape.config, compute_dtype=torch.bfloat16, ops=ops, device="meta", dtype=torch.bfloat16)
    for name, _ in list(model.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        value = convert(name, values[_BLOCK.sub("transformer_blocks.0.", name)])
        model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    return model.eval()


def to_bf16(name: str, value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.bfloat16)


def to_fp8(name: str, value: torch.Tensor) -> torch.Tensor:
    """The blocks' Linear weights in fp8 e4m3fn, unscaled (as the common fp8 single files store them), the rest bf16."""
    return value.to(FP8 if value.ndim == 2 and name.startswith("transformer_blocks.") else torch.bfloat16)


def to_gguf(shape: Shape, preset: str) -> tuple[Convert, str]:
    """A converter to packed GGUF weights of ``preset`` (each distinct block-0 tensor and type quantized once, then
    copied), and a note naming the types used and how many layers keep a dense copy."""
    from models.io.gguf import DENSE_MODULATION_BUDGET, _dense_by_default
    from models.io.gguf.layers import DequantContext, QuantizedTensor
    from models.io.gguf.quantize import dit_tensor_type, quantize
    from models.io.gguf.reader import GGMLType, GGUFTensorInfo

    meta = QwenImageDiT(shape.config, device="meta")
    infos = {name: GGUFTensorInfo(name, dit_tensor_type(name, tuple(p.shape), preset, shape.config.depth),
                                  tuple(p.shape), 0, 0) for name, p in meta.named_parameters()}
    # the one-vector cache exactly as the loader marks it for a file with these tensors
    keep_dense = _dense_by_default(SimpleNamespace(tensors=infos), DENSE_MODULATION_BUDGET)
    context, packed = DequantContext(), {}

    def convert(name: str, value: torch.Tensor) -> torch.Tensor:
        qtype = infos[name].qtype
        if not infos[name].is_quantized:
            return value.to(torch.bfloat16)  # F32 / BF16 tensors: the loader stores them in the compute dtype
        key = (_BLOCK.sub("transformer_blocks.0.", name), qtype)
        if key not in packed:
            packed[key] = quantize(value, qtype)
        return QuantizedTensor.wrap(packed[key].clone(), qtype, value.shape, context, name in keep_dense)

    types = sorted({info.qtype.name for info in infos.values() if info.qtype != GGMLType.F32})
    return convert, f"types {'/'.join(types)}; {len(keep_dense)} one-vector layers kept dense"


def with_ops(model: QwenImageDiT, ops) -> QwenImageDiT:
    """A DiT built from ``ops`` on ``model``'s very tensors (no copy)."""
    twin = QwenImageDiT(model.config, compute_dtype=model.compute_dtype, ops=ops, device="meta")
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    return twin.eval().requires_grad_(False)


class ScaledMMOps(CastOps):
    """CastOps whose fp8 Linears multiply in fp8 (``torch._scaled_mm``): the input is scaled per tensor into e4m3's
    range at each call, the unscaled fp8 weight is used as stored (scale 1)."""

    class Linear(CastOps.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.weight.dtype != FP8:
                return super().forward(x)
            rows = x.reshape(-1, x.shape[-1])
            scale = rows.abs().amax().float().clamp(min=1e-12) / FP8_MAX
            out = torch._scaled_mm((rows / scale).to(FP8), self.weight.t(), scale_a=scale, scale_b=scale.new_ones(()),
                                   bias=cast_bias(self, x), out_dtype=x.dtype)
            return out.view(*x.shape[:-1], out.shape[-1])


def scaled_mm_missing(device: torch.device) -> str | None:
    """Why ScaledMMOps cannot run on ``device`` (None: it can).  CUDA needs compute capability 8.9 (fp8 tensor
    cores); recent torch builds also multiply fp8 on the CPU, so the CPU table (and its test) run this row too."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        return None if capability >= (8, 9) else f"needs compute capability >= 8.9, this GPU has {capability}"
    one, zeros = torch.ones((), device=device), torch.zeros(16, 16, device=device, dtype=FP8)
    try:
        torch._scaled_mm(zeros, zeros.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except Exception as error:  # whatever the reason, this torch does not multiply fp8 here
        return f"torch._scaled_mm on {device.type}: {first_line(error)}"
    return None


def sage_kernel() -> AttentionKernel:
    from sageattention import sageattn

    def kernel(q, k, v, *, mask, causal, options):
        if mask is not None:  # sageattn takes no mask
            return attention(q, k, v, mask=mask, causal=causal)
        return sageattn(q, k, v, tensor_layout="HND", is_causal=causal)  # HND = our [B, heads, L, head_dim]

    return kernel


def flash_kernel() -> AttentionKernel:
    from flash_attn import flash_attn_func

    def kernel(q, k, v, *, mask, causal, options):
        if mask is not None:  # flash_attn_func takes no mask
            return attention(q, k, v, mask=mask, causal=causal)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)  # flash_attn works on [B, L, heads, head_dim]

    return kernel


def diffusers_model(ours: QwenImageDiT):
    """diffusers' QwenImageTransformer2DModel of ``ours``' config on ``ours``' very tensors (the names are the same)."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    c = ours.config
    with torch.device("meta"):
        reference = QwenImageTransformer2DModel(
            patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.depth,
            attention_head_dim=c.head_dim, num_attention_heads=c.heads, joint_attention_dim=c.joint_dim,
            axes_dims_rope=c.axes_dim)
    reference.load_state_dict(ours.state_dict(), strict=True, assign=True)
    # the rope tables are plain attributes, which the meta context left empty
    reference.pos_embed = QwenEmbedRope(theta=int(c.rope_theta), axes_dim=list(c.axes_dim), scale_rope=True)
    return reference.eval()


def step_inputs(shape: Shape, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent, sigma and text condition of one step (drawn in fp32, bf16)."""
    g = torch.Generator(device=device).manual_seed(1)
    channels = shape.config.in_channels // shape.config.patch_size ** 2
    x = torch.randn(1, channels, *shape.latent, generator=g, device=device)
    context = torch.randn(1, shape.text, shape.config.joint_dim, generator=g, device=device)
    # sigma 0.5 is exact in bf16, which diffusers' timestep is cast to (ours stays fp32)
    return x.bfloat16(), torch.tensor([0.5], device=device), context.bfloat16()


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "(version unknown)"


def first_line(error: Exception) -> str:
    """The start of an error message, fit for a table cell."""
    lines = str(error).strip().splitlines()
    return lines[0][:200].replace("|", "/") if lines else ""


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def bf16_peak(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "unknown (CPU)"
    name = torch.cuda.get_device_name(device)
    for fragment, tflops in BF16_PEAK_TFLOPS:
        if fragment in name:
            return tflops, f"{tflops:.0f} TFLOP/s ({fragment} entry of the table)"
    return None, f"unknown for {name} (give --peak-tflops)"


@dataclass
class Row:
    label: str
    status: str = "not run"  # "ok", "skipped: ...", "failed: ..."
    ms: float | None = None
    steps: int = 0
    peak_vram_gib: float | None = None
    rel_l2_vs_bf16: float | None = None
    note: str = ""


class Run:
    """Rows measured one after another under one time budget; the table is saved after each row."""

    def __init__(self, args: argparse.Namespace, shape: Shape, device: torch.device, flops: float,
                 peak: float | None, header: list[str]):
        self.args, self.shape, self.device, self.flops, self.peak = args, shape, device, flops, peak
        self.header = header
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.rows: list[Row] = []
        self.build_s = self.step_s = 0.0  # the slowest build and the first step time: estimates for later rows
        self.reference: torch.Tensor | None = None  # the bf16 row's output

    def row(self, label: str, make: Callable[[], tuple[Step, str]]) -> None:
        """Measure one row: ``make()`` builds what it needs and returns the step and a note."""
        row = Row(label)
        self.rows.append(row)
        needed = self.build_s + (self.args.warmup + 1) * self.step_s * 1.5
        left = self.deadline - time.monotonic()
        try:
            if needed > left:
                raise Skipped(f"time budget: ~{needed:.0f} s needed, {max(left, 0):.0f} s of {self.args.budget:.0f} "
                              "s left")
            started = time.monotonic()
            step, row.note = make()
            self.build_s = max(self.build_s, time.monotonic() - started)
            self.release()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            times, out = self.time_steps(step)
            row.ms, row.steps, row.status = statistics.median(times) * 1e3, len(times), "ok"
            self.step_s = self.step_s or row.ms / 1e3
            if len(times) < self.args.reps:
                row.note = f"{row.note}; {len(times)} of {self.args.reps} timed steps (time budget)".lstrip("; ")
            if self.device.type == "cuda":
                row.peak_vram_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
            if label == BF16_ROW:
                self.reference = out.float()
            if self.reference is not None:
                row.rel_l2_vs_bf16 = rel_l2(out, self.reference)
        except Skipped as why:
            row.status = f"skipped: {why}"
        except Exception as error:  # any failure is this row's result; the others still run
            traceback.print_exc()
            row.status = f"failed: {type(error).__name__}: {first_line(error)}"
        print(f"[{time.monotonic() - self.started:5.0f} s] {label}: "
              + (f"{row.ms:.1f} ms/step ({row.steps} steps)" if row.status == "ok" else row.status), flush=True)
        self.release()
        self.save()

    def time_steps(self, step: Step) -> tuple[list[float], torch.Tensor]:
        """Warm-up steps, then timed steps (seconds) while the budget lasts (at least one), and the last output."""
        for _ in range(self.args.warmup):
            out = step()
        times = []
        while len(times) < self.args.reps and (not times or time.monotonic() + times[-1] < self.deadline):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start_s = time.perf_counter()
                out = step()
                times.append(time.perf_counter() - start_s)
        return times, out

    def release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the table ---------------------------------------------------------------------------------------------------
    def _ms(self, label: str) -> float | None:
        return next((r.ms for r in self.rows if r.label == label and r.status == "ok"), None)

    def results(self) -> list[dict]:
        bf16, reference = self._ms(BF16_ROW), self._ms(DIFFUSERS_ROW)
        out = []
        for row in self.rows:
            entry = asdict(row)
            if row.status == "ok":
                tflops = self.flops / (row.ms / 1e3) / 1e12
                entry.update(vs_bf16=row.ms / bf16 if bf16 else None,
                             vs_diffusers=row.ms / reference if reference else None, tflops=tflops,
                             share_of_peak=tflops / self.peak if self.peak else None)
            out.append(entry)
        return out

    def goals(self) -> list[str]:
        bf16 = self._ms(BF16_ROW)

        def judged(text: str, value: float | None, met: Callable[[float], bool], shown: str) -> str:
            return f"{text}: " + ("n/a (row not measured)" if value is None else
                                  f"{shown.format(value)} {'met' if met(value) else 'NOT MET'}")

        share = self.flops / (bf16 / 1e3) / 1e12 / self.peak if bf16 and self.peak else None
        q4 = self._ms("GGUF Q4_K_M")
        fast = self._ms(FP8_FAST_ROW)
        lines = [judged(f"bf16 >= {GOAL_PEAK_SHARE:.0%} of the bf16 peak", share, lambda v: v >= GOAL_PEAK_SHARE,
                        "{:.1%}"),
                 judged(f"GGUF Q4_K_M step <= {GOAL_Q4_K_M}x bf16", q4 / bf16 if q4 and bf16 else None,
                        lambda v: v <= GOAL_Q4_K_M, "{:.3f}x"),
                 judged("fp8 fast matmul faster than bf16", fast / bf16 if fast and bf16 else None,
                        lambda v: v < GOAL_FP8_FAST, "{:.3f}x")]
        if self.device.type != "cuda":
            lines.insert(0, "CPU run: the goals are for the 1328x1328 GPU table; these are the CPU ratios")
        return lines

    def markdown(self) -> str:
        def num(value: float | None, fmt: str) -> str:
            return "-" if value is None else fmt.format(value)

        lines = [*self.header, f"- time used: {time.monotonic() - self.started:.0f} s of the {self.args.budget:.0f} s "
                 f"budget; load average at the end {load_average()}", "",
                 "| row | ms/step | vs bf16 | vs diffusers | TFLOP/s | % of peak | peak VRAM GiB | rel L2 vs bf16 "
                 "| notes |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in self.results():
            ms = num(r["ms"], "{:.1f}") if r["status"] == "ok" else r["status"]
            lines.append(f"| {r['label']} | {ms} | {num(r.get('vs_bf16'), '{:.3f}x')} | "
                         f"{num(r.get('vs_diffusers'), '{:.3f}x')} | {num(r.get('tflops'), '{:.3g}')} | "
                         f"{num(r.get('share_of_peak'), '{:.1%}')} | {num(r['peak_vram_gib'], '{:.2f}')} | "
                         f"{num(r['rel_l2_vs_bf16'], '{:.2e}')} | {r['note']} |")
        return "\n".join([*lines, "", "Goals:", *(f"- {g}" for g in self.goals()), ""])

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.markdown())
        out.with_suffix(".json").write_text(json.dumps(
            {"header": self.header, "flops_per_step": self.flops, "bf16_peak_tflops": self.peak,
             "shape": {"config": asdict(self.shape.config), "pixels": self.shape.pixels, "text": self.shape.text,
                       "image_tokens": self.shape.image_tokens},
             "rows": self.results(), "goals": self.goals()}, indent=1))


BF16_ROW, DIFFUSERS_ROW, FP8_FAST_ROW = "bf16, SDPA", "diffusers bf16 (reference)", "fp8 e4m3fn, fast matmul"


def run_rows(run: Run) -> None:
    shape, device = run.shape, run.device
    x, t, context = step_inputs(shape, device)
    cuda = device.type == "cuda"

    def stepper(model: QwenImageDiT, options: dict | None = None) -> Step:
        return lambda: model(x, t, context, options=options)

    bf16 = functools.cache(lambda: build(shape, device, CastOps, to_bf16))  # shared by the next four rows
    run.row(BF16_ROW, lambda: (stepper(bf16()), "the reference of 'vs bf16'"))

    def kernel_row(package: str, kernel: Callable[[], AttentionKernel]) -> Callable[[], tuple[Step, str]]:
        def make() -> tuple[Step, str]:
            if not cuda:
                raise Skipped(f"{package} needs CUDA")
            if importlib.util.find_spec(package) is None:
                raise Skipped(f"{package} not installed")
            return stepper(bf16(), {ATTENTION_KERNEL: kernel()}), f"{package} {package_version(package)}"
        return make

    run.row("bf16, SageAttention", kernel_row("sageattention", sage_kernel))
    run.row("bf16, FlashAttention 2", kernel_row("flash_attn", flash_kernel))

    def diffusers_row() -> tuple[Step, str]:
        if importlib.util.find_spec("diffusers") is None:
            raise Skipped("diffusers not installed (pip install diffusers==0.42.1)")
        reference = diffusers_model(bf16())
        return (lambda: run_diffusers(reference, x, t, context)), \
            f"diffusers {package_version('diffusers')} on the same tensors, its default attention"

    run.row(DIFFUSERS_ROW, diffusers_row)
    bf16.cache_clear()

    fp8 = functools.cache(lambda: build(shape, device, CastOps, to_fp8))
    run.row("fp8 e4m3fn, per-layer upcast", lambda: (stepper(fp8()), "block Linears 1 byte/weight, upcast to bf16"))

    def fast_fp8() -> tuple[Step, str]:
        missing = scaled_mm_missing(device)
        if missing:
            raise Skipped(missing)
        return stepper(with_ops(fp8(), ScaledMMOps)), "torch._scaled_mm, input scaled per tensor per call"

    run.row(FP8_FAST_ROW, fast_fp8)
    fp8.cache_clear()

    for preset in ("Q8_0", "Q4_K_M"):
        def gguf(preset: str = preset) -> tuple[Step, str]:
            from models.io.gguf.layers import GGUFOps

            convert, note = to_gguf(shape, preset)
            return stepper(build(shape, device, GGUFOps, convert)), note

        run.row(f"GGUF {preset}", gguf)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, help="DiT blocks (default: GPU 60, fewer if the memory is short; "
                        "CPU 3; --quick 1)")
    parser.add_argument("--size", type=int, help="image side in pixels, a multiple of 16 (default: GPU 1328, "
                        "CPU 512, --quick 256)")
    parser.add_argument("--text", type=int, help="text tokens (default: GPU 128, CPU 64, --quick 16)")
    parser.add_argument("--warmup", type=int, help="untimed steps per row (default 2, --quick 1)")
    parser.add_argument("--reps", type=int, help="timed steps per row, the median is reported (default 5, "
                        "--quick 2)")
    parser.add_argument("--budget", type=float, default=420.0, help="hard time budget in seconds (default 420)")
    parser.add_argument("--out", help="markdown table (a .json beside it); default bench/results/gpu-<date>.md")
    parser.add_argument("--peak-tflops", type=float, help="this GPU's dense bf16 peak (default: by device name)")
    parser.add_argument("--threads", type=int, default=1, help="CPU run: torch threads (default 1: on a shared "
                        "machine more threads wait on each other and the ratios drift)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model, a few seconds")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    config, pixels, text, warmup, reps = QUICK_MODE if args.quick else GPU_MODE if device.type == "cuda" else CPU_MODE
    if args.blocks is None and device.type == "cuda" and not args.quick:
        args.blocks = fitting_blocks(config, device)
    config = replace(config, depth=args.blocks or config.depth)
    shape = Shape(config, args.size or pixels, args.text or text)
    if shape.pixels % 16 or shape.pixels <= 0:
        parser.error("--size must be a positive multiple of 16")
    if config.depth < 1 or (args.reps is not None and args.reps < 1) or (args.warmup is not None and args.warmup < 0):
        parser.error("--blocks and --reps must be >= 1, --warmup >= 0")
    args.warmup = warmup if args.warmup is None else args.warmup
    args.reps = reps if args.reps is None else args.reps
    args.out = args.out or str(BENCH / "results" / f"gpu-{datetime.date.today().isoformat()}.md")

    peak, peak_text = bf16_peak(device)
    if args.peak_tflops:
        peak, peak_text = args.peak_tflops, f"{args.peak_tflops:.0f} TFLOP/s (--peak-tflops)"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = (f"{props.name} (compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} "
                 f"GiB)")
    else:
        where = f"CPU ({torch.get_num_threads()} torch thread(s)) - CPU RUN at a reduced size: only the ratios count"
    outside, per_block = parameter_counts(config)
    flops = step_flops(config, shape.image_tokens, shape.text)
    header = [
        f"# Qwen-Image DiT step on {'the GPU' if device.type == 'cuda' else 'the CPU'}: weight formats and attention "
        "kernels (bench/gpu.py)", "",
        f"- command: `{shlex.join(['python', 'bench/gpu.py', *sys.argv[1:]])}`",
        f"- {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}; device {where}; "
        f"load average {load_average()}",
        f"- model: {config.depth} blocks x width {config.width} ({config.heads} heads x {config.head_dim}), joint dim "
        f"{config.joint_dim}: {(outside + config.depth * per_block) / 1e6:,.0f} M parameters; synthetic: block 0's "
        "values (fp32) copied into every block in each row's format (GGUF: one block quantized, its bytes copied)",
        f"- step: {shape.pixels}x{shape.pixels} px = {shape.image_tokens} image + {shape.text} text tokens, batch 1, "
        f"bf16 compute; {flops / 1e12:.3f} TFLOP per step (analytic: Linear matmuls + attention)",
        f"- timing: {args.warmup} warm-up step(s), then the median of {args.reps} "
        f"({'CUDA events' if device.type == 'cuda' else 'wall clock'}); ratios: this row's time over the other's (< 1: "
        f"faster); peak VRAM: max_memory_allocated over the timed steps, reset after each build; bf16 peak {peak_text}",
    ]
    run = Run(args, shape, device, flops, peak, header)
    print("\n".join(header), flush=True)
    run_rows(run)
    print("\n" + run.markdown())
    print(f"saved {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
