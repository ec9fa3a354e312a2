"""The gate file: safetensors with each head stored once and JSON metadata.

Tensors: `heads.<head>.<GateHead parameter>`, e.g. `heads.mid.feature_net.1.weight`.
Metadata (all strings, as safetensors requires):
  format          "maskattn-comfyui-gates"
  format_version  "1"
  config          MaskAttnConfig as JSON
  layer_heads     {"input.7.0": "mid", ...}: ComfyUI attn2 keys -> head names
  head_dims       {"mid": [feature_dim, token_dim, hidden_dim], ...}
  provenance      {"kind": "trained" | "untrained", "steps": ..., "base_model": ..., ...}

A file is read as untrusted input: every size is checked against the tensors really in
it before anything is allocated, and anything that does not fit is a GateFileError that
names the file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .config import MaskAttnConfig
from .gate_head import GateHead
from .gate_set import GateSet
from .layers import parse_layer_name

FORMAT_NAME = "maskattn-comfyui-gates"
FORMAT_VERSION = 1
_HEAD_NAME = re.compile(r"[A-Za-z0-9_]+")


class GateFileError(ValueError):
    """A gate file that cannot be read as MaskAttn gates; the message says why and what to do."""


def save_gate_file(gate_set: GateSet, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, then a rename. `dtype` float16 halves
    the file (the gates still compute in float32, from the rounded weights)."""
    path = Path(path)
    tensors = {f"heads.{name}": t.detach().to("cpu", dtype).contiguous()
               for name, t in gate_set.heads.state_dict().items()}
    config = gate_set.config.to_dict()
    if config.get("gate") == "hard":  # the paper's gate, and all that 0.1.0 readers know: leave the key out
        del config["gate"]
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config, sort_keys=True),
        "layer_heads": json.dumps(gate_set.layer_heads),
        "head_dims": json.dumps({n: [h.feature_dim, h.token_dim, h.hidden_dim] for n, h in gate_set.heads.items()},
                                sort_keys=True),
        "provenance": json.dumps(gate_set.provenance, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, save_tensors(tensors, metadata=metadata))
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old file or the new one, never a part.

    The file gets the mode any new file gets (0666 less the umask), unlike mkstemp's or
    safetensors' 0600: a ComfyUI server running as another user must be able to read it.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_gate_file(path: str | os.PathLike, data: bytes | None = None) -> GateSet:
    """A gate file, by path; `data`, when given, is its content already read (messages name `path`)."""
    path = Path(path)
    if data is None:
        if not path.is_file():
            raise GateFileError(f"gate file {str(path)!r} does not exist")
        data = path.read_bytes()
    meta = _metadata(data, path.name)
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, OSError) as error:
        raise GateFileError(f"{path.name} is truncated or corrupt ({error}): download or train it again") from error
    try:
        return _gate_set(meta, tensors)
    except (ValueError, TypeError, KeyError) as error:  # GateSetError is a ValueError; KeyError from nn.ModuleDict
        raise GateFileError(f"{path.name} does not hold a consistent MaskAttn gate set: {error}") from error


def _metadata(data: bytes, name: str) -> dict:
    """The parsed metadata, read from the safetensors header before any tensor."""
    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > len(data) - 8:
            raise ValueError(f"the header claims {size} bytes but the file has {len(data)}")
        header = json.loads(data[8:8 + size])
        raw = header.get("__metadata__") or {}
        if not isinstance(raw, dict):
            raise ValueError("its __metadata__ is not a JSON object")
    except (ValueError, AttributeError, RecursionError) as error:  # AttributeError: a header that is not an object
        raise GateFileError(f"{name} is not a readable safetensors file ({error}); "
                            "it may be truncated or corrupt: download or train it again") from error
    if raw.get("format") != FORMAT_NAME:
        raise GateFileError(f"{name} is a safetensors file but not a MaskAttn gate file "
                            f"(format {raw.get('format')!r}, expected {FORMAT_NAME!r}); did you pick a checkpoint or a LoRA?")
    try:
        version = int(raw["format_version"])
        parsed = {key: json.loads(raw[key], object_pairs_hook=_unique_keys)
                  for key in ("config", "layer_heads", "head_dims", "provenance")}
    except (KeyError, ValueError, TypeError, RecursionError) as error:
        raise GateFileError(f"{name}: damaged MaskAttn metadata ({error!r})") from error
    if version > FORMAT_VERSION:
        raise GateFileError(f"{name} uses gate file format {version}; this pack reads up to "
                            f"{FORMAT_VERSION}: update the MaskAttn node pack")
    if version < 1:
        raise GateFileError(f"{name}: damaged MaskAttn metadata (format_version {version})")
    parsed["format_version"] = version
    return parsed


def _gate_set(meta: dict, tensors: dict[str, torch.Tensor]) -> GateSet:
    config = MaskAttnConfig.from_dict(meta["config"])
    layer_heads, head_dims, provenance = meta["layer_heads"], meta["head_dims"], meta["provenance"]
    if not isinstance(layer_heads, dict) or not all(isinstance(v, str) for v in layer_heads.values()):
        raise ValueError(f"layer_heads must map layer names to head names, got {_short(layer_heads)}")
    for name in layer_heads:
        parse_layer_name(name)
    if not isinstance(head_dims, dict) or not head_dims:
        raise ValueError(f"head_dims must map head names to [feature_dim, token_dim, hidden_dim], got {_short(head_dims)}")
    if not isinstance(provenance, dict):
        raise ValueError(f"provenance must be a JSON object, got {_short(provenance)}")
    by_head: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        prefix, _, rest = key.partition(".")
        head_name, _, param = rest.partition(".")
        if prefix != "heads" or head_name not in head_dims:
            raise ValueError(f"tensor {key!r} belongs to no gate head of head_dims {sorted(head_dims)}")
        by_head.setdefault(head_name, {})[param] = tensor
    heads = {}
    for head_name, dims in head_dims.items():
        if not _HEAD_NAME.fullmatch(head_name):
            raise ValueError(f"head name {head_name!r} must be letters, digits and underscores")
        if not (isinstance(dims, list) and len(dims) == 3
                and all(isinstance(d, int) and not isinstance(d, bool) for d in dims)):
            raise ValueError(f"head_dims[{head_name!r}] must be three integers, got {_short(dims)}")
        try:
            heads[head_name] = GateHead.from_state_dict(by_head.get(head_name, {}), sizes=tuple(dims))
        except ValueError as error:
            raise ValueError(f"gate head {head_name!r}: {error}") from error
    return GateSet(config, heads, layer_heads, provenance)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all distinct (json.loads would keep the last of a repeated key)."""
    values = dict(pairs)
    if len(values) != len(pairs):
        repeated = sorted({key for key, _ in pairs if sum(k == key for k, _ in pairs) > 1})
        raise ValueError(f"the key(s) {repeated} appear more than once in one JSON object")
    return values


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
