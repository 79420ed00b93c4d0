"""GGUF benchmarks: dequantization throughput vs gguf-py, opening a full-size file, DiT steps vs bf16.

Run from the repository root with the project venv's python::

    python bench/bench_gguf.py [--mb 64] [--types Q8_0,Q4_K] [--parts 1345] [--reps 5] [--fw-blocks 1] [--loaded]

1. Dequantization: for each type (``--types``), the same random valid blocks (``--mb`` MB of fp32 output) decoded
   by ours (torch, ONE thread) and by gguf-py (numpy) in this process; process CPU time (best of ``--reps``; wall
   time beside: it swings several-fold on a shared machine), the ratios, and the load average per row.  Goals: into
   a reused buffer >= 8x gguf-py for Q8_0 and >= 4x for every K-quant.
2. Opening a full-size synthetic Q4_K_M Qwen-Image GGUF (60 blocks, width 3072, ~13 GB written to a temporary
   folder and deleted afterwards; skipped with a reason when less than 20 GB are free): wall time and peak RSS of
   a fresh process that opens it (ours, gguf-py) and that builds the model on it with load_diffusion_model.
3. One denoising step of a tiny DiT (K_QUANT_DIT: width 256, 2 blocks, 1024 image tokens) with Q8_0 and Q4_K
   weights against the same model in bf16 (all computing in bf16), with the one-vector cache (modulations,
   timestep MLP) on (the default) and off.  The goal figure is process CPU time on ONE torch thread (the work
   done: steady on a shared machine); wall time with all torch threads is printed beside it.  Goal: <= 1.1x with
   the cache on.
4. The gguf-py fallback: one 3072x3072 weight of IQ2_XXS / IQ3_S / TQ1_0 (no torch kernel: gguf-py's numpy code on
   the CPU) dequantized through ``dequantize`` against our torch Q4_K kernel on the same shape.
5. Full width: one step of a width-3072 DiT (``--fw-blocks`` blocks, 1024x1024 = 4096 image tokens + 128 text
   tokens, bf16 compute) with synthetic ``--fw-types`` weights (block Linears; the usual high-precision layers in
   BF16) against the bf16 model of the same values; process CPU time on ONE torch thread, wall time beside.
   Goal: Q8_0 and Q4_K <= 1.15x.

Steps alternate the models compared, one step each, and keep each model's best time, so a change of the
machine's load hits both sides of a ratio.  ``--loaded`` runs the step parts (3, 5) a second time while another
process busy-loops (started and stopped by this script, by its pid): the goal there is <= 1.5x for the same
figures.  ``--busy N`` runs N busy-looping processes during the whole run instead.  The load average is printed
with every table, and a summary of every goal figure (met or not) ends the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
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
from models.io.gguf.dequant import GGUF_PY_TYPES, Workspace  # noqa: E402
from models.io.gguf.reader import QUANT_BLOCKS, GGMLType  # noqa: E402

F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0],
              "IQ2_XXS": [0], "IQ3_S": [0], "TQ1_0": [52]}
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
         "F16", "BF16"]
GOALS = {"Q8_0": 8.0, "Q2_K": 4.0, "Q3_K": 4.0, "Q4_K": 4.0, "Q5_K": 4.0, "Q6_K": 4.0}  # reused vs gguf-py
SUMMARY: list[tuple[str, str, str, bool, str]] = []  # (figure, value, goal, met, load) for the closing table
LOADED = ""  # " (loaded)" while the --loaded pass runs


def verdict(figure: str, value: float, goal: float, higher_is_better: bool = False) -> str:
    """Record one goal figure for the summary; returns ' met' / ' NOT MET'."""
    met = value >= goal if higher_is_better else value <= goal
    SUMMARY.append((figure + LOADED, f"{value:.2f}x", f"{'>=' if higher_is_better else '<='} {goal:g}x", met,
                    load()[13:]))
    return " met" if met else " NOT MET"


@contextlib.contextmanager
def torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def load() -> str:
    with open("/proc/loadavg") as f:
        return "load average " + " ".join(f.read().split()[:3])


def interleaved_best(steps: dict, reps: int, clock=time.perf_counter, warmup: bool = True) -> dict[str, float]:
    """Best time (``clock``: wall by default, ``time.process_time`` for CPU time) of each callable over ``reps``
    rounds, one call of each per round (after one warm-up round)."""
    if warmup:
        for step in steps.values():
            step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(reps):
        for label, step in steps.items():
            start = clock()
            step()
            best[label] = min(best[label], clock() - start)
    return best


def interleaved_cpu_wall(steps: dict, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Best process CPU time and best wall time of each callable, ``reps`` interleaved rounds after a warm-up."""
    for step in steps.values():
        step()
    cpu = dict.fromkeys(steps, float("inf"))
    wall = dict.fromkeys(steps, float("inf"))
    for _ in range(reps):
        for label, step in steps.items():
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            c1, w1 = time.process_time(), time.perf_counter()
            cpu[label], wall[label] = min(cpu[label], c1 - c0), min(wall[label], w1 - w0)
    return cpu, wall


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


def cpu_best(fn, reps: int) -> tuple[float, float]:
    """Best process CPU time and best wall time of ``reps`` calls (CPU time: steady on a shared, loaded machine,
    where wall time swings several-fold; with one torch thread the two agree on an idle one)."""
    cpu = wall = float("inf")
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        c1, w1 = time.process_time(), time.perf_counter()
        cpu, wall = min(cpu, c1 - c0), min(wall, w1 - w0)
    return cpu, wall


def bench_dequant(megabytes: float, types: list[str], reps: int = 5) -> None:
    elements = int(megabytes * (1 << 20)) // 4 // (1 << 12) * (1 << 12)
    rows = 16 if elements < (1 << 20) else 4096
    out_gb = elements * 4 / 1e9
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, like gguf-py (numpy), so that process CPU time compares the work done
    try:
        src, dst = torch.randn(elements), torch.empty(elements)
        copy_cpu, _ = cpu_best(lambda: dst.copy_(src), reps)
        print(f"\n== 1. dequantization, {elements * 4 / 2**20:.1f} MB of fp32 output per type, ONE torch thread; "
              f"times are process CPU ms (best of {reps}), wall ms beside; {load()}")
        print(f"plain torch copy_ of the output size (read+write): {copy_cpu * 1e3:.2f} ms CPU, "
              f"{2 * out_gb / max(copy_cpu, 1e-9):.2f} GB/s")
        print("'fresh' allocates the result as gguf-py does; 'reused' writes into one buffer with one workspace kept "
              "between calls, as the quantized layers do; ratios = gguf-py time / ours (CPU time; wall in brackets)")
        print("'bf16' writes the compute dtype the layers use (half the output traffic; not the goal figure)")
        print(f"{'type':8s} {'reused':>8s} {'fresh':>8s} {'gguf-py':>8s} {'reused/ref':>11s} {'fresh/ref':>10s} "
              f"{'bf16/ref':>9s} {'wall: reused':>13s} {'fresh':>7s} {'gguf-py':>8s} {'reused/ref':>11s} {'goal':>6s}"
              "  bit-exact  load")
        for qtype in types:
            data = random_rows(qtype, elements, rows)
            tensor = torch.from_numpy(data)
            shape = (rows, elements // rows)
            buffer, workspace = torch.empty(shape), Workspace()
            half = torch.empty(shape, dtype=torch.bfloat16)
            fresh = cpu_best(lambda: dequantize(tensor, GGMLType[qtype], shape), reps)
            reused = cpu_best(lambda: dequantize(tensor, GGMLType[qtype], shape, out=buffer, workspace=workspace),
                              reps)
            reused_bf16 = cpu_best(lambda: dequantize(tensor, GGMLType[qtype], shape, torch.bfloat16, out=half,
                                                      workspace=workspace), reps)
            with np.errstate(all="ignore"):
                ref_time = cpu_best(lambda: gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]),
                                    max(3, reps // 2))
                ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
            exact = np.array_equal(dequantize(tensor, GGMLType[qtype], shape).numpy().view(np.uint32),
                                   ref.astype(np.float32).view(np.uint32))
            goal = f">={GOALS[qtype]:.0f}x" if qtype in GOALS else ""
            met = "" if qtype not in GOALS else verdict(
                f"1. dequant {qtype} into a reused buffer vs gguf-py ({elements * 4 / 2**20:.0f} MB, 1 thread, CPU)",
                ref_time[0] / reused[0], GOALS[qtype], higher_is_better=True)
            print(f"{qtype:8s} {reused[0] * 1e3:8.2f} {fresh[0] * 1e3:8.2f} {ref_time[0] * 1e3:8.2f} "
                  f"{ref_time[0] / reused[0]:10.1f}x {ref_time[0] / fresh[0]:9.1f}x "
                  f"{ref_time[0] / reused_bf16[0]:8.1f}x {reused[1] * 1e3:13.2f} {fresh[1] * 1e3:7.2f} {ref_time[1] * 1e3:8.2f} "
                  f"{ref_time[1] / reused[1]:10.1f}x {goal:>6s}  {str(exact):5s}{met:8s} {load()[13:]}", flush=True)
        print(f"({load()})")
    finally:
        torch.set_num_threads(threads)


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


def bench_step(reps: int) -> None:
    from models import load_diffusion_model
    from models.io.gguf.layers import enable_dequant_cache, memory_report
    from tiny_models.factory import make_dit
    from tiny_models.gguf_factory import K_QUANT_DIT, make_dit_gguf

    threads = torch.get_num_threads()
    print(f"\n== 3. tiny DiT step{LOADED} (K_QUANT_DIT: width 256, 2 blocks; 1024 image + 32 text tokens; bf16 "
          f"compute); process CPU ms on ONE torch thread (the goal figure; best of {reps} interleaved rounds) and wall "
          f"ms on {threads} threads (best of {3 * reps}); {load()}")
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
            models[f"{qtype} gguf (one-vector cache on: default)"] = load_diffusion_model(path, dtype=torch.bfloat16)
            off = load_diffusion_model(path, dtype=torch.bfloat16)
            enable_dequant_cache(off, enabled=False)
            models[f"{qtype} gguf, one-vector cache off"] = off
        steps = {label: (lambda m=model: m(x, t, ctx)) for label, model in models.items()}
        with torch.no_grad():
            with torch_threads(1):
                cpu, wall_1t = interleaved_cpu_wall(steps, reps)
            wall = interleaved_best(steps, 3 * reps)  # wall time swings more: more rounds for its best
        base, base_wall = cpu["bf16 safetensors"], wall["bf16 safetensors"]
        print(f"{'weights':42s} {'CPU ms 1T':>10s} {'vs bf16':>8s} {'wall ms 1T':>11s} {f'wall ms {threads}T':>11s} "
              f"{'vs bf16':>8s} {'cache MB':>9s}  goal (1T CPU)")
        for label in models:
            extra = memory_report(models[label]).extra_bytes / 2**20
            ratio = cpu[label] / base
            goal = ""
            if "default" in label:
                bound = 1.5 if LOADED else 1.1
                goal = f"<= {bound}x" + verdict(f"3. tiny step {label.split()[0]} (1 thread, CPU)", ratio, bound)
            print(f"{label:42s} {cpu[label] * 1e3:10.1f} {ratio:7.3f}x {wall_1t[label] * 1e3:11.1f} "
                  f"{wall[label] * 1e3:11.1f} {wall[label] / base_wall:7.3f}x {extra:9.2f}  {goal}")
        print(f"goal: <= 1.1x with the cache on by default (<= 1.5x on a loaded machine); {load()}")
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


def valid_blocks(qtype: str, shape: tuple[int, ...], rms: float, seed: int) -> np.ndarray:
    """Random valid ``qtype`` bytes for a tensor of ``shape`` whose values have about the given RMS: a pattern of
    at most ~4 MB of blocks, tiled (the values do not matter for timing; sane ones keep activations finite)."""
    block, size = QUANT_BLOCKS[GGMLType[qtype]]
    n_blocks = math.prod(shape) // block
    count = min(n_blocks, (4 << 20) // size)
    pattern = random_rows(qtype, count * block, 1).reshape(count, size)
    sample = dequantize(torch.from_numpy(pattern), GGMLType[qtype], (count * block,))
    factor = rms / max(float(sample.pow(2).mean().sqrt()), 1e-30)
    for offset in F16_FIELDS[qtype]:  # every value is linear in the block's fp16 scale fields
        fields = pattern[:, offset:offset + 2].copy().view(np.float16)
        pattern[:, offset:offset + 2] = (fields.astype(np.float32) * factor).astype(np.float16).view(np.uint8)
    return np.tile(pattern.reshape(-1), -(-n_blocks // count))[:n_blocks * size]


def bench_full_width(blocks: int, reps: int, types: list[str]) -> None:
    from bench_dit import step_inputs, write_synthetic_gguf
    from models import load_diffusion_model
    from models.io.gguf import load_gguf_state_dict
    from models.io.gguf.layers import memory_report
    from models.io.gguf.quantize import fitting_type
    from models.qwen_image.dit_loader import dit_from_tensors

    print(f"\n== 5. full-width DiT step{LOADED} (width 3072, {blocks} block(s), 4096 image + 128 text tokens, bf16 "
          f"compute); process CPU s on ONE torch thread (the goal figure), wall s of the same steps beside, best of "
          f"{reps} interleaved rounds; {load()}")
    folder = Path(tempfile.mkdtemp(prefix="bench_gguf_full_"))
    inputs = step_inputs((128, 128), 128, torch.bfloat16, "cpu")
    rows = []
    try:
        reference = None
        for qtype in types:
            def tensor_type(name: str, shape: tuple[int, ...], q=GGMLType[qtype]) -> GGMLType:
                if len(shape) == 1:
                    return GGMLType.F32
                return fitting_type(q, shape) if name.startswith("transformer_blocks.") else GGMLType.BF16

            path = write_synthetic_gguf(folder / f"full-{qtype}.gguf", blocks, tensor_type)
            if reference is None:  # the bf16 model of the same values (those of the first file)
                reference = dit_from_tensors(load_gguf_state_dict(path, dtype=torch.bfloat16), dtype=torch.bfloat16)
            model = load_diffusion_model(path, dtype=torch.bfloat16)
            with torch.no_grad(), torch_threads(1):
                cpu, wall = interleaved_cpu_wall({"bf16": lambda: reference(*inputs),
                                                  qtype: lambda: model(*inputs)}, reps)
            cache = memory_report(model).dequant_cache_bytes / 2**20
            rows.append((qtype, cpu["bf16"], cpu[qtype], wall["bf16"], wall[qtype], cache))
            print(f"  {qtype}: bf16 {cpu['bf16']:.2f} s, gguf {cpu[qtype]:.2f} s CPU, {cpu[qtype] / cpu['bf16']:.3f}x "
                  f"({load()})", flush=True)
            del model
            path.unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    bound = 1.5 if LOADED else 1.15
    print(f"{'weights':8s} {'bf16 CPU s':>10s} {'gguf CPU s':>10s} {'vs bf16':>8s} {'bf16 wall':>10s} "
          f"{'gguf wall':>10s} {'vs bf16':>8s} {'cache MB':>9s}  goal (1T CPU)")
    for qtype, bf16, seconds, bf16_wall, wall_s, cache in rows:
        ratio = seconds / bf16
        goal = f"<= {bound}x" + verdict(f"5. full-width step {qtype}, {blocks} block(s) (1 thread, CPU)", ratio,
                                        bound) if qtype in ("Q8_0", "Q4_K") else ""
        print(f"{qtype:8s} {bf16:10.2f} {seconds:10.2f} {ratio:7.3f}x {bf16_wall:10.2f} {wall_s:10.2f} "
              f"{wall_s / bf16_wall:7.3f}x {cache:9.1f}  {goal}")
    print(f"goal: Q8_0 and Q4_K <= 1.15x (<= 1.5x on a loaded machine); {load()}")


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` processes spinning on a core each while the benchmarks run (a loaded machine); each is stopped by
    its pid at the end."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        if procs:
            time.sleep(1.0)
            print(f"\n{count} busy process(es) running (pid {', '.join(str(p.pid) for p in procs)}): {load()}")
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def print_summary() -> None:
    if not SUMMARY:
        return
    width = max(len(figure) for figure, *_ in SUMMARY)
    print(f"\n== summary: every goal figure of this run ({os.cpu_count()} CPUs; load average 1 / 5 / 15 min "
          f"when it was measured)")
    print(f"{'figure':{width}s} {'value':>8s} {'goal':>9s}  {'verdict':8s} load")
    for figure, value, goal, met, when in SUMMARY:
        print(f"{figure:{width}s} {value:>8s} {goal:>9s}  {'met' if met else 'NOT MET':8s} {when}")
    missed = sum(not met for *_, met, _ in SUMMARY)
    print(f"{len(SUMMARY) - missed} of {len(SUMMARY)} goal figures met" + (f", {missed} NOT MET" if missed else ""))


def main() -> int:
    global LOADED
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=64, help="MB of fp32 output per dequantized tensor (part 1)")
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated types of part 1, e.g. Q8_0,Q4_K")
    parser.add_argument("--parts", default="1234", help="which parts to run, e.g. 135 (2 writes a 13 GB file, 5 takes "
                        "minutes)")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (best of) in parts 1 and 3")
    parser.add_argument("--fw-blocks", type=int, default=1, help="blocks of the full-width DiT (part 5)")
    parser.add_argument("--fw-reps", type=int, default=2, help="timed rounds per model in part 5")
    parser.add_argument("--fw-types", default="Q8_0,Q4_K", help="weight types of part 5, e.g. Q8_0,Q4_K,Q5_K,Q6_K")
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes to run during the whole run")
    parser.add_argument("--loaded", action="store_true", help="run the step parts (3, 5) again with one "
                        "busy-looping process (goal <= 1.5x)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads; {load()}")
    fw_types = [t.strip() for t in args.fw_types.split(",") if t.strip()]
    with busy_processes(args.busy):
        if "1" in args.parts:
            bench_dequant(args.mb, [t.strip() for t in args.types.split(",") if t.strip()], args.reps)
        if "2" in args.parts:
            bench_open()
        if "3" in args.parts:
            bench_step(args.reps)
        if "4" in args.parts:
            bench_fallback()
        if "5" in args.parts:
            bench_full_width(args.fw_blocks, args.fw_reps, fw_types)
        if args.loaded and ("3" in args.parts or "5" in args.parts):
            LOADED = " (loaded)"
            with busy_processes(1):
                if "3" in args.parts:
                    bench_step(args.reps)
                if "5" in args.parts:
                    bench_full_width(args.fw_blocks, args.fw_reps, fw_types)
            LOADED = ""
    print_summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
