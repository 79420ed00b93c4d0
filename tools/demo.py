#!/usr/bin/env python3
"""The main job: run a workflow from example_workflows/ headless in a real ComfyUI and print where the images went.

    python3 tools/demo.py                                   # text-to-image on built-in tiny random weights
    python3 tools/demo.py --models ~/ComfyUI/models         # on your own Qwen-Image files
    python3 tools/demo.py --workflow example_workflows/X.json --set prompt="a red fox" --set seed=7

Tiny weights are random: their images are structured noise, which proves the whole path (load, encode, sample,
decode, save) runs, not that the model draws.  ``--set NAME=VALUE`` sets every node input called NAME (widgets
such as prompt, seed, steps, or a loader's file name) before the graph is queued.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import env  # noqa: E402

env.reexec_in_env(Path(__file__))

sys.path.insert(0, str(env.REPO_ROOT))
from host import ComfyHost  # noqa: E402
from tiny_models.images import example_inputs  # noqa: E402
from workflow import ui_to_api  # noqa: E402

DEFAULT_WORKFLOW = env.REPO_ROOT / "example_workflows" / "qwen_image_t2i.json"


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _tiny_models(seed: int) -> Path:
    """The built-in tiny checkpoints, generated once into the cache (deterministic from the seed)."""
    from tiny_models.factory import make_all

    # Keyed by the factory's source too: a newer pack writes more (or other) files than an older cache holds.
    sources = sorted((Path(__file__).resolve().parent / "tiny_models").glob("*.py"))
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:12]
    folder = env.cache_dir() / f"tiny-models-seed{seed}-{digest}"
    if not (folder / ".complete").is_file():
        tokenizer = env.comfyui_path() / "comfy" / "text_encoders" / "qwen25_tokenizer"  # for the GGUF encoder
        make_all(folder, seed=seed, tokenizer_dir=tokenizer)
        (folder / ".complete").write_text("ok\n")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="a UI-format workflow JSON")
    parser.add_argument("--models", type=Path, help="your ComfyUI models folder (default: built-in tiny weights)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="set every node input called NAME (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("output"), help="where to copy the images (default ./output)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the graph")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto: the GPU for your own models when one is there, the CPU for the tiny ones")
    args = parser.parse_args()

    workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
    models_dir = args.models.expanduser().resolve() if args.models else _tiny_models(seed=0)
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set needs NAME=VALUE, got {item!r}")
        overrides[name] = _parse_value(value)

    print(f"[demo] workflow {args.workflow.name}; models from {models_dir}"
          + ("" if args.models else " (built-in tiny random weights: the picture is noise by design)"), flush=True)
    import torch

    use_gpu = args.device == "gpu" or (args.device == "auto" and args.models is not None and torch.cuda.is_available())
    with ComfyHost(models_dir, cpu=not use_gpu) as host:
        host.add_inputs(example_inputs())  # what the edit workflows load (replace with your own images in ComfyUI)
        graph = ui_to_api(workflow, host.object_info())
        applied = set()
        for node in graph.values():
            for name, value in overrides.items():
                if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                    node["inputs"][name] = value
                    applied.add(name)
        unknown = set(overrides) - applied
        if unknown:
            print(f"[demo] no node input is called {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        result = host.run(graph, timeout=args.timeout)
        args.out.mkdir(parents=True, exist_ok=True)
        saved = []
        for image in result.images:
            target, n = args.out / image.name, 1
            while target.exists():  # never overwrite an earlier result
                target, n = args.out / f"{image.stem}_{n}{image.suffix}", n + 1
            shutil.copyfile(image, target)
            saved.append(target.resolve())
    if not saved:
        print("[demo] the workflow ran but saved no image", file=sys.stderr)
        return 1
    print(f"[demo] finished in {result.seconds:.1f} s")
    for path in saved:
        print(f"[demo] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
