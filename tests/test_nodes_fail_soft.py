"""The pack's nodes are fail-soft: a feature module that cannot be imported takes only its own nodes with it.

* Statically: feature modules import only nodes/common.py, the host adapters (nodes/host/) and the library's public
  API (``from ..models import``), never each other; host adapters import the library only through its public API.
* For real: in one process that imports the host (its command line, folder_paths, comfy), the pack is imported
  intact and then once per feature module with that module raising on import, all other modules being the real
  ones.  That process is this file run as a script (the host is imported once: seconds, not a server per module).
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
NODES = REPO_ROOT / "nodes"
# nodes/ modules that are not features: the package, its fail-soft loader and what every feature shares.
SHARED_MODULES = {"__init__", "registry", "common"}
MARKER = "QIP-FAIL-SOFT "


def _feature_modules() -> tuple[str, ...]:
    """FEATURE_MODULES as nodes/__init__.py declares it (read without importing the host)."""
    for node in ast.parse((NODES / "__init__.py").read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", None) == "FEATURE_MODULES" for t in targets):
                return tuple(ast.literal_eval(node.value))
    raise AssertionError("nodes/__init__.py declares no FEATURE_MODULES")


FEATURE_MODULES = _feature_modules()


# -- static: who imports whom --------------------------------------------------------------------------------------
def _pack_imports(source: str, package: tuple[str, ...]) -> set[str]:
    """The pack modules a module of ``package`` (e.g. ``("nodes", "host")``) imports, as dotted paths from the
    pack root (``nodes.common``, ``models``); ``from . import x`` counts as importing ``x``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        base = package[:len(package) - node.level + 1]
        if node.module:
            found.add(".".join((*base, node.module)))
        else:
            found.update(".".join((*base, alias.name)) for alias in node.names)
    return found


def _allowed_for_feature(name: str) -> bool:
    return name in ("models", "nodes.common") or name.startswith("nodes.host.")


def _allowed_for_host_adapter(name: str) -> bool:
    return name == "models" or name.startswith("nodes.host.")


def test_feature_modules_are_exactly_the_feature_files():
    files = {path.stem for path in NODES.glob("*.py")} - SHARED_MODULES
    assert set(FEATURE_MODULES) == files, "a feature module is missing from FEATURE_MODULES (it would never load)"


@pytest.mark.parametrize("feature", FEATURE_MODULES)
def test_a_feature_module_imports_no_other_feature(feature):
    imported = _pack_imports((NODES / f"{feature}.py").read_text(encoding="utf-8"), ("nodes",))
    assert imported, f"nodes/{feature}.py imports nothing of the pack"
    assert sorted(name for name in imported if not _allowed_for_feature(name)) == []


def test_host_adapters_use_only_the_library_public_api():
    adapters = sorted((NODES / "host").glob("*.py"))
    assert adapters, "nodes/host/ is empty"
    offenders = {}
    for path in adapters:
        imported = _pack_imports(path.read_text(encoding="utf-8"), ("nodes", "host"))
        offenders[path.name] = sorted(name for name in imported if not _allowed_for_host_adapter(name))
    assert {name: bad for name, bad in offenders.items() if bad} == {}


def test_the_import_rules_can_fail():
    # The rules above must see every form of a forbidden import.
    feature = "from .loaders import X\nfrom . import edit\nfrom ..models.qwen_image import dit\nfrom .host import ops\n"
    imported = _pack_imports(feature, ("nodes",))
    assert imported == {"nodes.loaders", "nodes.edit", "models.qwen_image", "nodes.host"}
    assert not any(map(_allowed_for_feature, imported))
    adapter = "from ..common import CATEGORY\nfrom ...models.io import weights\nfrom .ops import HostGGUFOps\n"
    imported = _pack_imports(adapter, ("nodes", "host"))
    assert sorted(filter(_allowed_for_host_adapter, imported)) == ["nodes.host.ops"]


# -- for real: the pack in the host, one feature module broken at a time -------------------------------------------
@pytest.fixture(scope="module")
def imports() -> dict:
    """What the pack registers intact ("") and with each feature module broken, from one host process."""
    from env import comfyui_path, venv_python

    result = subprocess.run([str(venv_python()), __file__, str(REPO_ROOT)], cwd=comfyui_path(), capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(comfyui_path())))
    for line in result.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise AssertionError(f"the probe failed (exit {result.returncode}):\n{result.stderr[-4000:]}")


def test_the_intact_pack_loads_every_feature(imports):
    intact = imports[""]
    assert intact["features"] == list(FEATURE_MODULES)
    assert intact["failed"] == {} and intact["logged"] == []
    assert set(intact["owners"].values()) == set(FEATURE_MODULES), "every feature module contributes nodes"
    assert intact["display"] == intact["nodes"]


@pytest.mark.parametrize("broken", FEATURE_MODULES)
def test_a_broken_feature_module_takes_only_its_own_nodes(imports, broken):
    intact, result = imports[""], imports[broken]
    assert list(result["failed"]) == [broken]
    assert "simulated broken feature module" in result["failed"][broken]
    assert any(f"could not load feature module '{broken}'" in message for message in result["logged"])
    survivors = [node for node in intact["nodes"] if intact["owners"][node] != broken]
    assert result["nodes"] == survivors  # the same ids, in the same menu order
    assert result["display"] == survivors
    assert result["owners"] == {node: intact["owners"][node] for node in survivors}


class _RaiseOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes one module raise while it is imported, as a missing dependency of that module would."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname == self.name else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError(f"simulated broken feature module {module.__name__}")


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _import_pack(repo: str, package: str, broken: str | None) -> dict:
    """Import the pack as ``package`` (a fresh name: nothing is reused from an earlier import), ``broken`` raising."""
    breaker = _RaiseOnImport(f"{package}.nodes.{broken}") if broken else None
    errors = _Errors()
    logger = logging.getLogger("qwen_image")
    logger.addHandler(errors)
    if breaker:
        sys.meta_path.insert(0, breaker)
    try:
        spec = importlib.util.spec_from_file_location(package, repo + "/__init__.py", submodule_search_locations=[repo])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[package] = pack
        spec.loader.exec_module(pack)
    finally:
        logger.removeHandler(errors)
        if breaker:
            sys.meta_path.remove(breaker)
    nodes = sys.modules[f"{package}.nodes"]
    return {"features": list(nodes.FEATURE_MODULES), "failed": nodes.FAILED_MODULES, "logged": errors.messages,
            "nodes": list(pack.NODE_CLASS_MAPPINGS), "display": list(pack.NODE_DISPLAY_NAME_MAPPINGS),
            "owners": {node: cls.__module__.removeprefix(f"{package}.nodes.")
                       for node, cls in pack.NODE_CLASS_MAPPINGS.items()}}


def _probe(repo: str) -> None:
    """Run inside the host's folder with its modules importable, as the host imports custom nodes."""
    sys.argv = ["main.py", "--cpu"]  # host modules read the command line the harness starts the host with
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths  # noqa: F401  (the host imports it before custom nodes; the pack checks for it)

    results = {broken or "": _import_pack(repo, f"qip_fail_soft_{broken or 'intact'}", broken)
               for broken in (None, *FEATURE_MODULES)}
    print(MARKER + json.dumps(results))


if __name__ == "__main__":
    _probe(sys.argv[1])
