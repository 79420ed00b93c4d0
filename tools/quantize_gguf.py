"""Quantize a Qwen-Image DiT (safetensors) to GGUF with the usual Qwen-Image rules.

Usage: python tools/quantize_gguf.py INPUT [OUTPUT.gguf] [--preset Q4_K_M] [--device cpu|cuda]

INPUT: a Comfy-Org single file (optionally prefixed ``model.diffusion_model.``, bf16 / fp16 / fp32 / fp8, scaled
fp8 multiplied out), a diffusers ``transformer`` folder, or a pipeline folder holding one.  OUTPUT defaults to
``qwen-image-<PRESET>.gguf`` next to INPUT.  Rules (:func:`models.io.gguf.quantize.dit_tensor_type`): img_in,
txt_in, time_text_embed, norm_out, proj_out in BF16, 1-D tensors in F32, blocks 0 and last, V projections
and FFN-down one level higher; rows that do not fit a K format fall back to a legacy one.  Tensors are read,
quantized and written one at a time (memory stays near one tensor); the file appears atomically when done.
Presets: Q8_0 Q6_K Q5_K_M Q5_K_S Q4_K_M Q4_K_S Q5_1 Q5_0 Q4_1 Q4_0 F16 BF16.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from models.io.gguf.quantize import DIT_PRESETS, dit_tensor_type, quantize  # noqa: E402  (repository root needed)
from models.io.gguf.reader import GGMLType  # noqa: E402
from models.io.gguf.writer import GGUFWriter  # noqa: E402
from models.io.weights import WeightFileError, open_checkpoint  # noqa: E402
from models.registry import COMFY_DIT_PREFIX as PREFIX, ZERO_COND_MARKER  # noqa: E402

SKIPPED = ("scaled_fp8",)
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


def quantize_dit(source: Path, output: Path, preset: str = "Q4_K_M", device: str = "cpu",
                 log=print) -> Path:
    """Write ``output`` (GGUF, arch ``qwen_image``) from the DiT checkpoint at ``source``; returns the path."""
    if source.is_dir() and not any(source.glob("*.safetensors")) and (source / "transformer").is_dir():
        source = source / "transformer"
    checkpoint = open_checkpoint(source)
    keys = list(checkpoint)
    prefix = PREFIX if any(k.startswith(PREFIX) for k in keys) else ""
    names = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    if "img_in.weight" not in names or "transformer_blocks.0.img_mod.1.weight" not in names:
        raise WeightFileError(f"{source}: not a Qwen-Image DiT (no img_in / transformer_blocks.0.img_mod.1).")
    depth = 1 + max(int(m.group(1)) for n in names if (m := _BLOCK.match(n)))
    writer = GGUFWriter(output, "qwen_image")
    writer.add("general.name", f"Qwen-Image {preset}")
    writer.add("general.quantization_version", 2)
    writer.add("qwen_image.quantization_preset", preset)
    plan = [n for n in names if n not in SKIPPED and not n.endswith((".scale_weight", ".scale_input"))]
    start = time.perf_counter()

    def load(index: int, name: str, ggml: GGMLType):
        def produce() -> torch.Tensor:
            tensor = checkpoint[names[name]].to(device=device, dtype=torch.float32)
            scale = names.get(name.removesuffix(".weight") + ".scale_weight")
            if name.endswith(".weight") and scale is not None:
                tensor = tensor * checkpoint[scale].to(device=device, dtype=torch.float32)
            raw = quantize(tensor, ggml).cpu()
            log(f"[{index + 1:4d}/{len(plan)}] {name:60s} {str(list(tensor.shape)):>14s} -> {ggml.name:5s} "
                f"({time.perf_counter() - start:6.1f} s)")
            return raw
        return produce

    for index, name in enumerate(plan):
        shape = checkpoint.shape(names[name])
        if name == ZERO_COND_MARKER:  # the Edit-2511 flag: GGUF cannot store an empty tensor, keep one zero
            writer.add_tensor(name, torch.zeros(1).view(torch.uint8), GGMLType.F32, (1,))
            continue
        ggml = dit_tensor_type(name, tuple(shape), preset, depth)
        writer.add_tensor(name, load(index, name, ggml), ggml, shape)
    path = writer.write()
    log(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="safetensors file, diffusers transformer or pipeline folder")
    parser.add_argument("output", type=Path, nargs="?", help="output .gguf (default: next to the input)")
    parser.add_argument("--preset", default="Q4_K_M", choices=list(DIT_PRESETS))
    parser.add_argument("--device", default="cpu", help="where to quantize (cuda is much faster)")
    args = parser.parse_args(argv)
    base = args.input if args.input.is_dir() else args.input.parent
    output = args.output or base / f"qwen-image-{args.preset}.gguf"
    try:
        quantize_dit(args.input, output, args.preset, args.device)
    except WeightFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
