"""The MaskAttn configuration, with the paper's defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Mapping

import torch

STAGES = ("high", "mid", "low", "all")
PLACEMENTS = ("encoder", "decoder", "encoder_decoder")
GATES = ("hard", "soft")


@dataclass(frozen=True)
class MaskAttnConfig:
    """Which cross-attention layers carry gates and how the gates decide.

    Defaults are the paper's: mid stage, encoder and decoder, threshold 0.5, closed
    connections at -10000, gate hidden size 128, one head shared by each stage, the hard
    gate. `gate="soft"` is the ablation: each connection's attention weight is scaled by
    its gate probability (log p added to the logit, no lower than negative_value) in the
    forward pass as well as the backward one.
    """

    stage: str = "mid"
    placement: str = "encoder_decoder"
    threshold: float = 0.5
    negative_value: float = -10000.0
    gate_hidden_dim: int = 128
    share_heads_by_stage: bool = True
    gate: str = "hard"

    def __post_init__(self) -> None:
        # Values may come from a file: check types too ("0.5" or true as a threshold must not pass).
        if not isinstance(self.stage, str) or self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if not isinstance(self.placement, str) or self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if not _is_real(self.threshold) or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1], got {self.threshold!r}")
        # The mask is built in float32: a value beyond its range fails only when a sampler first builds a mask.
        if not _is_real(self.negative_value) or not -_FLOAT32_MAX <= self.negative_value < 0.0:
            raise ValueError(f"negative_value must be a finite negative number no lower than float32's "
                             f"{-_FLOAT32_MAX:.8g} (the paper's is -10000), got {self.negative_value!r}")
        if not isinstance(self.gate_hidden_dim, int) or isinstance(self.gate_hidden_dim, bool) or self.gate_hidden_dim <= 0:
            raise ValueError(f"gate_hidden_dim must be a positive integer, got {self.gate_hidden_dim!r}")
        if not isinstance(self.share_heads_by_stage, bool):
            raise ValueError(f"share_heads_by_stage must be true or false, got {self.share_heads_by_stage!r}")
        if not isinstance(self.gate, str) or self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "negative_value", float(self.negative_value))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MaskAttnConfig":
        """Build from a mapping; the authors' key `share_gate_heads_by_stage` is accepted."""
        if not isinstance(values, Mapping):
            raise ValueError(f"a MaskAttn config must be a mapping of names to values, got {type(values).__name__}")
        values = dict(values)
        if "share_gate_heads_by_stage" in values:
            values.setdefault("share_heads_by_stage", values.pop("share_gate_heads_by_stage"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in set(values) - known)
        if unknown:
            raise ValueError(f"unknown MaskAttn config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _is_real(value) -> bool:
    """An int or float that is not a bool and not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
