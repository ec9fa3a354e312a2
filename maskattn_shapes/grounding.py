"""Word grounding for training the Shapes base: each object's words attend where the object is.

SDXL's cross-attention maps put a word where its object is drawn (what prompt-to-prompt, DenseDiffusion
and MaskAttn itself build on). A small base trained on the noise loss alone need not: v1 read its
caption from the pooled vector, an attention-free encoder's base from a few sink tokens (EVIDENCE.md).
Base v2 is trained with the noise loss plus this auxiliary loss (as TokenCompose, CVPR 2024, adds to
Stable Diffusion), on the world's own geometry, at every cross-attention layer:

- **pixel**: at an object's cells, the share of the attention (mean over heads) on that object's
  colour and shape tokens; the loss is 1 minus it, weighted by how much of each cell the object covers.
- **token**: each of the object's tokens' attention, as a map over the cells (normalised to sum 1),
  should lie on its object: the loss is 1 minus the coverage-weighted share of the map.

Nothing supervises the background's cells, the other words, or which object goes where: the base
still places objects by itself. It does teach binding (each colour word's map is pulled onto its own
object): the longer a base trains with it, the fewer own-colour errors it makes (EVIDENCE.md).
Only rows with a caption (not the 10 % dropped for guidance) count.

With `nouns=True` (TokenCompose grounds nouns only) the token loss grounds each object's shape word
alone, and the pixel loss asks an object's cells to attend to the objects' words, any object's: the
words still carry the objects to the picture, but nothing tells a colour word which object is its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_OBJECTS = 3
TOKENS = 77


def object_tokens(clip, scene, nouns: bool = False) -> np.ndarray:
    """[MAX_OBJECTS, TOKENS] bool: the token columns of each object's colour and shape words in its
    caption (found as MaskAttn Region finds them: "cyan" is two tokens), in scene.objects order; an object
    the caption names by its shape alone (world.without_colours), or every object with `nouns`, has its
    shape's columns only."""
    from maskattn_comfy.regions import word_positions

    found = np.zeros((MAX_OBJECTS, TOKENS), bool)
    for j, obj in enumerate(scene.objects):
        coloured = not nouns and f"{obj.color} {obj.shape}" in scene.caption
        named = f"{obj.color}, {obj.shape}" if coloured else obj.shape
        positions, _ = word_positions(clip, scene.caption, named)
        found[j, positions] = True
    return found


def object_coverage(scene, side: int) -> np.ndarray:
    """[MAX_OBJECTS, side * side] float32: the share of each of side x side cells each object covers."""
    from maskattn_shapes.world import Obj, _coverage

    scale = side / scene.size
    cells = np.arange(side, dtype=np.float64)
    coverage = np.zeros((MAX_OBJECTS, side * side), np.float32)
    for j, o in enumerate(scene.objects):
        small = Obj(o.color, o.shape, o.cx * scale, o.cy * scale, o.extent * scale)
        coverage[j] = _coverage(small, cells, cells).reshape(-1)
    return coverage


class GroundingTargets:
    """Per training scene: its objects' token columns for the token loss (`tokens`) and for the pixel
    loss (`pixel_tokens`: the same, or with `nouns` every object's words for each object), and their
    coverage at each latent side."""

    def __init__(self, scenes, clip, sides=(8, 4), nouns: bool = False):
        by_caption, by_layout = {}, {}  # a caption's columns and a layout's coverage are computed once

        def columns(s, only_nouns):
            key = (s.caption, tuple((o.color, o.shape) for o in s.objects), only_nouns)
            if key not in by_caption:
                by_caption[key] = object_tokens(clip, s, only_nouns)
            return by_caption[key]

        def coverage(s, side):  # a recaptioned scene (world.without_colours) shares its picture's layout
            key = (s.objects, s.size, side)
            if key not in by_layout:
                by_layout[key] = object_coverage(s, side)
            return by_layout[key]

        self.tokens = torch.from_numpy(np.stack([columns(s, nouns) for s in scenes]))
        self.pixel_tokens = self.tokens
        if nouns:
            words = torch.from_numpy(np.stack([columns(s, False) for s in scenes]))  # [S, J, T]
            self.pixel_tokens = words.any(dim=1, keepdim=True) & words.any(dim=2, keepdim=True)
        self.coverage = {side * side: torch.from_numpy(np.stack([coverage(s, side) for s in scenes]))
                         for side in sides}

    def to(self, device):
        self.tokens = self.tokens.to(device)
        self.pixel_tokens = self.pixel_tokens.to(device)
        self.coverage = {n: c.to(device) for n, c in self.coverage.items()}
        return self


class AttentionRecorder:
    """An attn2 replace that computes softmax attention explicitly (autograd flows through it) and
    keeps each layer's head-mean weights [B, N, T] at the resolutions that have targets and, with
    `peaks`, every layer's per-head maximum weight [B, H, N] (for `saturation_loss`); `clear()` between
    training steps."""

    def __init__(self, locations, peaks: bool = False):
        self.locations = set(locations)
        self.keep_peaks = peaks
        self.weights: list[torch.Tensor] = []
        self.peaks: list[torch.Tensor] = []

    def clear(self) -> None:
        self.weights, self.peaks = [], []

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        batch, locations, width = q.shape
        qh, kh, vh = (t.reshape(t.shape[0], -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        if locations in self.locations:
            self.weights.append(weights.mean(dim=1))
        if self.keep_peaks:
            self.peaks.append(weights.amax(dim=-1))
        return (weights @ vh).transpose(1, 2).reshape(batch, locations, width)

    def transformer_options(self, unet) -> dict:
        """transformer_options for calling `unet` directly with this recorder on every attn2 layer."""
        from maskattn_comfy.model_check import attn2_layers

        return {"patches_replace": {"attn2": {tuple(key): self for key in attn2_layers(unet)}}}


def grounding_loss(weights: torch.Tensor, tokens: torch.Tensor, coverage: torch.Tensor,
                   captioned: torch.Tensor, pixel_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel, token) losses of one layer's head-mean attention `weights` [B, N, T], for the objects'
    token columns `tokens` [B, J, T] (bool), their cell coverage [B, J, N] and which rows have a
    caption `captioned` [B] (bool). Each lies in [0, 1]; 0 when every object's cells attend only to its
    words (`pixel_tokens` [B, J, T], default `tokens`) and its words attend only to its cells."""
    t = tokens.to(weights.dtype)
    present = t.any(-1) & captioned[:, None]  # [B, J]
    cover = coverage.to(weights.dtype) * present[..., None]
    p = t if pixel_tokens is None else pixel_tokens.to(weights.dtype)
    own = torch.einsum("bnt,bjt->bjn", weights, p)  # attention on the object's own words at each cell
    pixel = (cover * (1 - own)).sum() / cover.sum().clamp_min(1e-6)
    maps = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)  # each token's map over the cells
    inside = torch.einsum("bnt,bjn->bjt", maps, coverage.to(weights.dtype))  # share of token t's map on object j
    words = t * present[..., None]
    token = (words * (1 - inside)).sum() / words.sum().clamp_min(1.0)
    return pixel, token


def saturation_loss(peaks: list[torch.Tensor], cap: float) -> torch.Tensor:
    """How far the heads' maximum attention weights `peaks` (one [B, H, N] per layer) rise above `cap`:
    the mean of max(0, peak - cap) over layers, rows, heads and locations; 0 when no head at any
    location puts more than `cap` of its weight on one token (diagnose's "mean max weight" is the
    mean of these peaks)."""
    return torch.stack([(p.float() - cap).clamp_min(0).mean() for p in peaks]).mean()
