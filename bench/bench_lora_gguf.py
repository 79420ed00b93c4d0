"""LoRA on GGUF weights through the host: step time and memory with 0, 1 and 2 LoRAs, ratios against no LoRA.

Run from the repository root with the project venv's python::

    python bench/bench_lora_gguf.py [--sizes tiny,full] [--qtypes Q8_0,Q4_K] [--reps 20] [--full-reps 3]
                                    [--full-tokens 4096]

For each size and GGUF type, one fresh process imports the host (ComfyUI) and the pack and builds one model per
configuration from the same file (host layers, our ModelPatcher, bf16 compute, CPU): no LoRA, one LoRA, two
stacked LoRAs (rank 16 on every Linear of the DiT incl. the modulations, like a Lightning LoRA; lightx2v and
diffusers layouts, applied with the pack's LoRA node) and one LoKr of the same coverage (the general path: the
host's own rule at each dequantization).  Plain LoRAs are merged into the dequantized weight or bypassed
(``out += scale * (x @ down.T) @ up.T``), whichever costs less for the call's rows (see nodes/host/ops.py).

* ``tiny``: K_QUANT_DIT (width 256, 2 blocks; every block Linear really in the type), 1024 image + 32 text tokens.
* ``full``: width 3072, 1 block of synthetic weights (block Linears in the type, the usual high-precision layers in
  BF16), ``--full-tokens`` image tokens (4096: a 1024x1024 image) + 128 text tokens.

Columns: best step time over the rounds (steps alternate between the configurations, one each per round, so a
change of the machine's load hits every column) and its ratio to no LoRA; memory above the same model without
LoRA: RSS (after one step; glibc told to return freed blocks at once), what the GGUF layers hold (patch tensors
moved / cast to the device and dtype: none here, the LoRAs are bf16 like the compute; the one-vector dense cache,
which a patched layer fills with its patched weight), the growth of ``model_size()`` (what the host plans with),
the LoRA's own bytes (the host holds those in any case), and what the previous design held on top (a dense copy
of every patched weight: bf16 on GPUs, shown; fp32 on the CPU, twice that).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

CONFIGS = {"no LoRA": (), "1 LoRA": ("a",), "2 LoRAs": ("a", "b"), "1 LoKr": ("k",)}
RANK = 16
TOP_LEVEL = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2")


def rss() -> int:
    gc.collect()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def load() -> str:
    with open("/proc/loadavg") as f:
        return "load average " + " ".join(f.read().split()[:3])


def _host(comfy_dir: str):
    """Import the host (CPU) and the pack as ``qip``."""
    import importlib.util

    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths  # noqa: F401  (the pack checks that it runs inside a host)

    spec = importlib.util.spec_from_file_location("qip", str(REPO / "__init__.py"),
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["qip"] = pack
    spec.loader.exec_module(pack)


def _files(folder: Path, size: str, qtype: str, full_tokens: int) -> tuple[Path, dict[str, Path], tuple]:
    """The GGUF DiT, the LoRA files and the step inputs."""
    import torch

    from tiny_models.loras import dit_modules, write_lora

    if size == "tiny":
        from tiny_models.gguf_factory import K_QUANT_DIT, make_dit_gguf

        config = K_QUANT_DIT
        path = make_dit_gguf(folder, qtype=qtype, config=config)
        g = torch.Generator().manual_seed(0)
        inputs = (torch.randn(1, 16, 1, 64, 64, generator=g), torch.randn(1, 32, config["joint_attention_dim"],
                                                                          generator=g))
    else:
        from bench_dit import write_synthetic_gguf
        from models.io.gguf.quantize import fitting_type
        from models.io.gguf.reader import GGMLType
        from tiny_models.configs import FULL_DIT

        def tensor_type(name: str, shape: tuple[int, ...]) -> GGMLType:
            if len(shape) == 1:
                return GGMLType.F32
            return fitting_type(GGMLType[qtype], shape) if name.startswith("transformer_blocks.") else GGMLType.BF16

        config = {**FULL_DIT, "num_layers": 1}
        path = write_synthetic_gguf(folder / f"full-{qtype}.gguf", 1, tensor_type)
        side = 2 * round(full_tokens ** 0.5)  # latent side: 2x2 latent pixels per token
        g = torch.Generator().manual_seed(0)
        inputs = (torch.randn(1, 16, 1, side, side, generator=g),
                  torch.randn(1, 128, config["joint_attention_dim"], generator=g))
    modules = dit_modules(config, modulation=True, top_level=TOP_LEVEL)
    loras = {"a": write_lora(folder / "a.safetensors", layout="lightx2v", rank=RANK, alpha=RANK, modules=modules,
                             config=config, seed=1),
             "b": write_lora(folder / "b.safetensors", layout="diffusers", rank=RANK, modules=modules, config=config,
                             seed=2),
             "k": write_lora(folder / "k.safetensors", layout="lycoris", kind="lokr", rank=RANK, alpha=RANK,
                             modules=modules, config=config, seed=3)}
    return path, loras, inputs


def worker(size: str, qtype: str, reps: int, full_tokens: int, threads: int) -> dict:
    """One process: every configuration's model, its memory, then the interleaved step times."""
    import torch

    _host(os.environ["COMFYUI_DIR"])
    torch.set_num_threads(threads)
    import folder_paths
    from qip.models import QuantizedTensor, load_diffusion_model
    from qip.nodes.host.model import HostQwenImageDiT, wrap_diffusion_model
    from qip.nodes.host.ops import HostGGUFOps, HostPatchable
    from qip.nodes.lora import LoraLoader

    cpu = torch.device("cpu")
    sigma = torch.tensor([0.6])
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_lora_gguf_") as tmp:
        path, loras, (x, context) = _files(Path(tmp), size, qtype, full_tokens)
        folder_paths.add_model_folder_path("loras", tmp, is_default=True)

        def step(model) -> None:
            with torch.no_grad():
                model.model.apply_model(x, sigma, c_crossattn=context)

        def build(chain: tuple[str, ...]) -> tuple:
            """A fresh model from the file, loaded and run once without LoRA; the RSS then; the patched model,
            loaded and run once."""
            dit = load_diffusion_model(str(path), dtype=torch.bfloat16, ops=HostGGUFOps, model_class=HostQwenImageDiT)
            plain = wrap_diffusion_model(dit, torch.bfloat16, None)
            plain.load(cpu, full_load=True)
            step(plain)
            before = rss()
            plain.unpatch_model(cpu)
            model = plain
            for name in chain:
                model = LoraLoader().load(model, loras[name].name, 1.0, 0.0)["result"][0]
            model.load(cpu, full_load=True)
            step(model)
            return dit, plain, model, before

        for chain in (("a",), ("k",)):  # warm-up: one-time costs (imports, kernels) out of the measurements
            build(chain)
        steps = {}
        for label, chain in CONFIGS.items():
            dit, plain, model, before = build(chain)
            steps[label] = lambda model=model: step(model)
            layers = [(n, m) for n, m in dit.named_modules() if isinstance(m, HostPatchable)]
            results[label] = {
                "rss": rss() - before,
                "held": sum(m.patch_held_bytes() for _, m in layers),
                "cache": sum(m.cached_bytes() for _, m in layers),
                "planned": model.model_size() - plain.model_size(),
                "lora_file": sum(loras[name].stat().st_size for name in chain),
                "old": sum(m.weight.logical_shape.numel() * 2 for n, m in layers
                           if f"diffusion_model.{n}.weight" in model.patches and isinstance(m.weight, QuantizedTensor)),
                "packed": plain.model_size() - plain.gguf_cache_bytes(),
            }
        for label in steps:
            results[label]["seconds"] = results[label]["cpu"] = float("inf")
        for _ in range(reps):  # one step of each configuration per round; the best of each
            for label, run_step in steps.items():
                wall, cpu = time.perf_counter(), time.process_time()
                run_step()
                r = results[label]
                r["seconds"] = min(r["seconds"], time.perf_counter() - wall)
                r["cpu"] = min(r["cpu"], time.process_time() - cpu)
    return results


def run(size: str, qtype: str, reps: int, full_tokens: int, threads: int) -> dict:
    from env import comfyui_path

    env = dict(os.environ, COMFYUI_DIR=str(comfyui_path()), MALLOC_MMAP_THRESHOLD_=str(64 << 10))
    result = subprocess.run([sys.executable, __file__, "--worker", size, qtype, "--reps", str(reps),
                             "--full-tokens", str(full_tokens), "--threads", str(threads)],
                            cwd=comfyui_path(), env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{size} {qtype} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(size: str, qtype: str, results: dict) -> None:
    mb = 2 ** 20
    base = results["no LoRA"]
    print(f"\n{size} {qtype}: packed model {base['packed'] / mb:.1f} MB ({load()})")
    print(f"{'LoRAs':8s} {'cpu s':>8s} {'vs none':>8s} {'wall s':>8s} {'vs none':>8s} {'RSS +MB':>8s} {'held MB':>8s} "
          f"{'cache MB':>9s} {'size +MB':>9s} {'size +%':>8s} {'LoRA MB':>8s} {'old MB':>8s}")
    for label, r in results.items():
        print(f"{label:8s} {r['cpu']:8.3f} {r['cpu'] / base['cpu']:7.3f}x {r['seconds']:8.3f} "
              f"{r['seconds'] / base['seconds']:7.3f}x {r['rss'] / mb:8.1f} "
              f"{r['held'] / mb:8.2f} {r['cache'] / mb:9.2f} {r['planned'] / mb:9.2f} "
              f"{100 * r['planned'] / r['packed']:7.2f}% {r['lora_file'] / mb:8.2f} {r['old'] / mb:8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,full")
    parser.add_argument("--qtypes", default="Q8_0,Q4_K")
    parser.add_argument("--reps", type=int, default=20, help="timed rounds of the tiny model (one step of each "
                        "configuration each)")
    parser.add_argument("--full-reps", type=int, default=3, help="timed rounds of the full-width model")
    parser.add_argument("--full-tokens", type=int, default=4096, help="image tokens of the full-width step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU time of a step is its "
                        "work, whatever else runs on the machine)")
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "QTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.reps, args.full_tokens, args.threads)))
        return 0
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} torch thread(s), bf16 compute on the "
          f"CPU; {args.reps} rounds (tiny), {args.full_reps} (full width: {args.full_tokens} image tokens); {load()}")
    for size in args.sizes.split(","):
        for qtype in args.qtypes.split(","):
            start = time.perf_counter()
            results = run(size, qtype, args.reps if size == "tiny" else args.full_reps, args.full_tokens,
                          args.threads)
            report(size, qtype, results)
            print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
