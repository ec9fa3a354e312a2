"""The `models/maskattn` folder and reading gate files from it."""

from __future__ import annotations

import hashlib
import os
import time
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
    # The gates trained for the pack's Shapes world, so the Loader lists them beside the user's own.
    shapes_gates = str(Path(__file__).resolve().parent.parent / "maskattn_shapes" / "gates")
    if shapes_gates not in folder_paths.folder_names_and_paths[FOLDER][0]:
        folder_paths.folder_names_and_paths[FOLDER][0].append(shapes_gates)


def gate_names() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def gate_path(name: str) -> str:
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
        raise FileNotFoundError(f"MaskAttn gate file {name!r} was not found in {folders}. Put trained gates there "
                                "(python trainer/train.py writes them) and refresh the page.")
    return path


def gate_fingerprint(name: str) -> str:
    """A hash of the gate file's content: ComfyUI re-runs the Loader when it changes."""
    try:
        return content_hash(gate_path(name))
    except OSError:  # missing or unreadable: the Loader's own run says so
        return f"unreadable {name}"


_hashes: dict[str, tuple[tuple, str]] = {}
_gate_sets: dict[str, tuple[str, GateSet]] = {}


def content_hash(path: str) -> str:
    """blake2b of the file's content; re-read only when its stat changes.

    The stat includes the inode and ctime, which `cp -p`, rsync and unzip cannot preserve; a
    stat younger than two seconds is not remembered, since a write within the same timestamp
    tick would not change it (git's "racy clean" rule).
    """
    stat = os.stat(path)
    stamp = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    known = _hashes.get(path)
    if known is not None and known[0] == stamp:
        return known[1]
    digest = _digest(Path(path).read_bytes())
    if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > 2_000_000_000:
        _hashes[path] = (stamp, digest)
    return digest


def load_gates(name: str) -> GateSet:
    """Our safetensors gate files or the authors' `.pt` checkpoints, by name in models/maskattn.

    Cached by content, so a file rewritten in place (same size, same mtime) is read again.
    """
    path = gate_path(name)
    data = Path(path).read_bytes()  # read once: what is hashed is what is parsed
    digest = _digest(data)
    cached = _gate_sets.get(path)
    if cached is not None and cached[0] == digest:
        return cached[1]
    suffix = Path(path).suffix.lower()
    gate_set = load_official_checkpoint(path, data) if suffix in OFFICIAL else load_gate_file(path, data)
    _gate_sets[path] = (digest, gate_set)
    return gate_set


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()
