"""A set of gate heads and the layers they serve."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Mapping

import torch
from torch import nn

from .config import MaskAttnConfig
from .gate_head import GateHead
from .layers import LayerKey, layer_name, layer_order, parse_layer_name, select_layers, stage_of


class GateSetError(ValueError):
    """A gate set that does not fit a model, or is inconsistent in itself."""


class GateSet(nn.Module):
    """Gate heads (`heads`, by head name) and the layer -> head map (`layer_heads`, by layer name).

    With heads shared by stage the head names are the stages ("mid"); otherwise each layer
    has its own head, named after the layer with underscores ("input_7_0").
    """

    def __init__(self, config: MaskAttnConfig, heads: Mapping[str, GateHead], layer_heads: Mapping[str, str],
                 provenance: Mapping | None = None):
        super().__init__()
        if not layer_heads:
            raise GateSetError("the gate set gates no layer (its layer map is empty), so it would change nothing: "
                               "use gates trained for at least one cross-attention layer")
        missing = sorted(set(layer_heads.values()) - set(heads))
        if missing:
            raise GateSetError(f"layers refer to gate heads {missing} that the gate set does not hold")
        self.config = config
        self.heads = nn.ModuleDict(dict(heads))
        self.layer_heads = {name: layer_heads[name] for name in sorted(layer_heads, key=lambda n: layer_order(parse_layer_name(n)))}
        self.provenance = dict(provenance or {"kind": "untrained"})

    @classmethod
    def create(cls, config: MaskAttnConfig, layer_channels: Mapping[LayerKey, int], token_dim: int = 2048,
               seed: int | None = None, provenance: Mapping | None = None) -> "GateSet":
        """New (untrained) gates for the layers of a model, given each attn2 layer's channel width."""
        layers = select_layers(layer_channels, config)
        generator = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
        heads: dict[str, GateHead] = {}
        layer_heads: dict[str, str] = {}
        with generator:
            if seed is not None:
                torch.manual_seed(seed)
            for key in layers:
                head_name = stage_of(key) if config.share_heads_by_stage else layer_name(key).replace(".", "_")
                channels = int(layer_channels[key])
                if head_name in heads and heads[head_name].feature_dim != channels:
                    raise GateSetError(
                        f"layer {layer_name(key)} has {channels} channels but shares the {head_name!r} gate head "
                        f"with {heads[head_name].feature_dim}-channel layers; use one head per layer")
                if head_name not in heads:
                    heads[head_name] = GateHead(channels, token_dim, config.gate_hidden_dim)
                layer_heads[layer_name(key)] = head_name
        return cls(config, heads, layer_heads, provenance)

    @property
    def layers(self) -> list[LayerKey]:
        return [parse_layer_name(name) for name in self.layer_heads]

    def head_for(self, key: LayerKey) -> GateHead:
        return self.heads[self.layer_heads[layer_name(key)]]

    def check_fits(self, layer_channels: Mapping[LayerKey, int], token_dim: int) -> None:
        """Raise GateSetError naming every layer this gate set needs that the model lacks or has at another width."""
        problems = []
        for name, head_name in self.layer_heads.items():
            key = parse_layer_name(name)
            head = self.heads[head_name]
            if key not in layer_channels:
                problems.append(f"{name}: not in the model")
            elif int(layer_channels[key]) != head.feature_dim:
                problems.append(f"{name}: model has {layer_channels[key]} channels, gate expects {head.feature_dim}")
        if problems:
            raise GateSetError("these gates do not fit this model's cross-attention layers: " + "; ".join(problems))
        widths = {head.token_dim for head in self.heads.values()}
        if widths != {int(token_dim)}:
            raise GateSetError(f"these gates read {sorted(widths)}-wide text tokens but the model's context is {token_dim} wide")

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

