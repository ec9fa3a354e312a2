"""Recorded maps -> a labelled grid image and a mask (torch and PIL only).

Rows are layers or groups of layers, columns are the prompt's tokens, cells are the
chosen map at the latent's aspect ratio, and a colour bar gives the scale.
"""

from __future__ import annotations

import functools
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
    "region": (),  # MaskAttn Region's masks: computed from the regions themselves, nothing recorded
}
TITLES = {
    "probability": "gate probability",
    "hard": "hard gate (1 = open)",
    "attention_masked": "cross-attention with the MaskAttn mask",
    "attention_unmasked": "cross-attention without the mask (same queries and keys)",
    "difference": "attention with mask minus without",
    "region": "MaskAttn Region: share of each token's attention weight kept (1 = free, 0 = closed)",
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


def row_label(key: LayerKey, grouping: str) -> str:
    """The grid row a layer's map goes to under `grouping`."""
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {list(GROUPINGS)}")
    return {"layer": layer_name(key), "block": f"{key[0]} {key[1]}",
            "stage": f"{stage_of(key) or 'other'} stage", "all": "all layers"}[grouping]


def row_labels(keys, grouping: str) -> list[str]:
    """The grid's row labels for these layers, in the order the UNet runs them."""
    return list(dict.fromkeys(row_label(key, grouping) for key in sorted(keys, key=layer_order)))


def group_rows(layer_maps: dict[LayerKey, Tensor], grouping: str, latent_size: tuple[int, int],
               size: tuple[int, int] | None = None) -> list[tuple[str, Tensor]]:
    """[(row label, [T,H,W] mean of the row's layers)] in the order the UNet runs them; with `size`,
    each row is resized to it as soon as it is complete, so only one latent-sized row is ever held."""
    keys = sorted(layer_maps, key=layer_order)
    rows = []
    for label in row_labels(keys, grouping):
        members = [key for key in keys if row_label(key, grouping) == label]
        total = to_latent(layer_maps[members[0]], latent_size).float()
        for key in members[1:]:
            total += to_latent(layer_maps[key], latent_size)
        mean = total / len(members)
        rows.append((label, mean if size is None else _resize(mean, size)))
    return rows


def scale_for(choice: str, values: Tensor) -> ColourScale:
    """Gates on [0, 1]; attention on [0, largest shown]; the difference symmetric around 0."""
    if choice in ("probability", "hard", "region"):
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


# Bounds that keep any prompt's grid small: ComfyUI holds the IMAGE as float32 (12 bytes a pixel) and
# its preview briefly needs about three times that, so 4 megapixels stay under ~200 MB.
MAX_WIDTH = 4096                 # wider grids wrap their columns into bands
MAX_PIXELS = 4_000_000           # beyond it cells shrink, then columns are left out with a note
CELL_SIDES = (128, 96, 64, 48)   # a cell's longer side, largest first
_FONT = ImageFont.load_default(size=12)
_PAD, _GAP, _BAR_WIDTH = 8, 3, 16
_NOTE_COLOUR = (170, 0, 0)


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes: the grid's columns wrap into bands of `per_band`; `shown` of `total`
    columns are drawn (the first ones) and `note`, when not empty, says what was left out."""
    cell: tuple[int, int]  # (height, width) of one map
    per_band: int
    shown: int
    total: int
    rows: int
    label_width: int
    note: str

    @property
    def line(self) -> int:
        return int(sum(_FONT.getmetrics())) + 2

    @property
    def bands(self) -> int:
        return -(-self.shown // self.per_band)

    @property
    def top(self) -> int:
        return _PAD + self.line * (2 if self.note else 1) + _PAD

    @property
    def bar_height(self) -> int:
        return max(self.rows * (self.cell[0] + _GAP) - _GAP, 4 * self.line)

    @property
    def band_height(self) -> int:
        return 2 * self.line + max(self.rows * (self.cell[0] + _GAP), self.bar_height + _GAP) + _PAD

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the picture."""
        return (_columns_x(self.label_width, self.per_band, self.cell[1]) + _legend_width(),
                self.top + self.bands * self.band_height)

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of row `row`, column `column` (0-based among the drawn ones)."""
        band, index = divmod(column, self.per_band)
        x = _columns_x(self.label_width, index, self.cell[1])
        y = self.top + band * self.band_height + 2 * self.line + row * (self.cell[0] + _GAP)
        return x, y, x + self.cell[1], y + self.cell[0]


def _columns_x(label_width: int, columns: int, cell_width: int) -> int:
    return label_width + columns * (cell_width + _GAP)


def _legend_width() -> int:
    tick_width = int(_FONT.getlength("-8.88e-05"))  # the widest number the .3g ticks print
    return _PAD + _BAR_WIDTH + 4 + tick_width + _PAD


def grid_layout(labels: list[str], columns: int, latent_size: tuple[int, int], left_out: int = 0) -> GridLayout:
    """The layout of a grid with these row labels and `columns` token columns, within MAX_WIDTH and
    MAX_PIXELS: bands first, then smaller cells, then only the first columns and a note.

    `left_out`: columns already left out by the caller, counted in the note."""
    label_width = max(int(_FONT.getlength(label)) for label in labels) + 2 * _PAD
    rows, total = len(labels), columns + left_out

    def layout(side: int, per_band: int, shown: int) -> GridLayout:
        note = ""
        if shown < total:
            fewer_rows = "fewer rows (grouping 'stage' or 'all') leave room for more; " if rows > 1 else ""
            note = (f"{total - shown} of {total} tokens left out (first {shown} drawn) to keep the grid under "
                    f"{MAX_PIXELS / 1e6:g} megapixels: {fewer_rows}the MASK output maps any word given in words")
        return GridLayout(cell_size(latent_size, side), max(1, per_band), shown, total, rows, label_width, note)

    def widest_band(side: int) -> int:
        cell_width = cell_size(latent_size, side)[1]
        return max(1, (MAX_WIDTH - label_width - _legend_width()) // (cell_width + _GAP))

    if left_out == 0:
        for side in CELL_SIDES:
            bands = -(-columns // widest_band(side))
            candidate = layout(side, -(-columns // bands), columns)  # bands as even as they can be
            if _pixels(candidate) <= MAX_PIXELS:
                return candidate
    side = CELL_SIDES[-1]
    best = layout(side, 1, 1)  # at least one column, whatever it costs
    for bands in range(1, -(-columns // widest_band(side)) + 1):
        height = layout(side, 1, 0).top + bands * layout(side, 1, 0).band_height
        room = MAX_PIXELS // height - best.label_width - _legend_width()
        per_band = min(widest_band(side), columns, room // (best.cell[1] + _GAP))
        if per_band < 1:
            break
        candidate = layout(side, per_band, min(columns, per_band * bands))
        if candidate.shown > best.shown and _pixels(candidate) <= MAX_PIXELS:
            best = candidate
    return best


def _pixels(layout: GridLayout) -> int:
    width, height = layout.size
    return width * height


def render_grid(rows: list[tuple[str, Tensor]], columns: list[TokenLabel], scale: ColourScale, title: str,
                image: Tensor | None = None, left_out: int = 0, latent_size: tuple[int, int] | None = None
                ) -> tuple[Image.Image, dict, GridLayout]:
    """The grid: one row per (label, [C,H,W]) in `rows`, one map per label in `columns`, a colour bar;
    wrapped and capped by `grid_layout` (the columns it leaves out are the last ones).

    `latent_size` gives the cells' aspect (default: the rows' own sides). Returns the picture, each
    drawn cell's box {(row label, token position): (left, top, right, bottom)}, and the layout.
    """
    latent_size = latent_size or tuple(rows[0][1].shape[-2:])
    grid = grid_layout([label for label, _ in rows], len(columns), latent_size, left_out)
    drawn = columns[:grid.shown]
    ch, cw = grid.cell
    width, height = grid.size
    line = grid.line
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, _PAD), _fit(draw, title, width - 2 * _PAD, _FONT), fill=(0, 0, 0), font=_FONT)
    if grid.note:
        draw.text((_PAD, _PAD + line), _fit(draw, grid.note, width - 2 * _PAD, _FONT), fill=_NOTE_COLOUR, font=_FONT)
    for c, token in enumerate(drawn):
        x, y, _, _ = grid.cell_box(0, c)
        text, font = drawable(token.label)
        draw.text((x, y - 2 * line), _fit(draw, text, cw, font), fill=(0, 0, 0), font=font)
        draw.text((x, y - line), _fit(draw, f"#{token.position}", cw, _FONT), fill=(110, 110, 110), font=_FONT)
    boxes = {}
    photo = None if image is None else _resize(image.movedim(-1, 0), (ch, cw)).movedim(0, -1).clamp(0, 1)
    for r, (label, values) in enumerate(rows):
        cells = _cells(values, drawn, scale, (ch, cw), photo)
        for band in range(grid.bands):
            _, y, _, _ = grid.cell_box(r, band * grid.per_band)
            draw.text((_PAD, y + (ch - line) // 2), label, fill=(0, 0, 0), font=_FONT)
        for c, token in enumerate(drawn):
            box = grid.cell_box(r, c)
            canvas.paste(Image.fromarray(cells[c].numpy()), box[:2])
            boxes[(label, token.position)] = box
    bar_x = _columns_x(grid.label_width, grid.per_band, cw) + _PAD
    bar_top, bar_height = grid.cell_box(0, 0)[1], grid.bar_height
    ramp = colourise(torch.linspace(1, 0, bar_height)[:, None].expand(bar_height, _BAR_WIDTH), scale.diverging)
    canvas.paste(Image.fromarray((ramp * 255).round().to(torch.uint8).numpy()), (bar_x, bar_top))
    ticks = [scale.low, (scale.low + scale.high) / 2, scale.high]
    for t, value in enumerate(ticks):
        y = bar_top + round((1 - t / 2) * (bar_height - 1)) - line // 2
        y = min(max(y, bar_top), bar_top + bar_height - line)
        draw.text((bar_x + _BAR_WIDTH + 4, y), f"{value:.3g}", fill=(0, 0, 0), font=_FONT)
    return canvas, boxes, grid


def _cells(values: Tensor, columns: list[TokenLabel], scale: ColourScale, size: tuple[int, int],
           photo: Tensor | None) -> Tensor:
    """One row's cells: [C, ch, cw, 3] uint8."""
    colours = colourise(scale.normalise(_resize(values[:len(columns)], size)), scale.diverging)
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


# Fonts for labels that Pillow's built-in font (ASCII only) cannot draw, tried in order where installed:
# Latin, Greek and Cyrillic, then CJK (Linux, macOS, Windows).
_FALLBACK_FONTS = ("DejaVuSans.ttf", "NotoSansCJK-Regular.ttc", "wqy-microhei.ttc", "PingFang.ttc", "msyh.ttc",
                   "Arial Unicode.ttf")


def drawable(text: str) -> tuple[str, ImageFont.FreeTypeFont]:
    """`text` and the first font that has all its characters; where none has, each missing character is
    written as its code point ("U+732B") in the built-in font, never drawn as an empty box."""
    for font in _label_fonts():
        if not any(_missing(font, character) for character in text):
            return text, font
    return "".join(f"U+{ord(c):04X}" if _missing(_FONT, c) else c for c in text), _FONT


@functools.lru_cache(maxsize=1)
def _label_fonts() -> tuple[ImageFont.FreeTypeFont, ...]:
    fonts = [_FONT]
    for name in _FALLBACK_FONTS:
        try:
            fonts.append(ImageFont.truetype(name, _FONT.size))
        except OSError:  # not installed here
            pass
    return tuple(fonts)


@functools.lru_cache(maxsize=4096)
def _missing(font: ImageFont.FreeTypeFont, character: str) -> bool:
    # A character the font lacks is drawn as its .notdef box, the same one a non-character gets.
    box, notdef = font.getmask(character), font.getmask("\uffff")
    return box.size == notdef.size and bytes(box) == bytes(notdef)


def to_image_tensor(picture: Image.Image) -> Tensor:
    """PIL RGB -> ComfyUI IMAGE [1, H, W, 3] float in [0, 1]."""
    return torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).reshape(
        1, picture.height, picture.width, 3).float() / 255.0
