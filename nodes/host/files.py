"""Which model files each loader offers, from the host's model folders.

Registers ``.gguf`` for the folders our loaders read (the host does not know the extension) when imported, so
every feature that lists files sees them, and adds diffusers / HF model folders (a sub-folder with a
``config.json``; a full pipeline folder offers its ``transformer``, ``text_encoder`` or ``vae`` part) next to the
single files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import folder_paths

from ...models import WeightFileError

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
WEIGHT_EXTENSIONS = (*SAFETENSORS_EXTENSIONS, ".gguf")
GGUF_FOLDERS = ("diffusion_models", "text_encoders", "controlnet")
# mmproj files are the vision half of a GGUF text encoder, never a text encoder on their own.
_MMPROJ = "mmproj"


def _register_gguf_extension() -> None:
    for name in GGUF_FOLDERS:
        entry = folder_paths.folder_names_and_paths.get(name)
        if entry is None:
            continue
        paths, extensions = entry[0], entry[1]
        if ".gguf" not in extensions:
            extensions = set(extensions) | {".gguf"}
            folder_paths.folder_names_and_paths[name] = (paths, extensions)
    # The host caches file lists per folder; a cached list made before the registration would lack .gguf files.
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        for name in GGUF_FOLDERS:
            cache.pop(name, None)


_register_gguf_extension()  # on import: whichever features load, all of them list .gguf files


def _model_folders(folder: str, part: str) -> list[str]:
    """Sub-folders (one or two levels) that hold a diffusers/HF model, as names relative to the model folder."""
    found = []
    for base in folder_paths.get_folder_paths(folder):
        if not os.path.isdir(base):
            continue
        for entry in sorted(os.listdir(base)):
            path = os.path.join(base, entry)
            if not os.path.isdir(path):
                continue
            if os.path.isfile(os.path.join(path, "config.json")):
                found.append(entry + "/")
            elif os.path.isfile(os.path.join(path, part, "config.json")):
                found.append(f"{entry}/{part}/")
    return found


def _inside_model_folder(folder: str, name: str) -> bool:
    """Whether a listed file is a shard of a diffusers/HF model folder (a ``config.json`` beside it or above it)."""
    parent = os.path.dirname(name)
    while parent:
        for base in folder_paths.get_folder_paths(folder):
            if os.path.isfile(os.path.join(base, parent, "config.json")):
                return True
        parent = os.path.dirname(parent)
    return False


def list_models(folder: str, part: str, extensions: tuple[str, ...]) -> list[str]:
    """Loadable single files (by extension; not the shards inside model folders, not mmproj files) and model
    folders in a host model folder."""
    files = [name for name in folder_paths.get_filename_list(folder)
             if name.lower().endswith(extensions) and _MMPROJ not in os.path.basename(name).lower()
             and not _inside_model_folder(folder, name)]
    return sorted(set(files)) + _model_folders(folder, part)


def model_input(folder: str, part: str, extensions: tuple[str, ...], tooltip: str) -> tuple:
    """A loader's input choosing among :func:`list_models` (``part``: the sub-folder of a full pipeline folder)."""
    return (list_models(folder, part, extensions), {"tooltip": tooltip})


def resolve(folder: str, name: str) -> str:
    """Absolute path of a name from :func:`list_models`; a clear error if it is gone."""
    if name.endswith("/"):
        for base in folder_paths.get_folder_paths(folder):
            path = os.path.join(base, name.rstrip("/"))
            if os.path.isdir(path):
                return path
    else:
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
    raise FileNotFoundError(f"'{name}' is not in the {folder} model folder any more "
                            f"({', '.join(folder_paths.get_folder_paths(folder))}). Refresh the page and pick again.")


@contextlib.contextmanager
def chosen_file(folder: str, input_name: str, name: str) -> Iterator[str]:
    """The path of the file (or folder) a loader's ``input_name`` chose; a :class:`WeightFileError` raised while
    it is used (wrong model, damaged or incomplete file) names that input, so the user knows which widget to change."""
    path = resolve(folder, name)
    try:
        yield path
    except WeightFileError as e:
        raise type(e)(f"{input_name}: {e}") from None
