"""Find and import a ComfyUI outside its server (trainer, tests, benchmarks, the demo).

Inside a running ComfyUI none of this is needed: the pack is imported by ComfyUI itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent


class ComfyUINotFound(RuntimeError):
    pass


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """--comfyui PATH, then $COMFYUI_PATH, then the ComfyUI whose custom_nodes/ holds this pack,
    then the one scripts/setup.sh made."""
    candidates = [(explicit, "--comfyui"), (os.environ.get("COMFYUI_PATH"), "COMFYUI_PATH")]
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append((PACK_ROOT.parent.parent, "the ComfyUI holding this pack"))
    recorded = PACK_ROOT / ".comfyui_path"
    if recorded.is_file():
        candidates.append((recorded.read_text().strip(), "scripts/setup.sh"))
    candidates.append((PACK_ROOT / ".comfyui", "scripts/setup.sh"))
    for path, source in candidates:
        if not path:
            continue
        path = Path(path).expanduser().resolve()
        if (path / "comfy" / "model_management.py").is_file():
            return path
        if source in ("--comfyui", "COMFYUI_PATH"):
            raise ComfyUINotFound(f"{source} points at {path}, which is not a ComfyUI folder (no comfy/model_management.py)")
    raise ComfyUINotFound("no ComfyUI found: pass --comfyui PATH, set COMFYUI_PATH, install this pack in a "
                          "ComfyUI's custom_nodes/, or run scripts/setup.sh")


def comfyui_version(path: str | os.PathLike) -> str:
    """The version a ComfyUI folder declares in comfyui_version.py, read as text (nothing is executed)."""
    import re

    try:
        text = (Path(path) / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return "?"
    found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
    return found.group(1) if found else "?"


def boot(comfyui: str | os.PathLike | None = None, cpu: bool | None = None, **cli_args) -> Path:
    """Make `import comfy...` work in this process, with ComfyUI's arguments set by us, not sys.argv."""
    if "comfy.model_management" in sys.modules:
        return Path(sys.modules["comfy.model_management"].__file__).resolve().parent.parent
    path = find_comfyui(comfyui)
    # ComfyUI's top-level modules (nodes, server, execution) must win over same-named folders,
    # this pack's own nodes/ package included.
    if str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))
    if str(PACK_ROOT) not in sys.path:
        sys.path.append(str(PACK_ROOT))
    import comfy.options  # noqa: F401  (importing it first keeps comfy.cli_args from parsing our sys.argv)
    import comfy.cli_args  # parses no arguments: ComfyUI's defaults
    if cpu is None:
        import torch
        cpu = not torch.cuda.is_available()
    comfy.cli_args.args.cpu = bool(cpu)
    for name, value in cli_args.items():  # e.g. use_pytorch_cross_attention=True
        setattr(comfy.cli_args.args, name, value)
    import comfy.model_management  # noqa: F401
    import nodes  # binds the name to ComfyUI's nodes.py before anything can shadow it

    if Path(nodes.__file__).resolve().parent != path:
        raise ComfyUINotFound(f"`import nodes` found {nodes.__file__}, not ComfyUI's nodes.py in {path}: "
                              "something earlier on sys.path shadows ComfyUI")
    return path
