"""The MaskAttn configuration, with the paper's defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

STAGES = ("high", "mid", "low", "all")
PLACEMENTS = ("encoder", "decoder", "encoder_decoder")


@dataclass(frozen=True)
class MaskAttnConfig:
    """Which cross-attention layers carry gates and how the gates decide.

    Defaults are the paper's: mid stage, encoder and decoder, threshold 0.5, closed
    connections at -10000, gate hidden size 128, one head shared by each stage.
    """

    stage: str = "mid"
    placement: str = "encoder_decoder"
    threshold: float = 0.5
    negative_value: float = -10000.0
    gate_hidden_dim: int = 128
    share_heads_by_stage: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        if not float(self.negative_value) < 0.0:
            raise ValueError(f"negative_value must be negative, got {self.negative_value}")
        if int(self.gate_hidden_dim) <= 0:
            raise ValueError(f"gate_hidden_dim must be positive, got {self.gate_hidden_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MaskAttnConfig":
        """Build from a mapping; the authors' key `share_gate_heads_by_stage` is accepted."""
        values = dict(values)
        if "share_gate_heads_by_stage" in values:
            values.setdefault("share_heads_by_stage", values.pop("share_gate_heads_by_stage"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MaskAttn config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)
