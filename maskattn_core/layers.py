"""SDXL's cross-attention layers in ComfyUI's keys, and which of them carry gates.

A layer is ComfyUI's attn2 key (block_name, number, transformer_index), e.g.
("input", 7, 3): the fourth transformer block of input block 7. Its name is "input.7.3".

The authors' stages, in ComfyUI blocks (diffusers names in brackets):
high = input 4,5 + output 3,4,5 (down_blocks.1, up_blocks.1),
mid  = input 7,8 + output 0,1,2 (down_blocks.2, up_blocks.0),
low  = middle 0 (mid_block).
Placement "encoder" takes input blocks, "decoder" output blocks, and
"encoder_decoder" both plus the middle block.
"""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple

from .config import MaskAttnConfig


class LayerKey(NamedTuple):
    block_name: str
    number: int
    transformer_index: int


_STAGE_OF_BLOCK = {
    ("input", 4): "high", ("input", 5): "high",
    ("input", 7): "mid", ("input", 8): "mid",
    ("middle", 0): "low",
    ("output", 0): "mid", ("output", 1): "mid", ("output", 2): "mid",
    ("output", 3): "high", ("output", 4): "high", ("output", 5): "high",
}
_LOCATION_OF_BLOCK = {"input": "encoder", "middle": "bridge", "output": "decoder"}

# diffusers prefix <-> ComfyUI block, per the authors' stage naming.
_DIFFUSERS_BLOCKS = {
    "down_blocks.1.attentions.0": ("input", 4), "down_blocks.1.attentions.1": ("input", 5),
    "down_blocks.2.attentions.0": ("input", 7), "down_blocks.2.attentions.1": ("input", 8),
    "mid_block.attentions.0": ("middle", 0),
    "up_blocks.0.attentions.0": ("output", 0), "up_blocks.0.attentions.1": ("output", 1),
    "up_blocks.0.attentions.2": ("output", 2),
    "up_blocks.1.attentions.0": ("output", 3), "up_blocks.1.attentions.1": ("output", 4),
    "up_blocks.1.attentions.2": ("output", 5),
}


def layer_name(key: LayerKey) -> str:
    return f"{key[0]}.{key[1]}.{key[2]}"


# Canonical names only: ASCII digits without leading zeros, so that each layer has exactly one name
# (str.isdigit() and int() also take "04" and Arabic-Indic digits, which name no key ComfyUI looks up).
_INDEX = r"(?:0|[1-9][0-9]{0,5})"
_LAYER_NAME = re.compile(rf"(input|middle|output)\.({_INDEX})\.({_INDEX})")


def parse_layer_name(name: str) -> LayerKey:
    match = _LAYER_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"{name!r} is not a layer name of the form 'input.7.0' (block_name.number.transformer_index, "
                         "ASCII digits without leading zeros)")
    return LayerKey(match[1], int(match[2]), int(match[3]))


def stage_of(key: LayerKey) -> str | None:
    """'high', 'mid' or 'low' for SDXL's gateable layers, None for any other layer."""
    return _STAGE_OF_BLOCK.get((key[0], key[1]))


def location_of(key: LayerKey) -> str:
    return _LOCATION_OF_BLOCK[key[0]]


def _placed(key: LayerKey, placement: str) -> bool:
    location = location_of(key)
    if placement == "encoder_decoder":
        return True
    return location == placement


def select_layers(available: Iterable[LayerKey], config: MaskAttnConfig) -> list[LayerKey]:
    """The layers of `available` that carry gates under `config`, in a stable order."""
    chosen = []
    for key in available:
        stage = stage_of(key)
        if stage is None or not _placed(key, config.placement):
            continue
        if config.stage == "all" or stage == config.stage:
            chosen.append(LayerKey(*key))
    if not chosen:
        raise ValueError(
            f"no SDXL cross-attention layer matches stage={config.stage!r}, placement={config.placement!r} "
            "(the middle block is only gated with placement 'encoder_decoder')"
        )
    return sorted(chosen, key=layer_order)


def layer_order(key: LayerKey) -> tuple:
    """Sort key: the order in which the UNet runs its input, middle and output blocks."""
    return ({"input": 0, "middle": 1, "output": 2}[key[0]], key[1], key[2])


def from_diffusers_name(name: str) -> LayerKey:
    """'down_blocks.2.attentions.0.transformer_blocks.1.attn2.processor' -> ('input', 7, 1)."""
    head, sep, tail = name.partition(".transformer_blocks.")
    index = tail.split(".", 1)[0]
    if not sep or head not in _DIFFUSERS_BLOCKS or not re.fullmatch(_INDEX, index) or ".attn2" not in "." + tail:
        raise ValueError(f"{name!r} is not an SDXL cross-attention (attn2) layer name this pack knows")
    block_name, number = _DIFFUSERS_BLOCKS[head]
    return LayerKey(block_name, number, int(index))
