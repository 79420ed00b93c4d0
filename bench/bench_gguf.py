"""GGUF benchmarks: dequantization throughput vs gguf-py, opening a full-size file, a tiny-DiT step.

Run from the repository root with the project venv's python::

    python bench/bench_gguf.py [--mb 64] [--parts 1234]

1. Dequantization: for each type, the same random valid blocks (``--mb`` MB of fp32 output) decoded by ours
   (torch) and by gguf-py (numpy) in this process; GB/s of fp32 output (best of a few runs each) and the ratio,
   beside this machine's plain torch tensor-copy bandwidth measured in the same run.
2. Opening a full-size synthetic Q4_K_M Qwen-Image GGUF (60 blocks, width 3072, ~13 GB written to a temporary
   folder and deleted afterwards; skipped with a reason when less than 20 GB are free): wall time and peak RSS of
   a fresh process that opens it (ours, gguf-py) and that builds the model on it with load_diffusion_model.
3. One denoising step of a tiny DiT (K_QUANT_DIT, 1024 image tokens) with Q8_0 and Q4_K weights against the same
   model in bf16 (all computing in bf16), with and without the modulation cache.
4. The gguf-py fallback: one 3072x3072 weight of IQ2_XXS / IQ3_S / TQ1_0 (no torch kernel: gguf-py's numpy code on
   the CPU) dequantized through ``dequantize`` against our torch Q4_K kernel on the same shape.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import gguf  # noqa: E402  (the reference)

from models.io.gguf import dequantize  # noqa: E402
from models.io.gguf.dequant import GGUF_PY_TYPES  # noqa: E402
from models.io.gguf.reader import QUANT_BLOCKS, GGMLType  # noqa: E402

F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0],
              "IQ2_XXS": [0], "IQ3_S": [0], "TQ1_0": [52]}
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
         "F16", "BF16"]
GOAL_TYPES = {"Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"}


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_rows(qtype: str, elements: int, rows: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    block, size = QUANT_BLOCKS[GGMLType[qtype]]
    n = elements // block
    if qtype in ("F16", "BF16"):
        values = torch.from_numpy(rng.standard_normal(elements).astype(np.float32))
        data = values.to(torch.float16 if qtype == "F16" else torch.bfloat16).view(torch.uint8).numpy()
        return data.reshape(rows, -1)
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scales = (rng.standard_normal(n) * 1e-2).astype(np.float16)
        raw[:, offset:offset + 2] = scales.view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1)


def bench_dequant(megabytes: int) -> None:
    elements = megabytes * (1 << 20) // 4
    rows = 4096
    out_gb = elements * 4 / 1e9
    threads = torch.get_num_threads()
    src, dst = torch.randn(elements), torch.empty(elements)
    copy_gbs = 2 * out_gb / best_time(lambda: dst.copy_(src), 5)  # read + write
    clone_gbs = out_gb / best_time(lambda: src.clone(), 5)
    print(f"\n== 1. dequantization, {megabytes} MB of fp32 output per type (GB/s of output, best of 3)")
    print(f"plain torch copy_ (read+write) {copy_gbs:6.2f} GB/s;  clone into fresh memory {clone_gbs:6.2f} GB/s "
          f"({threads} threads)")
    print("ours is timed with torch's default threads and with 1 thread (gguf-py/numpy is single-threaded); on an "
          "oversubscribed machine threaded kernels stall at every op")
    print("'reused' writes into one buffer kept between calls, as the quantized layers do on CPU (fresh memory pays "
          "page faults, which on this machine cost more than the arithmetic)")
    print(f"{'type':8s} {f'ours {threads}T':>9s} {'ours 1T':>8s} {'reused 1T':>10s} {'gguf-py':>8s} {'best/ref':>9s} "
          f"{'reused/ref':>11s} {'best/clone':>11s}  bit-exact")
    for qtype in TYPES:
        data = random_rows(qtype, elements, rows)
        tensor = torch.from_numpy(data)
        shape = (rows, elements // rows)
        ours = best_time(lambda: dequantize(tensor, GGMLType[qtype], shape), 3)
        torch.set_num_threads(1)
        ours_1t = best_time(lambda: dequantize(tensor, GGMLType[qtype], shape), 3)
        buffer = torch.empty(shape)
        reused_1t = best_time(lambda: dequantize(tensor, GGMLType[qtype], shape, out=buffer), 3)
        torch.set_num_threads(threads)
        with np.errstate(all="ignore"):
            ref_time = best_time(lambda: gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]), 2)
            ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
        exact = np.array_equal(dequantize(tensor, GGMLType[qtype], shape).numpy().view(np.uint32),
                               ref.astype(np.float32).view(np.uint32))
        best = min(ours, ours_1t)
        goal = "  (goal >= 10x)" if qtype in GOAL_TYPES else ""
        print(f"{qtype:8s} {out_gb / ours:9.2f} {out_gb / ours_1t:8.2f} {out_gb / reused_1t:10.2f} "
              f"{out_gb / ref_time:8.2f} {ref_time / best:8.1f}x {ref_time / reused_1t:10.1f}x "
              f"{out_gb / best / clone_gbs:10.2f}x  {exact}{goal}")


_OPEN_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
import torch, numpy, gguf
from models.io.gguf import GGUFReader, open_dit_gguf
from models import load_diffusion_model

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS counter: measure from here on
before = status("VmRSS")
start = time.perf_counter()
mode = {mode!r}
if mode == "ours":
    reader = GGUFReader({path!r}); n = len(reader.tensors)
elif mode == "gguf-py":
    reader = gguf.GGUFReader({path!r}); n = len(reader.tensors)
else:
    model = load_diffusion_model({path!r}, dtype=torch.bfloat16); n = sum(1 for _ in model.parameters())
elapsed = time.perf_counter() - start
print(json.dumps({{"seconds": elapsed, "rss_before_mb": before, "rss_after_mb": status("VmRSS"),
                  "peak_mb": status("VmHWM"), "n": n}}))
"""


def bench_open() -> None:
    print("\n== 2. opening a full-size synthetic Q4_K_M Qwen-Image GGUF (fresh process each; RSS from /proc, "
          "peak reset just before opening; 'added' = peak - before)")
    tmp_root = Path(tempfile.gettempdir())
    free = shutil.disk_usage(tmp_root).free
    if free < 20 * 2**30:
        print(f"skipped: only {free / 2**30:.1f} GB free in {tmp_root} (need 20 GB for the ~13 GB file)")
        return
    from tiny_models.gguf_factory import make_full_size_dit_gguf

    folder = Path(tempfile.mkdtemp(prefix="bench_gguf_", dir=tmp_root))
    try:
        start = time.perf_counter()
        path = make_full_size_dit_gguf(folder, "Q4_K_M")
        size = path.stat().st_size
        print(f"wrote {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s ({path.name})")
        print(f"{'what':44s} {'seconds':>8s} {'RSS before':>11s} {'RSS after':>10s} {'peak':>8s} {'added':>8s}")
        for mode, label in [("ours", "models.io.gguf.GGUFReader (header only)"),
                            ("gguf-py", "gguf.GGUFReader"),
                            ("model", "load_diffusion_model(.gguf) -> packed model")]:
            script = _OPEN_SCRIPT.format(repo=str(REPO), path=str(path), mode=mode)
            result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
            r = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"{label:44s} {r['seconds']:8.3f} {r['rss_before_mb']:9.0f}MB {r['rss_after_mb']:8.0f}MB "
                  f"{r['peak_mb']:6.0f}MB {r['peak_mb'] - r['rss_before_mb']:6.0f}MB")
        print("goal: < 1 s and < 300 MB added before any tensor is used (the interpreter + torch are already "
              "counted in 'RSS before').")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_step() -> None:
    from models import load_diffusion_model
    from models.io.gguf.layers import enable_dequant_cache, memory_report
    from tiny_models.factory import make_dit
    from tiny_models.gguf_factory import K_QUANT_DIT, make_dit_gguf

    print("\n== 3. tiny DiT step (K_QUANT_DIT: width 256, 2 blocks; 1024 image + 32 text tokens; bf16 compute)")
    folder = Path(tempfile.mkdtemp(prefix="bench_gguf_step_"))
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, 64, 64, generator=g).bfloat16()
        ctx = torch.randn(1, 32, K_QUANT_DIT["joint_attention_dim"], generator=g).bfloat16()
        t = torch.tensor([0.5])
        models = {"bf16 safetensors": load_diffusion_model(make_dit(folder, dtype="bf16", config=K_QUANT_DIT),
                                                           dtype=torch.bfloat16)}
        for qtype in ("Q8_0", "Q4_K"):
            path = make_dit_gguf(folder, qtype=qtype, config=K_QUANT_DIT)
            models[f"{qtype} gguf"] = load_diffusion_model(path, dtype=torch.bfloat16)
            cached = load_diffusion_model(path, dtype=torch.bfloat16)
            enable_dequant_cache(cached)
            models[f"{qtype} gguf + modulation cache"] = cached
        times = {}
        with torch.no_grad():
            for label, model in models.items():
                model(x, t, ctx)
                times[label] = best_time(lambda m=model: m(x, t, ctx), 5)
        base = times["bf16 safetensors"]
        print(f"{'weights':34s} {'ms/step':>8s} {'vs bf16':>8s} {'cache MB':>9s}")
        for label, seconds in times.items():
            extra = memory_report(models[label]).extra_bytes / 2**20
            print(f"{label:34s} {seconds * 1e3:8.1f} {seconds / base:7.2f}x {extra:9.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_fallback() -> None:
    shape = (3072, 3072)
    threads = torch.get_num_threads()
    print(f"\n== 4. gguf-py fallback vs the torch Q4_K kernel: one {shape[0]}x{shape[1]} weight, ms (best of 3); "
          f"gguf-py/numpy is single-threaded, its chunks are copied out by torch")
    print(f"{'type':8s} {'path':8s} {'fp32 1T':>8s} {'bf16 1T':>8s} {f'bf16 {threads}T':>8s} {'1T vs Q4_K':>11s}")
    base = None
    for qtype in ("Q4_K", "IQ2_XXS", "IQ3_S", "TQ1_0"):
        raw = torch.from_numpy(random_rows(qtype, shape[0] * shape[1], shape[0]))
        bf16 = best_time(lambda: dequantize(raw, GGMLType[qtype], shape, torch.bfloat16), 3)
        torch.set_num_threads(1)
        fp32_1t = best_time(lambda: dequantize(raw, GGMLType[qtype], shape), 3)
        bf16_1t = best_time(lambda: dequantize(raw, GGMLType[qtype], shape, torch.bfloat16), 3)
        torch.set_num_threads(threads)
        base = base or bf16_1t
        path = "gguf-py" if GGMLType[qtype] in GGUF_PY_TYPES else "torch"
        print(f"{qtype:8s} {path:8s} {fp32_1t * 1e3:8.1f} {bf16_1t * 1e3:8.1f} {bf16 * 1e3:8.1f} "
              f"{bf16_1t / base:10.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="MB of fp32 output per dequantized tensor")
    parser.add_argument("--parts", default="1234", help="which parts to run, e.g. 134 to skip the 13 GB file")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, numpy {np.__version__}")
    if "1" in args.parts:
        bench_dequant(args.mb)
    if "2" in args.parts:
        bench_open()
    if "3" in args.parts:
        bench_step()
    if "4" in args.parts:
        bench_fallback()
    return 0


if __name__ == "__main__":
    sys.exit(main())
