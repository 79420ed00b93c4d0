"""Which model files each loader offers, from the host's model folders.

``.gguf`` files are listed through folder keys of our own (``qip_<folder>_gguf``, sharing the host folder's path
list, as ComfyUI-GGUF does with ``unet_gguf``): core's folder lists and caches stay untouched, so core's loaders
never offer a .gguf they cannot load.  Diffusers / HF model folders (a sub-folder with a ``config.json``; a full
pipeline folder offers its ``transformer``, ``text_encoder`` or ``vae`` part) are listed next to the single files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import folder_paths

from ...models import WeightFileError, load_progress
from .components import progress_bar

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
GGUF_EXTENSION = ".gguf"
WEIGHT_EXTENSIONS = (*SAFETENSORS_EXTENSIONS, GGUF_EXTENSION)
GGUF_FOLDERS = ("diffusion_models", "text_encoders", "controlnet")
# mmproj files are the vision half of a GGUF text encoder, never a text encoder on their own.
_MMPROJ = "mmproj"


def gguf_key(folder: str) -> str:
    """Our folder key listing the .gguf files of a host model folder."""
    return f"qip_{folder}_gguf"


def _register_gguf_folders() -> None:
    for folder in GGUF_FOLDERS:
        entry = folder_paths.folder_names_and_paths.get(folder)
        if entry is not None:
            # the host folder's own path list object: paths added to it later (extra_model_paths.yaml) count too
            folder_paths.folder_names_and_paths[gguf_key(folder)] = (entry[0], {GGUF_EXTENSION})


_register_gguf_folders()  # on import: whichever features load, all of them list .gguf files


def _file_key(folder: str, name: str) -> str:
    """The folder key a listed file name belongs to."""
    gguf = name.lower().endswith(GGUF_EXTENSION) and gguf_key(folder) in folder_paths.folder_names_and_paths
    return gguf_key(folder) if gguf else folder


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
    names = folder_paths.get_filename_list(folder)
    if GGUF_EXTENSION in extensions and gguf_key(folder) in folder_paths.folder_names_and_paths:
        names = [*names, *folder_paths.get_filename_list(gguf_key(folder))]
    files = [name for name in names
             if name.lower().endswith(extensions) and _MMPROJ not in os.path.basename(name).lower()
             and not _inside_model_folder(folder, name)]
    return sorted(set(files)) + _model_folders(folder, part)


def resolve(folder: str, name: str) -> str:
    """Absolute path of a name from :func:`list_models`; a clear error if it is gone."""
    if name.endswith("/"):
        for base in folder_paths.get_folder_paths(folder):
            path = os.path.join(base, name.rstrip("/"))
            if os.path.isdir(path):
                return path
    else:
        path = folder_paths.get_full_path(_file_key(folder, name), name)
        if path:
            return path
    raise FileNotFoundError(f"'{name}' is not in the {folder} model folder any more "
                            f"({', '.join(folder_paths.get_folder_paths(folder))}). Refresh the page and pick again.")


@contextlib.contextmanager
def chosen_file(folder: str, input_name: str, name: str) -> Iterator[str]:
    """The path of the file (or folder) a loader's ``input_name`` chose, for loading it: the host's progress bar
    follows the load (interrupts honoured), and a :class:`WeightFileError` raised meanwhile (wrong model, damaged
    or incomplete file) names that input, so the user knows which widget to change."""
    path = resolve(folder, name)
    try:
        with load_progress(progress_bar()):
            yield path
    except WeightFileError as e:
        raise type(e)(f"{input_name}: {e}") from None
