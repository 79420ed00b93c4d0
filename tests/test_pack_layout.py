"""Static rules of the pack: models/ is host-free, requirements never touch torch and cover what the pack imports,
the Registry metadata and its publish workflow are complete."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "nodes", "server",
                "node_helpers", "latent_preview", "execution"}
HOST_STACK = {"torch", "torchvision", "torchaudio"}
RUNTIME_FILES = [REPO_ROOT / "__init__.py", *sorted((REPO_ROOT / "models").rglob("*.py")),
                 *sorted((REPO_ROOT / "nodes").rglob("*.py"))]


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _roots_in(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            roots.add(str(node.args[0].value).lstrip(".").split(".")[0])
    return roots


def _imported_roots(path: Path) -> set[str]:
    return _roots_in(_parse(path))


def _optional_roots(path: Path) -> set[str]:
    """Roots imported inside a ``try`` that catches ImportError: the code runs on without them."""
    catches = {"ImportError", "ModuleNotFoundError"}
    return {root for node in ast.walk(_parse(path)) if isinstance(node, ast.Try)
            and any(isinstance(handler.type, ast.Name) and handler.type.id in catches for handler in node.handlers)
            for statement in node.body for root in _roots_in(statement)}


def _requirement_names(lines: list[str]) -> list[str]:
    return [re.split(r"[<>=~!;\[ ]", line.strip(), maxsplit=1)[0].lower() for line in lines]


def _requirements() -> list[str]:
    """requirements.txt's requirement lines, comments dropped."""
    lines = (line.split("#", 1)[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines())
    return [line for line in lines if line]


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
    names = _requirement_names(_requirements())
    assert names, "requirements.txt lists nothing"
    assert not HOST_STACK & set(names)
    test_only = (REPO_ROOT / "requirements-test.txt").read_text()
    for reference in ("diffusers", "transformers", "gguf", "pytest"):
        assert reference in test_only and (reference == "gguf" or reference not in names)  # gguf: also at runtime


def test_requirements_cover_the_runtime_imports():
    third_party = set().union(*map(_imported_roots, RUNTIME_FILES)) - sys.stdlib_module_names
    third_party -= HOST_MODULES | HOST_STACK
    optional = set().union(*map(_optional_roots, RUNTIME_FILES)) & third_party
    assert third_party - optional <= set(_requirement_names(_requirements()))
    # An optional import is named in requirements.txt's comment and is an extra of the package.
    comments = (REPO_ROOT / "requirements.txt").read_text()
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert optional <= {name for group in extras.values() for name in _requirement_names(group)}
    assert all(re.search(rf"^#\s+{name}\b", comments, re.MULTILINE) for name in optional)


def test_the_import_scan_sees_optional_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import numpy\n\ndef f():\n    try:\n        import kornia\n    except ImportError:\n"
                      "        pass\n")
    assert _imported_roots(sample) >= {"numpy", "kornia"} and _optional_roots(sample) == {"kornia"}


def test_registry_metadata():
    """The Registry's pyproject fields (docs.comfy.org/registry/specifications; comfy-cli's config parser)."""
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert "comfy" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["requires-python"]
    assert project["license"]["file"] == "LICENSE" and "Apache License" in (REPO_ROOT / "LICENSE").read_text()
    assert project["dependencies"] == _requirements()
    repository = project["urls"]["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository)
    assert comfy["PublisherId"] and comfy["DisplayName"]
    owner, name = repository.split("/")[-2:]
    icon = comfy["Icon"].removeprefix(f"https://raw.githubusercontent.com/{owner}/{name}/main/")
    assert icon != comfy["Icon"] and (REPO_ROOT / icon).is_file()  # served from the repository itself
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    # comfy-cli keeps OS and accelerator classifiers only when all are from its lists.
    accelerators = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                    "GPU :: Apple Metal"}
    for classifier in project["classifiers"]:
        if classifier.startswith("Environment ::"):
            assert classifier.removeprefix("Environment :: ") in accelerators
        if classifier.startswith("Operating System ::"):
            assert classifier.split(" :: ")[1] in ("Microsoft", "POSIX", "MacOS", "OS Independent")


def test_the_publish_workflow():
    workflow = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "publish.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key "on" as true
    assert "workflow_dispatch" in triggers
    assert triggers["push"] == {"branches": ["main"], "paths": ["pyproject.toml"]}
    (job,) = workflow["jobs"].values()
    (publish,) = [step for step in job["steps"] if step.get("uses", "").startswith("Comfy-Org/publish-node-action@")]
    assert publish["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    repository = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert f"github.repository_owner == '{repository.split('/')[-2]}'" in job["if"]


def test_layout():
    for name in ("__init__.py", "nodes", "models", "example_workflows", "web", "tests", "requirements.txt",
                 "README.md", "pyproject.toml", "LICENSE", ".ci/run", ".github/workflows/publish.yml"):
        assert (REPO_ROOT / name).exists(), name
