"""The gate file: safetensors with each head stored once and JSON metadata.

Tensors: `heads.<head>.<GateHead parameter>`, e.g. `heads.mid.feature_net.1.weight`.
Metadata (all strings, as safetensors requires):
  format          "maskattn-comfyui-gates"
  format_version  "1"
  config          MaskAttnConfig as JSON
  layer_heads     {"input.7.0": "mid", ...}: ComfyUI attn2 keys -> head names
  head_dims       {"mid": [feature_dim, token_dim, hidden_dim], ...}
  provenance      {"kind": "trained" | "untrained", "steps": ..., "base_model": ..., ...}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import MaskAttnConfig
from .gate_head import GateHead
from .gate_set import GateSet, GateSetError
from .layers import parse_layer_name

FORMAT_NAME = "maskattn-comfyui-gates"
FORMAT_VERSION = 1


class GateFileError(ValueError):
    """A gate file that cannot be read as MaskAttn gates; the message says why and what to do."""


def save_gate_file(gate_set: GateSet, path: str | os.PathLike) -> Path:
    """Write atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    tensors = {f"heads.{name}": t.detach().to("cpu", torch.float32).contiguous()
               for name, t in gate_set.heads.state_dict().items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(gate_set.config.to_dict(), sort_keys=True),
        "layer_heads": json.dumps(gate_set.layer_heads),
        "head_dims": json.dumps({n: [h.feature_dim, h.token_dim, h.hidden_dim] for n, h in gate_set.heads.items()},
                                sort_keys=True),
        "provenance": json.dumps(gate_set.provenance, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a gate file, parsed, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise GateFileError(f"{Path(path).name} is not a readable safetensors file ({error}); "
                            "it may be truncated or corrupt: download or train it again") from error
    if raw.get("format") != FORMAT_NAME:
        raise GateFileError(f"{Path(path).name} is a safetensors file but not a MaskAttn gate file "
                            f"(format {raw.get('format')!r}, expected {FORMAT_NAME!r}); did you pick a checkpoint or a LoRA?")
    try:
        version = int(raw["format_version"])
        parsed = {key: json.loads(raw[key]) for key in ("config", "layer_heads", "head_dims", "provenance")}
    except (KeyError, ValueError) as error:
        raise GateFileError(f"{Path(path).name}: damaged MaskAttn metadata ({error})") from error
    if version > FORMAT_VERSION:
        raise GateFileError(f"{Path(path).name} uses gate file format {version}; this pack reads up to "
                            f"{FORMAT_VERSION}: update the MaskAttn node pack")
    parsed["format_version"] = version
    return parsed


def load_gate_file(path: str | os.PathLike) -> GateSet:
    path = Path(path)
    if not path.is_file():
        raise GateFileError(f"gate file {str(path)!r} does not exist")
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise GateFileError(f"{path.name} is truncated or corrupt ({error}): download or train it again") from error
    try:
        config = MaskAttnConfig.from_dict(meta["config"])
        for name in meta["layer_heads"]:
            parse_layer_name(name)
        heads = {}
        for head_name, (feature_dim, token_dim, hidden_dim) in meta["head_dims"].items():
            head = GateHead(int(feature_dim), int(token_dim), int(hidden_dim))
            prefix = f"heads.{head_name}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            head.load_state_dict(state, strict=True)
            heads[head_name] = head
        stray = sorted(k for k in tensors if k.split(".")[1] not in heads)
        if stray:
            raise GateSetError(f"tensors {stray[:3]} belong to no gate head")
        return GateSet(config, heads, meta["layer_heads"], meta["provenance"])
    except (ValueError, RuntimeError, TypeError, IndexError) as error:
        raise GateFileError(f"{path.name} does not hold a consistent MaskAttn gate set: {error}") from error
