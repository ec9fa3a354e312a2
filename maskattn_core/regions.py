"""Region masks on text tokens: a user's mask, at each cross-attention layer's grid, as an additive logit mask.

A region confines some token positions to part of the image. At a location whose resized mask value is m
(1 inside, 0 outside, between at soft or resized edges) each confined token's attention weight is multiplied
by 1 - strength * (1 - m) before the softmax renormalises: an additive logit log(1 - strength * (1 - m)),
never below the paper's closed value (-10000). Strength 1 with m = 0 is the paper's hard mask; below 1 a
location outside keeps (1 - strength) of the weight, as MaskAttn Loader's strength.

Geometry: the mask covers the whole image. It is first averaged onto the latent grid (box average of the
pixels each latent cell covers), then a layer `level` stride-2 downsamples deep sees blocks of
2**level x 2**level latent cells, the last block of a side cut off where the side is not a multiple
(ComfyUI's UNet rounds those sides up); each layer cell is the mean of the latent cells it holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NEGATIVE_VALUE = -10000.0


def as_mask_batch(mask: Tensor) -> Tensor:
    """A MASK ([H, W] or [B, H, W], values in [0, 1]) as float32 [B, H, W]; anything else is a ValueError."""
    if not isinstance(mask, Tensor) or mask.ndim not in (2, 3) or 0 in mask.shape:
        raise ValueError(f"a region mask must be a [height, width] or [batch, height, width] tensor; got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    mask = mask.detach().float()
    return mask[None] if mask.ndim == 2 else mask


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, H, W] mask at any resolution -> [B, h, w] on the latent grid: each cell the mean of the pixels it
    covers (adaptive average pooling; a mask smaller than the latent repeats its pixels)."""
    return F.adaptive_avg_pool2d(mask[:, None], size)[:, 0]


def level_of(size: tuple[int, int], grid: tuple[int, int]) -> int:
    """The number of stride-2 downsamples (sides rounded up) that take a latent of `size` to `grid`."""
    height, width = size
    level = 0
    while (-(-height // 2 ** level), -(-width // 2 ** level)) != tuple(grid):
        if 2 ** level >= max(height, width):
            raise ValueError(f"a {grid[0]}x{grid[1]} layer grid is no UNet level of a {height}x{width} latent")
        level += 1
    return level


def layer_mask(latent: Tensor, grid: tuple[int, int]) -> Tensor:
    """[B, H, W] latent-grid mask -> [B, h, w] at a layer's grid: means of 2**level blocks, edge blocks cut off."""
    step = 2 ** level_of(tuple(latent.shape[-2:]), grid)
    if step == 1:
        return latent
    # ceil_mode: the cut-off last block is a window of its own, averaged over the cells it holds.
    return F.avg_pool2d(latent[:, None], step, step, ceil_mode=True)[:, 0]


def region_logits(inside: Tensor, strength: float, negative_value: float = NEGATIVE_VALUE) -> Tensor:
    """Mask values m in [0, 1] -> additive logits log(1 - strength * (1 - m)), at least `negative_value`."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"a region's strength must lie in [0, 1], got {strength}")
    kept = 1.0 - strength * (1.0 - inside.clamp(0.0, 1.0))
    return torch.log(kept).clamp_min(negative_value)  # log(0) = -inf -> the closed value


def repeated_positions(positions, prompt_length: int, tokens: int) -> list[int]:
    """A prompt's token positions in a context of `tokens` columns: ComfyUI repeats a shorter prompt whole up to
    the longest one batched with it (conds.py), so position p is also p + prompt_length, p + 2 prompt_length..."""
    if tokens % prompt_length:
        raise ValueError(f"the region's prompt has {prompt_length} token columns, but cross-attention got a context "
                         f"of {tokens}, not a whole number of copies of it: the prompt given to MaskAttn Region "
                         "is not the one being sampled")
    return [p + copy * prompt_length for copy in range(tokens // prompt_length) for p in positions]
