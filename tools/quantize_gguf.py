"""Quantize a Qwen-Image 1.x or 2.1 DiT (safetensors) to GGUF with the usual Qwen-Image rules.

Usage: python tools/quantize_gguf.py INPUT [OUTPUT.gguf] [--preset Q4_K_M] [--device cpu|cuda]

INPUT: a Comfy-Org single file (optionally prefixed ``model.diffusion_model.``, bf16 / fp16 / fp32 / fp8, scaled
fp8 multiplied out), a diffusers ``transformer`` folder, or a pipeline folder holding one; the registry says which
family it is.  OUTPUT defaults to ``qwen-image-<PRESET>.gguf`` (``qwen-image-2.1-<PRESET>.gguf``) next to INPUT.
Rules (:func:`models.io.gguf.quantize.dit_tensor_type`): img_in, txt_in, time_text_embed, norm_out, proj_out (and
2.1's shared modulation) in BF16, 1-D tensors in F32, blocks 0 and last, V projections and FFN-down one level
higher; rows that do not fit a K format fall back to a legacy one.  The file's arch tag is ``qwen_image`` (1.x) or
``qwen_image21`` (2.1), as ComfyUI-GGUF writes them.  Tensors are read, quantized and written one at a time (memory
stays near one tensor); the file appears atomically when done.
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

from models.io.gguf.quantize import DIT_PRESETS, DIT_RULES, dit_tensor_type, quantize  # noqa: E402  (repo root)
from models.io.gguf.reader import GGMLType  # noqa: E402
from models.io.gguf.writer import GGUFWriter  # noqa: E402
from models.io.loading import open_weights  # noqa: E402
from models.io.weights import WeightFileError  # noqa: E402
from models.registry import ZERO_COND_MARKER, identify, refusal  # noqa: E402

SKIPPED = ("scaled_fp8",)
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
# family -> (general.name, default output name's stem)
_NAMES = {"qwen_image": ("Qwen-Image", "qwen-image"), "qwen_image_2_1": ("Qwen-Image 2.1", "qwen-image-2.1")}


def quantize_dit(source: Path, output: Path | None = None, preset: str = "Q4_K_M", device: str = "cpu",
                 log=print) -> Path:
    """Write ``output`` (GGUF, the family's arch tag; default ``qwen-image[-2.1]-<preset>.gguf`` next to
    ``source``) from the Qwen-Image 1.x or 2.1 DiT checkpoint at ``source``; returns the path."""
    checkpoint = open_weights(source, "transformer").tensors
    identity = identify(checkpoint)
    if identity.role != "diffusion_model" or identity.family not in DIT_RULES or not identity.supported:
        raise refusal(str(source), identity, "a Qwen-Image or Qwen-Image 2.1 diffusion model (DiT)")
    rules, (title, stem) = DIT_RULES[identity.family], _NAMES[identity.family]
    if output is None:
        output = (source if source.is_dir() else source.parent) / f"{stem}-{preset}.gguf"
    names = {k[len(identity.prefix):]: k for k in checkpoint if k.startswith(identity.prefix)}
    depth = 1 + max(int(m.group(1)) for n in names if (m := _BLOCK.match(n)))
    writer = GGUFWriter(output, rules.arch)
    writer.add("general.name", f"{title} {preset}")
    writer.add("general.quantization_version", 2)
    writer.add(f"{rules.arch}.quantization_preset", preset)
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
        ggml = dit_tensor_type(name, tuple(shape), preset, depth, rules)
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
    try:
        quantize_dit(args.input, args.output, args.preset, args.device)
    except WeightFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
