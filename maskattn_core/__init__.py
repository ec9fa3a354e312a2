"""MaskAttn-SDXL in pure PyTorch: gate heads, hard gates, additive masks, layer selection,
and the gate file format. Nothing here imports ComfyUI."""

from .config import MaskAttnConfig, STAGES, PLACEMENTS, GATES
from .gate_head import GateHead
from .gating import (gate_probabilities, open_connections, hard_gate, straight_through, additive_mask,
                     closed_mask, closed_logit, soft_mask)
from .layers import LayerKey, layer_name, parse_layer_name, stage_of, location_of, select_layers
from .gate_set import GateSet, GateSetError
from .gate_file import save_gate_file, load_gate_file, GateFileError, FORMAT_NAME, FORMAT_VERSION
from .official import load_official_checkpoint, OfficialCheckpointError

__all__ = [
    "MaskAttnConfig", "STAGES", "PLACEMENTS", "GATES", "GateHead",
    "gate_probabilities", "open_connections", "hard_gate", "straight_through", "additive_mask", "closed_mask",
    "closed_logit", "soft_mask",
    "LayerKey", "layer_name", "parse_layer_name", "stage_of", "location_of", "select_layers",
    "GateSet", "GateSetError", "save_gate_file", "load_gate_file", "GateFileError",
    "FORMAT_NAME", "FORMAT_VERSION", "load_official_checkpoint", "OfficialCheckpointError",
]
