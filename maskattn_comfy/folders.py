"""The `models/maskattn` folder and reading gate files from it."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
from maskattn_core import GateSet, load_gate_file, load_official_checkpoint

FOLDER = "maskattn"
OURS = (".safetensors",)
OFFICIAL = (".pt", ".pth")


def register_folder() -> None:
    """Make models/maskattn a model folder (extra_model_paths.yaml may add more under `maskattn`)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(OURS + OFFICIAL))
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(OURS + OFFICIAL))
    os.makedirs(default, exist_ok=True)


def gate_names() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


_cache: dict[str, tuple[tuple, GateSet]] = {}


def load_gates(name: str) -> GateSet:
    """Our safetensors gate files or the authors' `.pt` checkpoints, by name in models/maskattn."""
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
        raise FileNotFoundError(f"MaskAttn gate file {name!r} was not found in {folders}. Put trained gates there "
                                "(python trainer/train.py writes them) and refresh the page.")
    stat = os.stat(path)
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _cache.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    suffix = Path(path).suffix.lower()
    gate_set = load_official_checkpoint(path) if suffix in OFFICIAL else load_gate_file(path)
    _cache[path] = (stamp, gate_set)
    return gate_set
