"""The authors' gate checkpoints (`gate_*.pt`, format "maskattn-sdxl-gates-v1"), read safely.

They are pickles of dicts, lists, numbers and tensors, so `torch.load(weights_only=True)`
reads them; anything that needs code to unpickle is refused before any of it runs. Their
layers are diffusers processor names and a shared head repeats under every layer's prefix;
we map the names to ComfyUI keys and keep each shared head once.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch

from .config import MaskAttnConfig
from .gate_head import GateHead
from .gate_set import GateSet
from .layers import from_diffusers_name, layer_name, stage_of

OFFICIAL_FORMAT = "maskattn-sdxl-gates-v1"
_HEAD_MARK = ".gate_head."


class OfficialCheckpointError(ValueError):
    """An authors' checkpoint that cannot be read safely or does not hold MaskAttn gates."""


def _read(path: Path, data: bytes | None) -> dict:
    try:
        return torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise OfficialCheckpointError(
            f"{path.name} was refused: it needs code to unpickle, which this pack never runs "
            f"(torch.load weights_only=True said: {str(error).splitlines()[0]}). Only plain-data MaskAttn "
            "checkpoints (dicts, numbers, tensors) can be imported") from error
    except Exception as error:  # noqa: BLE001 - any failure to unpickle plain data is a damaged file
        raise OfficialCheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({error!r}); "
                                      "it may be truncated or corrupt") from error


def load_official_checkpoint(path: str | os.PathLike, data: bytes | None = None) -> GateSet:
    """An authors' checkpoint, by path; `data`, when given, is its content already read (messages name `path`)."""
    path = Path(path)
    if data is None and not path.is_file():
        raise OfficialCheckpointError(f"checkpoint {str(path)!r} does not exist")
    checkpoint = _read(path, data)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != OFFICIAL_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise OfficialCheckpointError(f"{path.name} is not an official MaskAttn-SDXL gate checkpoint "
                                      f"(format {found!r}, expected {OFFICIAL_FORMAT!r})")
    try:
        return _gate_set(checkpoint, path.name)
    except (ValueError, TypeError, KeyError) as error:  # GateSetError is a ValueError; KeyError from nn.ModuleDict
        raise OfficialCheckpointError(f"{path.name} does not hold usable MaskAttn-SDXL gates: {error}") from error


def _gate_set(checkpoint: dict, file_name: str) -> GateSet:
    config = MaskAttnConfig.from_dict(_field(checkpoint, "maskattn_config", dict))
    state_dict = _field(checkpoint, "gate_state_dict", dict)
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        prefix, mark, param = key.partition(_HEAD_MARK) if isinstance(key, str) else ("", "", "")
        if not mark:
            raise ValueError(f"unexpected entry {key!r} in the gate state dict")
        if isinstance(tensor, torch.Tensor):
            _require_dense_cpu(key, tensor)
        by_layer.setdefault(prefix, {})[param] = tensor
    selected = checkpoint.get("selected_layers")
    if selected is not None and (not isinstance(selected, (list, tuple))
                                 or not all(isinstance(name, str) for name in selected)):
        raise ValueError(f"selected_layers must be a list of layer names, got a {type(selected).__name__}")
    selected = selected or list(by_layer)
    # Every head kept is a float32 copy of stored values: at most twice the bytes the file stores
    # (float16 doubles), whatever its tensors' shapes and strides claim.
    stored = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
              for t in state_dict.values() if isinstance(t, torch.Tensor)}
    budget = 2 * sum(stored.values())
    heads: dict[str, GateHead] = {}
    layer_heads: dict[str, str] = {}
    for processor_name in selected:
        key = from_diffusers_name(processor_name)
        if layer_name(key) in layer_heads:
            raise ValueError(f"selected layer {processor_name!r} is layer {layer_name(key)}, which is listed twice")
        state = by_layer.get(processor_name.partition(_HEAD_MARK)[0])
        if state is None:
            raise ValueError(f"selected layer {processor_name!r} has no gate tensors")
        head_name = stage_of(key) if config.share_heads_by_stage else layer_name(key).replace(".", "_")
        try:
            if head_name in heads:
                _require_same(heads[head_name], state, head_name)
            else:
                sizes = GateHead.sizes_of(state)
                budget -= 4 * sum(t.numel() for t in state.values())
                if budget < 0:
                    raise ValueError("its gate heads claim more data than the file stores "
                                     "(tensors that share or repeat stored values)")
                heads[head_name] = GateHead.from_state_dict(state, sizes)
        except ValueError as error:
            raise ValueError(f"layer {processor_name}: {error}") from error
        layer_heads[layer_name(key)] = head_name
    step = checkpoint.get("global_step")
    provenance = {
        "kind": "trained" if checkpoint.get("checkpoint_kind") == "trained" else "untrained",
        "steps": step if isinstance(step, int) and not isinstance(step, bool) else None,
        "source": f"official MaskAttn-SDXL checkpoint {file_name}",
    }
    return GateSet(config, heads, layer_heads, provenance)


def _require_dense_cpu(key: str, tensor: torch.Tensor) -> None:
    """Gate weights are plain tensors: torch.load(weights_only=True) also rebuilds sparse, nested and meta
    tensors, whose storage (read by every later check) cannot be accessed or holds no values."""
    if tensor.is_nested:
        found = "a nested tensor"
    elif tensor.layout != torch.strided:
        found = f"a {str(tensor.layout).removeprefix('torch.')} tensor"
    elif tensor.device.type != "cpu":  # map_location="cpu" moves every device's tensors but meta's, which hold no values
        found = f"a tensor on device {tensor.device.type}"
    else:
        return
    raise ValueError(f"{key} is {found}; gate weights must be dense (strided) CPU tensors of floating-point values: "
                     "save the checkpoint again with plain tensors (.to_dense(), .cpu())")


def _field(checkpoint: dict, name: str, kind: type):
    if name not in checkpoint:
        raise ValueError(f"it has no {name!r}")
    if not isinstance(checkpoint[name], kind):
        raise ValueError(f"its {name!r} is a {type(checkpoint[name]).__name__}, expected a {kind.__name__}")
    return checkpoint[name]


def _require_same(kept: GateHead, state: dict, head_name: str) -> None:
    """A layer's copy of a shared head must equal the head kept (checked without building another)."""
    GateHead.sizes_of(state)
    for name, a in kept.state_dict().items():
        b = state[name]
        if a.shape != b.shape or not torch.equal(a, b.to(torch.float32)):
            raise ValueError(f"the checkpoint says heads are shared by stage, but its {name} differs from "
                             f"the other {head_name!r} layers")
