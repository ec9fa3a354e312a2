"""Recorded maps -> a labelled grid image and a mask (torch and PIL only).

Rows are layers or groups of layers, columns are the prompt's tokens, cells are the
chosen map at the latent's aspect ratio, and a colour bar gives the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from maskattn_core import LayerKey, layer_name, stage_of
from maskattn_core.layers import layer_order

from .recording import ATTENTION_MAPS, level_sides
from .tokens import TokenLabel

# The map a user picks -> the recorded maps it needs.
CHOICES = {
    "probability": ("probability",),
    "hard": ("hard",),
    "attention_masked": ATTENTION_MAPS,
    "attention_unmasked": ATTENTION_MAPS,
    "difference": ATTENTION_MAPS,
}
TITLES = {
    "probability": "gate probability",
    "hard": "hard gate (1 = open)",
    "attention_masked": "cross-attention with the MaskAttn mask",
    "attention_unmasked": "cross-attention without the mask (same queries and keys)",
    "difference": "attention with mask minus without",
}
GROUPINGS = ("layer", "block", "stage", "all")

_SEQUENTIAL = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_DIVERGING = ((33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43))
_OVERLAY_ALPHA = 0.6


@dataclass(frozen=True)
class ColourScale:
    low: float
    high: float
    diverging: bool

    def normalise(self, values: Tensor) -> Tensor:
        return ((values - self.low) / max(self.high - self.low, 1e-12)).clamp(0.0, 1.0)


def chosen_maps(recorded: dict[LayerKey, dict[str, Tensor]], choice: str) -> dict[LayerKey, Tensor]:
    """{layer: [T,h,w]} of the chosen map; "difference" is attention with mask minus without."""
    if choice not in CHOICES:
        raise ValueError(f"unknown map {choice!r}; choose one of {list(CHOICES)}")
    if choice == "difference":
        return {key: maps["attention_masked"] - maps["attention_unmasked"] for key, maps in recorded.items()}
    return {key: maps[choice] for key, maps in recorded.items()}


def to_latent(layer_map: Tensor, latent_size: tuple[int, int]) -> Tensor:
    """[T,h,w] at a UNet level -> [T,H,W]: each cell covers 2**level latent pixels, the last ones cut
    where the UNet rounded a side up."""
    height, width = latent_size
    h, w = layer_map.shape[-2:]
    level = 0
    while level_sides(height, width, level) != (h, w):
        if level_sides(height, width, level) == (1, 1):
            raise ValueError(f"a {h}x{w} map is no UNet level of a {height}x{width} latent")
        level += 1
    step = 2 ** level
    return layer_map.repeat_interleave(step, -2).repeat_interleave(step, -1)[..., :height, :width]


def group_rows(layer_maps: dict[LayerKey, Tensor], grouping: str,
               latent_size: tuple[int, int]) -> list[tuple[str, Tensor]]:
    """[(row label, [T,H,W] mean of the row's layers)] in the order the UNet runs them."""
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {list(GROUPINGS)}")
    groups: dict[str, list[Tensor]] = {}
    for key in sorted(layer_maps, key=layer_order):
        label = {"layer": layer_name(key), "block": f"{key[0]} {key[1]}",
                 "stage": f"{stage_of(key) or 'other'} stage", "all": "all layers"}[grouping]
        groups.setdefault(label, []).append(to_latent(layer_maps[key], latent_size))
    return [(label, torch.stack(maps).mean(0)) for label, maps in groups.items()]


def scale_for(choice: str, values: Tensor) -> ColourScale:
    """Gates on [0, 1]; attention on [0, largest shown]; the difference symmetric around 0."""
    if choice in ("probability", "hard"):
        return ColourScale(0.0, 1.0, False)
    if choice == "difference":
        reach = float(values.abs().max()) if values.numel() else 0.0
        return ColourScale(-reach, reach, True)
    return ColourScale(0.0, float(values.max()) if values.numel() else 0.0, False)


def colourise(values: Tensor, diverging: bool) -> Tensor:
    """[...] values in [0, 1] -> [..., 3] RGB in [0, 1] along a sequential or diverging colour map."""
    anchors = torch.tensor(_DIVERGING if diverging else _SEQUENTIAL, dtype=torch.float32) / 255.0
    position = values.float().clamp(0, 1) * (len(anchors) - 1)
    below = position.floor().long().clamp(max=len(anchors) - 2)
    fraction = (position - below).unsqueeze(-1)
    return anchors[below] * (1 - fraction) + anchors[below + 1] * fraction


def word_mask(latent_map: Tensor, columns: list[list[int]], scale: ColourScale, size: tuple[int, int]) -> Tensor:
    """[1, height, width] MASK on the colour scale: each word's tokens averaged, words combined by max."""
    words = torch.stack([latent_map[cols].mean(0) for cols in columns])
    mask = scale.normalise(words.amax(0))
    return _resize(mask[None], size).clamp(0, 1)


def cell_size(latent_size: tuple[int, int], longest: int) -> tuple[int, int]:
    height, width = latent_size
    if width >= height:
        return max(8, round(longest * height / width)), longest
    return longest, max(8, round(longest * width / height))


def render_grid(rows: list[tuple[str, Tensor]], columns: list[TokenLabel], scale: ColourScale, title: str,
                image: Tensor | None = None, longest: int = 128) -> tuple[Image.Image, dict]:
    """The grid: one row per (label, [T,H,W]) in `rows`, one column per token label, a colour bar.

    Returns the picture and each cell's box: {(row label, token position): (left, top, right, bottom)}.
    """
    font = ImageFont.load_default(size=12)
    pad, gap, bar_width = 8, 3, 16
    latent_size = tuple(rows[0][1].shape[-2:])
    ch, cw = cell_size(latent_size, longest)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = int(sum(font.getmetrics())) + 2
    row_label_width = max(int(probe.textlength(label, font=font)) for label, _ in rows) + 2 * pad
    ticks = [scale.low, (scale.low + scale.high) / 2, scale.high]
    tick_width = max(int(probe.textlength(f"{t:.3g}", font=font)) for t in ticks)
    top = pad + line + pad + 2 * line
    grid_height = len(rows) * (ch + gap)
    bar_height = max(grid_height - gap, 4 * line)
    width = row_label_width + len(columns) * (cw + gap) + pad + bar_width + 4 + tick_width + pad
    height = top + max(grid_height, bar_height) + pad

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), _fit(draw, title, width - 2 * pad, font), fill=(0, 0, 0), font=font)
    for c, token in enumerate(columns):
        x = row_label_width + c * (cw + gap)
        draw.text((x, top - 2 * line), _fit(draw, token.label, cw, font), fill=(0, 0, 0), font=font)
        draw.text((x, top - line), f"#{token.position}", fill=(110, 110, 110), font=font)
    boxes = {}
    photo = None if image is None else _resize(image.movedim(-1, 0), (ch, cw)).movedim(0, -1).clamp(0, 1)
    for r, (label, values) in enumerate(rows):
        y = top + r * (ch + gap)
        draw.text((pad, y + (ch - line) // 2), label, fill=(0, 0, 0), font=font)
        cells = _cells(values, columns, scale, (ch, cw), photo)
        for c, token in enumerate(columns):
            x = row_label_width + c * (cw + gap)
            canvas.paste(Image.fromarray(cells[c].numpy()), (x, y))
            boxes[(label, token.position)] = (x, y, x + cw, y + ch)
    bar_x = row_label_width + len(columns) * (cw + gap) + pad
    ramp = colourise(torch.linspace(1, 0, bar_height)[:, None].expand(bar_height, bar_width), scale.diverging)
    canvas.paste(Image.fromarray((ramp * 255).round().to(torch.uint8).numpy()), (bar_x, top))
    for t, value in enumerate(ticks):
        y = top + round((1 - t / 2) * (bar_height - 1)) - line // 2
        y = min(max(y, top), top + bar_height - line)
        draw.text((bar_x + bar_width + 4, y), f"{value:.3g}", fill=(0, 0, 0), font=font)
    return canvas, boxes


def _cells(values: Tensor, columns: list[TokenLabel], scale: ColourScale, size: tuple[int, int],
           photo: Tensor | None) -> Tensor:
    """One row's cells: [C, ch, cw, 3] uint8."""
    colours = colourise(scale.normalise(_resize(values[[token.position for token in columns]], size)), scale.diverging)
    if photo is not None:
        colours = photo * (1 - _OVERLAY_ALPHA) + colours * _OVERLAY_ALPHA
    return (colours * 255).round().to(torch.uint8)


def _resize(planes: Tensor, size: tuple[int, int]) -> Tensor:
    """[P, H, W] -> [P, *size], bilinear (antialiased when shrinking)."""
    return F.interpolate(planes[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _fit(draw, text: str, width: int, font) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def to_image_tensor(picture: Image.Image) -> Tensor:
    """PIL RGB -> ComfyUI IMAGE [1, H, W, 3] float in [0, 1]."""
    return torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).reshape(
        1, picture.height, picture.width, 3).float() / 255.0
