"""Static rules of the pack: models/ is host-free, requirements never touch torch, registry metadata exists."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "nodes", "server",
                "node_helpers", "latent_preview", "execution"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            roots.add(str(node.args[0].value).lstrip(".").split(".")[0])
    return roots


def test_models_never_import_the_host():
    files = sorted((REPO_ROOT / "models").rglob("*.py"))
    assert files, "models/ is empty"
    offenders = {str(f.relative_to(REPO_ROOT)): sorted(_imported_roots(f) & HOST_MODULES) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_detector_sees_host_imports(tmp_path):
    # The rule above must be able to fail: it recognises every form of import it is meant to forbid.
    sample = tmp_path / "sample.py"
    sample.write_text("import comfy.ops\nfrom folder_paths import x\nimport importlib\nimportlib.import_module('server')\n")
    assert _imported_roots(sample) >= {"comfy", "folder_paths", "server"}


def test_requirements_never_list_the_torch_stack():
    names = []
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.replace(">", "=").replace("<", "=").replace("~", "=").split("=")[0].strip().lower())
    assert names, "requirements.txt lists nothing"
    assert not {"torch", "torchvision", "torchaudio"} & set(names)
    test_only = (REPO_ROOT / "requirements-test.txt").read_text()
    for reference in ("diffusers", "transformers", "gguf", "pytest"):
        assert reference in test_only and (reference == "gguf" or reference not in names)  # gguf: also at runtime


def test_registry_metadata():
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"]["file"] == "LICENSE"
    assert "Apache License" in (REPO_ROOT / "LICENSE").read_text()
    comfy = meta["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(comfy)
    assert meta["project"]["name"] and meta["project"]["version"]


def test_layout():
    for name in ("__init__.py", "nodes", "models", "workflows", "web", "tests", "requirements.txt", "README.md",
                 "pyproject.toml", "LICENSE", ".ci/run"):
        assert (REPO_ROOT / name).exists(), name
