"""The pack in a real ComfyUI: every node registered once, under its own id, with tooltips; no import failure."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

from host import PACK_NAME, inspect_pack

REPO_ROOT = Path(__file__).resolve().parent.parent

PACK_MODULE = f"custom_nodes.{PACK_NAME}"


def test_every_pack_node_is_registered_under_its_own_id(host):
    declared = inspect_pack()
    assert declared["failed"] == {}, f"feature modules failed to import: {declared['failed']}"
    assert declared["nodes"], "the pack declares no nodes"
    info = host.object_info()
    registered = {node_id for node_id, node in info.items() if node.get("python_module") == PACK_MODULE}
    missing = [n for n in declared["nodes"] if n not in registered]
    assert not missing, f"declared but not registered by the host (missing or shadowed by a core id): {missing}"
    assert registered == set(declared["nodes"])
    core = {node_id for node_id, node in info.items()
            if node.get("python_module") == "nodes" or node.get("python_module", "").startswith(("comfy_extras", "comfy_api"))}
    assert len(core) > 100, "the host's core node list looks wrong"
    assert not core & set(declared["nodes"])


def test_the_host_log_shows_no_pack_import_failure(host):
    host.object_info()  # the server is up, so custom nodes have been imported
    log = host.log_text()
    assert "Qwen-Image pack:" in log, "the pack never reported loading"
    assert "could not load feature module" not in log
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line or "Cannot import" in line]
    assert not [line for line in failed if f"custom_nodes/{PACK_NAME}" in line], failed


def test_every_input_has_a_tooltip_and_one_category(host):
    info = host.object_info()
    ours = {node_id: node for node_id, node in info.items() if node.get("python_module") == PACK_MODULE}
    assert {node["category"] for node in ours.values()} == {"Qwen-Image"}
    for node_id, node in ours.items():
        assert node["display_name"] and node["display_name"] != node_id
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_a_broken_feature_module_does_not_stop_the_others(tmp_path, caplog):
    package = tmp_path / "fakepack"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "good.py").write_text("NODE_CLASS_MAPPINGS = {'QIP_Good': object}\nNODE_DISPLAY_NAME_MAPPINGS = {}\n")
    (package / "broken.py").write_text("raise RuntimeError('simulated broken optional dependency')\n")
    spec = importlib.util.spec_from_file_location("qip_registry", REPO_ROOT / "nodes" / "registry.py")
    registry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(registry)
    sys.path.insert(0, str(tmp_path))
    try:
        with caplog.at_level(logging.INFO, logger="qwen_image"):
            classes, _, failures = registry.load_feature_modules(("broken", "good"), "fakepack")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "fakepack" or m.startswith("fakepack.")]:
            del sys.modules[name]
    assert list(classes) == ["QIP_Good"]
    assert "simulated broken optional dependency" in failures["broken"]
    assert "could not load feature module 'broken'" in caplog.text
