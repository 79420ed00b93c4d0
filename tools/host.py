"""Run a real ComfyUI headless with this pack loaded from the working tree, and drive it over its HTTP API.

Used by the tests (one host per test session), the demo and the benchmarks::

    with ComfyHost(models_dir) as host:
        result = host.run(api_graph)          # POST /prompt, wait for /history, collect outputs
        print(result.images)                  # absolute paths of the PNGs the graph saved

The host runs from :func:`tools.env.comfyui_path` (``COMFYUI_PATH`` or the pinned 0.3.75) under
:func:`tools.env.venv_python`.  The pack (and any ``extra_packs``) is linked (not copied) into a private
custom_nodes folder; models come from ``models_dir`` (ComfyUI's sub-folder names: diffusion_models, vae,
text_encoders, loras, controlnet, ...); input, output, temp and user folders are private temporary folders.
``offline=True`` runs the server with the network guard (only this machine reachable).  The server is stopped by
its process id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import REPO_ROOT, comfyui_path, venv_python  # noqa: E402

PACK_NAME = "comfyui-qwen-image"
OFFLINE_STARTUP = Path(__file__).resolve().parent / "offline_startup"  # its sitecustomize blocks the network
MODEL_FOLDERS = ("diffusion_models", "unet", "vae", "text_encoders", "clip", "loras", "controlnet", "model_patches")


class HostError(RuntimeError):
    """The host failed to start, rejected a graph, or a graph failed while executing."""


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict
    files: dict[str, list[Path]] = field(default_factory=dict)  # output kind ("images", "latents") -> paths
    seconds: float = 0.0

    @property
    def images(self) -> list[Path]:
        return self.files.get("images", [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyHost:
    """A headless ComfyUI process on 127.0.0.1 with this pack loaded."""

    def __init__(self, models_dir: str | os.PathLike | None = None, *, extra_args: tuple[str, ...] = (),
                 startup_timeout: float = 240.0, cpu: bool = True, offline: bool = False,
                 extra_packs: tuple[str | os.PathLike, ...] = (), extra_env: dict[str, str] | None = None):
        self.workdir = Path(tempfile.mkdtemp(prefix="qwen-image-host-"))
        self.models_dir = Path(models_dir) if models_dir else self.workdir / "models"
        self.output_dir = self.workdir / "output"
        self.input_dir = self.workdir / "input"
        self.log_path = self.workdir / "host.log"
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.cpu = cpu  # tests always run on the CPU (fp32, bitwise repeatable); the demo may use a GPU
        self.offline = offline  # the network guard (tools/network_guard.py) in the server process
        self.extra_packs = tuple(Path(p) for p in extra_packs)  # more custom-node folders (test-only nodes)
        self.extra_env = dict(extra_env or {})
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.comfyui = comfyui_path()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> "ComfyHost":
        custom_nodes = self.workdir / "custom_nodes"
        custom_nodes.mkdir(parents=True)
        (custom_nodes / PACK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
        for pack in self.extra_packs:
            (custom_nodes / pack.name).symlink_to(pack.resolve(), target_is_directory=True)
        for sub in MODEL_FOLDERS:
            (self.models_dir / sub).mkdir(parents=True, exist_ok=True)
        for folder in (self.output_dir, self.input_dir, self.workdir / "temp", self.workdir / "user"):
            folder.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "extra_model_paths.yaml"
        lines = ["qwen_image_test:", f"    base_path: {self.models_dir}", f"    custom_nodes: {custom_nodes}"]
        lines += [f"    {sub}: {sub}" for sub in MODEL_FOLDERS]
        config.write_text("\n".join(lines) + "\n")
        self.port = _free_port()
        cmd = [str(venv_python()), "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
               "--port", str(self.port),
               "--disable-api-nodes", "--extra-model-paths-config", str(config),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.workdir / "temp"), "--user-directory", str(self.workdir / "user"),
               "--disable-auto-launch", *self.extra_args]
        log = open(self.log_path, "wb")
        env = self.environment()
        self.process = subprocess.Popen(cmd, cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HostError(f"ComfyUI exited with code {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise HostError(f"ComfyUI did not become ready in {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def environment(self) -> dict[str, str]:
        """The server process's environment: ours plus ``extra_env``; with ``offline`` the network guard is
        installed at interpreter start."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        if self.offline:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(OFFLINE_STARTUP), env.get("PYTHONPATH")]))
        return env

    def stop(self) -> None:
        """Stop the server we started, by its process id: its whole process group (children included, even when
        the server itself has already exited)."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break  # nothing of the group is left
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process.wait()

    def __enter__(self) -> "ComfyHost":
        return self.start()

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if exc_type is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:  # keep the log and outputs of a failed run for inspection
            print(f"[host] kept {self.workdir} (log: {self.log_path})", file=sys.stderr)

    # -- HTTP --------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return response.status, (json.loads(raw) if raw.strip() else {})
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except json.JSONDecodeError:
                return e.code, {"error": raw.decode(errors="replace")}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def add_inputs(self, images: dict) -> None:
        """Write images (uint8 ``[H,W,3|4]`` arrays) into the host's input folder, for LoadImage."""
        from PIL import Image

        for name, array in images.items():
            Image.fromarray(array).save(self.input_dir / name)

    # -- graphs ------------------------------------------------------------------------------------------------
    def object_info(self) -> dict:
        return self.get("/object_info", timeout=120)

    def submit(self, graph: dict) -> str:
        status, body = self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        if status != 200 or body.get("node_errors"):
            raise HostError(f"the host rejected the graph (HTTP {status}): {json.dumps(body, indent=1)[:4000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                    return entry
            if self.process is not None and self.process.poll() is not None:
                raise HostError(f"ComfyUI died while running the graph:\n{self.log_tail()}")
            time.sleep(0.2)
        raise HostError(f"the graph did not finish in {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 600) -> RunResult:
        """Run an API-format graph to completion; raise HostError with the host's message if it fails."""
        start = time.monotonic()
        prompt_id = self.submit(graph)
        entry = self.wait(prompt_id, timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            messages = [m for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
            raise HostError(f"the graph failed: {json.dumps(messages, indent=1)[:6000]}")
        files: dict[str, list[Path]] = {}
        for output in entry.get("outputs", {}).values():
            for kind, items in output.items():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        # temp files are previews (PreviewImage, Edit Encode's "what the model sees"), not outputs
                        temp = item.get("type") == "temp"
                        # (--temp-directory D puts the host's temp folder at D/temp)
                        base = self.workdir / "temp" / "temp" if temp else self.output_dir
                        files.setdefault("previews" if temp else kind, []).append(
                            base / item.get("subfolder", "") / item["filename"])
        return RunResult(prompt_id, entry.get("outputs", {}), files, time.monotonic() - start)


_INSPECT_PACK = r"""
import importlib.util, json, sys
repo, package = sys.argv[1], sys.argv[2]
sys.argv = ["main.py", "--cpu"]  # host modules read their command line: the same one the harness starts with
import comfy.options
comfy.options.enable_args_parsing()
import folder_paths  # the host imports it before custom nodes; the pack checks for it
spec = importlib.util.spec_from_file_location(package, repo + "/__init__.py", submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec)
sys.modules[package] = pack
spec.loader.exec_module(pack)
print("QIP-INSPECT " + json.dumps({"nodes": sorted(pack.NODE_CLASS_MAPPINGS),
                                   "failed": sys.modules[package + ".nodes"].FAILED_MODULES}))
"""


def inspect_pack() -> dict:
    """Import the pack outside the server (host modules importable) and list the node ids it declares.

    Independent of the running server, so a test can compare what the pack declares with what the host registered.
    """
    result = subprocess.run([str(venv_python()), "-c", _INSPECT_PACK, str(REPO_ROOT), "qip_inspect"],
                            cwd=comfyui_path(), capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(comfyui_path())))
    for line in result.stdout.splitlines():
        if line.startswith("QIP-INSPECT "):
            return json.loads(line[len("QIP-INSPECT "):])
    raise HostError(f"importing the pack failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
