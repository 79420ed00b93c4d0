"""The pack in a real ComfyUI: every node registered once, under its own id, with tooltips; no import failure.

(That a broken feature module takes only its own nodes with it: tests/test_nodes_fail_soft.py.)"""

from __future__ import annotations

from host import PACK_NAME, inspect_pack

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


def test_every_node_has_a_description_and_every_output_a_tooltip(host):
    info = host.object_info()
    ours = {node_id: node for node_id, node in info.items() if node.get("python_module") == PACK_MODULE}
    assert ours
    for node_id, node in ours.items():
        assert node["description"], f"{node_id} has no description"
        assert node["category"].startswith("Qwen-Image/"), f"{node_id} is not in a sub-category"
        assert "(Qwen-Image)" not in node["display_name"], f"{node_id}: doubled name {node['display_name']!r}"
        assert len(node["output_tooltips"]) == len(node["output"]) and all(node["output_tooltips"]), node_id


def test_every_input_has_a_tooltip_and_one_category(host):
    info = host.object_info()
    ours = {node_id: node for node_id, node in info.items() if node.get("python_module") == PACK_MODULE}
    # one menu: "Qwen-Image" and its sub-categories ("Qwen-Image/2.1")
    assert all(node["category"] == "Qwen-Image" or node["category"].startswith("Qwen-Image/") for node in ours.values())
    for node_id, node in ours.items():
        assert node["display_name"] and node["display_name"] != node_id
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"



def _choices(info: dict, node: str, name: str) -> list[str]:
    """A combo's choices: V1 nodes (core's loaders) declare them as the type, V3 nodes (ours) as "COMBO" + options."""
    spec = info[node]["input"]["required"][name]
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_gguf_files_are_listed_by_our_loaders_only(host):
    """.gguf files come from our own folder keys: core's loaders (which cannot load them) never list them."""
    info = host.object_info()
    ours = {("QIP_DiffusionModelLoader", "model_name"): "qwen-image-Q8_0.gguf",
            ("QIP_TextEncoderLoader", "text_encoder_name"): "Qwen2.5-VL-7B-Instruct-Q8_0.gguf"}
    for (node, name), gguf in ours.items():
        assert gguf in _choices(info, node, name)
    assert "Qwen2.5-VL-7B-Instruct-mmproj-F16.gguf" not in _choices(info, "QIP_TextEncoderLoader", "text_encoder_name")
    core = {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("ControlNetLoader", "control_net_name")}
    for node, name in core:
        listed = _choices(info, node, name)
        assert not [f for f in listed if f.lower().endswith(".gguf")], f"{node} lists .gguf files"
    assert "qwen_image_bf16.safetensors" in _choices(info, "UNETLoader", "unet_name")  # core's lists still work
