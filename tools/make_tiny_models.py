"""Write the tiny random-weight Qwen-Image checkpoints (DiT, VAE, text encoder) into ComfyUI model folders.

Usage: python tools/make_tiny_models.py OUT_DIR [--seed N]

OUT_DIR receives diffusion_models/qwen_image_bf16.safetensors, vae/qwen_image_vae.safetensors and
text_encoders/qwen_2.5_vl_7b.safetensors (point ComfyUI's extra_model_paths at it for a demo).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tiny_models.factory import make_all  # noqa: E402  (needs the repository root on sys.path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to fill (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same bytes")
    parser.add_argument("--tokenizer-dir", type=Path,
                        help="a Qwen2.5 tokenizer folder (ComfyUI's comfy/text_encoders/qwen25_tokenizer): also "
                             "writes the GGUF files, whose text encoder carries the tokenizer")
    args = parser.parse_args(argv)
    for role, path in make_all(args.out_dir, seed=args.seed, tokenizer_dir=args.tokenizer_dir).items():
        print(f"{role:16s} {path}  ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
