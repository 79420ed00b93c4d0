"""Benchmark of the Qwen-Image VAE: time and peak memory of decode / encode, tiled vs untiled, on CPU.

Full-width synthetic weights (``FULL_VAE``: base_dim 96, the real 127 M-parameter topology, random values, fp32)
are written once to a temporary file.  Every case runs in a fresh subprocess so its memory high-water mark is
its own: peak = ``ru_maxrss`` at the end minus the resident size right after loading the weights (and a tiny
warm-up call).  With ``--reference`` the same cases also run through diffusers' ``AutoencoderKLQwenImage``
(its own tiling: 256 px tiles, 192 px stride) on the same weights, and the table shows our/reference ratios.

    python bench/bench_vae.py [--sizes 1328 2048] [--reference] [--skip decode-2048-untiled ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tools")]

MB = 1024 * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(weights: Path, diffusers_folder: Path, impl: str, op: str, size: int, tiled: bool) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    torch.manual_seed(0)
    latents = torch.randn(1, 16, size // 8, size // 8)
    images = torch.rand(1, size, size, 3)
    if impl == "ours":
        from models import load_vae

        vae = load_vae(weights, dtype=torch.float32)
        vae.decode(torch.zeros(1, 16, 4, 4))  # warm-up: allocator and oneDNN state
        encode = lambda: vae.encode(images, tiled=tiled)  # noqa: E731
        decode = lambda: vae.decode(latents, tiled=tiled)  # noqa: E731
    else:
        from diffusers import AutoencoderKLQwenImage

        vae = AutoencoderKLQwenImage.from_pretrained(diffusers_folder).eval()
        if tiled:
            vae.enable_tiling()
        with torch.no_grad():
            vae.decode(torch.zeros(1, 16, 1, 4, 4))
        pixels = images.permute(0, 3, 1, 2).unsqueeze(2) * 2 - 1

        def encode():
            with torch.no_grad():
                return vae.encode(pixels).latent_dist.mode()

        def decode():
            with torch.no_grad():
                return vae.decode(latents.unsqueeze(2)).sample
    baseline = _rss_bytes()
    start = time.perf_counter()
    out = encode() if op == "encode" else decode()
    seconds = time.perf_counter() - start
    peak = _max_rss_bytes() - baseline
    return {"impl": impl, "op": op, "size": size, "tiled": tiled, "seconds": seconds, "peak_mb": peak / MB,
            "baseline_mb": baseline / MB, "out_shape": list(out.shape)}


def _spawn(weights: Path, diffusers_folder: Path, impl: str, op: str, size: int, tiled: bool) -> dict:
    cmd = [sys.executable, __file__, "--case", impl, op, str(size), "tiled" if tiled else "untiled",
           "--weights", str(weights), "--diffusers", str(diffusers_folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"impl": impl, "op": op, "size": size, "tiled": tiled, "error": done.stderr.strip()[-300:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1328, 2048])
    parser.add_argument("--reference", action="store_true", help="also run diffusers on the same weights")
    parser.add_argument("--skip", nargs="*", default=[], help="cases to skip, e.g. decode-2048-untiled")
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--diffusers", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        impl, op, size, mode = args.case
        print(json.dumps(run_case(args.weights, args.diffusers, impl, op, int(size), mode == "tiled")))
        return

    from tiny_models.configs import FULL_VAE
    from tiny_models.factory import make_vae

    cases = [("decode", size) for size in args.sizes] + [("encode", max(args.sizes))]
    with tempfile.TemporaryDirectory() as tmp:
        weights = make_vae(tmp, layout="comfy", dtype="fp32", config=FULL_VAE)
        folder = make_vae(tmp, layout="diffusers", dtype="fp32", config=FULL_VAE) if args.reference else Path(tmp)
        weights_mb = weights.stat().st_size / MB
        print(f"VAE weights: {weights_mb:.0f} MB fp32 (base_dim {FULL_VAE['base_dim']}), CPU, "
              f"one image per call; peak = RSS high-water above the RSS after loading\n")
        header = f"{'case':<24}{'impl':<11}{'time s':>9}{'peak MB':>10}{'x ref time':>12}{'x ref peak':>12}"
        print(header)
        print("-" * len(header))
        for op, size in cases:
            for tiled in (False, True):
                name = f"{op}-{size}-{'tiled' if tiled else 'untiled'}"
                if name in args.skip:
                    print(f"{name:<24}{'ours':<11}{'skipped':>9}")
                    continue
                rows = [_spawn(weights, folder, "ours", op, size, tiled)]
                if args.reference:
                    rows.append(_spawn(weights, folder, "diffusers", op, size, tiled))
                for row in rows:
                    if "error" in row:
                        print(f"{name:<24}{row['impl']:<11}  failed: {row['error']}")
                        continue
                    ratio = ""
                    ref = rows[-1] if len(rows) == 2 and "error" not in rows[-1] else None
                    if ref is not None and row is rows[0]:
                        ratio = f"{row['seconds'] / ref['seconds']:>12.2f}{row['peak_mb'] / max(ref['peak_mb'], 1):>12.2f}"
                    print(f"{name:<24}{row['impl']:<11}{row['seconds']:>9.1f}{row['peak_mb']:>10.0f}{ratio}",
                          flush=True)


if __name__ == "__main__":
    main()
