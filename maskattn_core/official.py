"""The authors' gate checkpoints (`gate_*.pt`, format "maskattn-sdxl-gates-v1"), read safely.

They are pickles of dicts, lists, numbers and tensors, so `torch.load(weights_only=True)`
reads them; anything that needs code to unpickle is refused before any of it runs. Their
layers are diffusers processor names and a shared head repeats under every layer's prefix;
we map the names to ComfyUI keys and keep each shared head once.
"""

from __future__ import annotations

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


def _read(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise OfficialCheckpointError(
            f"{path.name} was refused: it needs code to unpickle, which this pack never runs "
            f"(torch.load weights_only=True said: {str(error).splitlines()[0]}). Only plain-data MaskAttn "
            "checkpoints (dicts, numbers, tensors) can be imported") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise OfficialCheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({error}); "
                                      "it may be truncated or corrupt") from error


def load_official_checkpoint(path: str | os.PathLike) -> GateSet:
    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"checkpoint {str(path)!r} does not exist")
    checkpoint = _read(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != OFFICIAL_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise OfficialCheckpointError(f"{path.name} is not an official MaskAttn-SDXL gate checkpoint "
                                      f"(format {found!r}, expected {OFFICIAL_FORMAT!r})")
    try:
        config = MaskAttnConfig.from_dict(checkpoint["maskattn_config"])
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in checkpoint["gate_state_dict"].items():
            prefix, mark, param = key.partition(_HEAD_MARK)
            if not mark:
                raise OfficialCheckpointError(f"unexpected tensor {key!r} in the gate state dict")
            by_layer.setdefault(prefix, {})[param] = tensor
        heads: dict[str, GateHead] = {}
        layer_heads: dict[str, str] = {}
        for processor_name in checkpoint.get("selected_layers") or by_layer:
            key = from_diffusers_name(processor_name)
            prefix = processor_name.partition(_HEAD_MARK)[0]
            state = by_layer.get(prefix)
            if state is None:
                raise OfficialCheckpointError(f"selected layer {processor_name!r} has no gate tensors")
            head_name = stage_of(key) if config.share_heads_by_stage else layer_name(key).replace(".", "_")
            head = _head_from_state(state)
            if head_name in heads:
                _require_same(heads[head_name], head, head_name, processor_name)
            else:
                heads[head_name] = head
            layer_heads[layer_name(key)] = head_name
    except (KeyError, TypeError, AttributeError) as error:
        raise OfficialCheckpointError(f"{path.name} is missing part of the official layout: {error!r}") from error
    provenance = {
        "kind": "trained" if checkpoint.get("checkpoint_kind") == "trained" else "untrained",
        "steps": checkpoint.get("global_step"),
        "source": f"official MaskAttn-SDXL checkpoint {path.name}",
    }
    return GateSet(config, heads, layer_heads, provenance)


def _head_from_state(state: dict[str, torch.Tensor]) -> GateHead:
    hidden, feature_dim = state["feature_net.1.weight"].shape
    token_dim = state["token_net.1.weight"].shape[1]
    head = GateHead(int(feature_dim), int(token_dim), int(hidden))
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as error:
        raise OfficialCheckpointError(f"gate head tensors do not fit a MaskAttn gate head: {error}") from error
    return head


def _require_same(kept: GateHead, other: GateHead, head_name: str, processor_name: str) -> None:
    for (name, a), b in zip(kept.state_dict().items(), other.state_dict().values()):
        if a.shape != b.shape or not torch.equal(a, b):
            raise OfficialCheckpointError(
                f"the checkpoint says heads are shared by stage, but {processor_name}'s {name} differs from "
                f"the other {head_name!r} layers")
