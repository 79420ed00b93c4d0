"""The library under threads, as a server with a thread pool uses it.

* Models shared by several threads (DiT, VAE, text encoder; GGUF too) give bit-identical results to the same calls
  run one after another.
* No module of the library keeps mutable state at module level (a cache or scratch shared by every model and
  thread); the few that still do are listed with why.
* A model is freed when its last reference goes: no module-level structure holds it or its scratch memory.
"""

from __future__ import annotations

import ast
import gc
import random
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from models import load_diffusion_model, load_text_encoder, load_vae
from references import host_tokenizer_dir
from tiny_models.configs import TINY_DIT
from tiny_models.factory import make_dit, make_text_encoder, make_vae
from tiny_models.gguf_factory import make_dit_gguf

MODELS = Path(__file__).resolve().parent.parent / "models"
WORKERS = 4
# Module-level mutable state that is known and why it is tolerated (file, name) -> reason.
KNOWN_MODULE_STATE = {
    ("models/qwen_image/vae.py", "_LAYER_CLASSES"): "layer classes built once per ops namespace: every thread "
                                                     "builds equal classes, nothing per model is kept",
}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dit_jobs(model, tag: str) -> list:
    jobs = []
    for i, (height, width) in enumerate([(4, 4), (6, 8), (8, 6)]):
        x = torch.randn(1, 16, height, width, generator=_generator(i))
        context = torch.randn(1, 5 + i, TINY_DIT["joint_attention_dim"], generator=_generator(10 + i))
        ref = torch.randn(1, 16, 4, 4, generator=_generator(20 + i))
        jobs.append((f"{tag} {height}x{width}", lambda x=x, c=context, r=ref, t=0.2 * (i + 1):
                     model(x, torch.tensor([t]), c, ref_latents=[r])))
    return jobs


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> list:
    """(name, call) pairs over one shared instance of each model; every call is deterministic."""
    root = tmp_path_factory.mktemp("threads")
    dit = load_diffusion_model(make_dit(root, dtype="fp32", seed=8))
    vae = load_vae(make_vae(root, dtype="fp32", seed=8))
    encoder = load_text_encoder(make_text_encoder(root, dtype="fp32", seed=8), tokenizer=host_tokenizer_dir())
    image = torch.rand(1, 56, 56, 3, generator=_generator(30))
    calls = _dit_jobs(dit, "dit")
    calls += [(f"vae encode {size}", lambda s=size: vae.encode(torch.rand(1, s, s, 3, generator=_generator(s))))
              for size in (32, 48)]
    calls += [("vae decode", lambda: vae.decode(torch.randn(1, 16, 6, 5, generator=_generator(31))))]
    calls += [(f"text {prompt}", lambda p=prompt: encoder.encode(p)[0]) for prompt in ("a fox", "two red kites")]
    calls += [("edit", lambda: encoder.encode("make it blue", images=[image[0]], template="edit")[0])]
    calls += _dit_jobs(load_diffusion_model(make_dit_gguf(root, qtype="Q8_0", seed=8)), "gguf dit")
    return calls


def test_models_shared_by_threads_give_the_sequential_results_bit_for_bit(jobs):
    with torch.no_grad():
        sequential = {name: call() for name, call in jobs}
        order = [job for job in jobs for _ in range(3)]  # each call three times, interleaved with the others
        random.Random(0).shuffle(order)
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            results = list(pool.map(lambda job: (job[0], job[1]()), order))
    mismatched = sorted({name for name, out in results if not torch.equal(out, sequential[name])})
    assert mismatched == [], f"different results under {WORKERS} threads: {mismatched}"


# -- no module-level mutable state ---------------------------------------------------------------------------------
_MUTATORS = {"append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "add", "discard",
             "remove", "__setitem__"}


def _mutable_literal(node: ast.AST) -> bool:
    if isinstance(node, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    return isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
        "dict", "list", "set", "defaultdict", "OrderedDict", "WeakValueDictionary", "WeakKeyDictionary")


def module_state(source: str) -> set[str]:
    """Names bound at module level to a mutable container and changed anywhere in the module (item assignment,
    a mutating method, or a ``global`` rebinding)."""
    tree = ast.parse(source)
    containers = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if targets and node.value is not None and _mutable_literal(node.value):
            containers |= {t.id for t in targets if isinstance(t, ast.Name)}
    changed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            changed |= set(node.names)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            for target in getattr(node, "targets", None) or [node.target]:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                    changed.add(target.value.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS \
                and isinstance(node.func.value, ast.Name):
            changed.add(node.func.value.id)
    return containers & changed


def test_the_library_keeps_no_mutable_state_at_module_level():
    found = {(path.relative_to(MODELS.parent).as_posix(), name)
             for path in sorted(MODELS.rglob("*.py")) for name in module_state(path.read_text(encoding="utf-8"))}
    assert found - set(KNOWN_MODULE_STATE) == set()


def test_the_module_state_detector_can_fail():
    source = ("_cache = {}\n_items: list = []\n_seen = set()\n_TABLE = {'a': 1}\n_counter = 0\n"
              "def f(k):\n    _cache[k] = 1\n    _items.append(k)\n    return _TABLE[k]\n"
              "def g():\n    global _counter\n    _counter += 1\n    _seen.add(1)\n")
    assert module_state(source) == {"_cache", "_items", "_seen"}  # _TABLE is only read; _counter is no container
    assert module_state("_cache: dict = {}\n\ndef f():\n    global _cache\n    _cache = {}\n") == {"_cache"}


# -- freeing -------------------------------------------------------------------------------------------------------
def _module_level_tensor_bytes() -> int:
    """Bytes of the tensors held by module globals of the library (directly or in containers)."""
    total = 0
    for name, module in list(sys.modules.items()):
        if name != "models" and not name.startswith("models."):
            continue
        for value in vars(module).values():
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, set, tuple)) \
                else [value]
            total += sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
    return total


@pytest.mark.parametrize("kind", ["dit", "gguf"])
def test_a_model_and_its_scratch_are_freed_with_the_last_reference(tmp_path, kind):
    path = make_dit_gguf(tmp_path, seed=9) if kind == "gguf" else make_dit(tmp_path, dtype="fp32", seed=9)
    baseline = _module_level_tensor_bytes()
    model = load_diffusion_model(path)
    ((_, call),) = _dit_jobs(model, kind)[:1]
    with torch.no_grad():
        call()
    freed = weakref.ref(model)
    del model, call
    gc.collect()
    assert freed() is None, "something outside the model still holds it"
    assert _module_level_tensor_bytes() <= baseline
