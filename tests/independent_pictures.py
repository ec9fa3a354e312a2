"""A second renderer, written without world.py's drawing code, for pictures with a known truth:
the world's shapes and shapes that are none of them (hexagons, pentagons, ellipses, rounded
squares, sideways triangles), anti-aliased by 4x4 supersampling, jittered in place, size and
colour, rotated, touching, and optionally blurred through the Shapes codec (8x latent).

Each generator takes a numpy Generator and returns (picture uint8 [128,128,3], prompt, truth)."""

from __future__ import annotations

import numpy as np
import torch

from maskattn_shapes.model import ShapesCodec
from maskattn_shapes.world import BACKGROUND, PALETTE, Prompt, caption

SIZE = 128
SUPER = 4
_CODEC = ShapesCodec()


def _grid():
    offsets = (np.arange(SIZE * SUPER) + 0.5) / SUPER
    return np.meshgrid(offsets, offsets)  # x, y in pixel units, y down


_X, _Y = _grid()


def polygon(cx, cy, radius, sides, rotation):
    """Inside a regular polygon of circumradius `radius`, a vertex at angle `rotation` (0: straight up)."""
    angles = rotation + 2 * np.pi * np.arange(sides) / sides
    vx, vy = cx + radius * np.sin(angles), cy - radius * np.cos(angles)
    inside = np.ones_like(_X, bool)
    for i in range(sides):
        x0, y0, x1, y1 = vx[i], vy[i], vx[(i + 1) % sides], vy[(i + 1) % sides]
        # the centre is on the inner side of every edge
        side = lambda x, y: (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)  # noqa: E731
        inside &= np.sign(side(_X, _Y)) == np.sign(side(cx, cy))
    return inside


def ellipse(cx, cy, rx, ry, rotation):
    c, s = np.cos(rotation), np.sin(rotation)
    u, v = (_X - cx) * c + (_Y - cy) * s, -(_X - cx) * s + (_Y - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1


def rounded_square(cx, cy, half, corner):
    dx, dy = np.maximum(np.abs(_X - cx) - (half - corner), 0), np.maximum(np.abs(_Y - cy) - (half - corner), 0)
    return (np.abs(_X - cx) <= half) & (np.abs(_Y - cy) <= half) & (dx ** 2 + dy ** 2 <= corner ** 2)


def world_shape(shape, cx, cy, extent):
    """The world's three shapes, in its box convention, drawn here by this module's own geometry."""
    half = extent / 2
    if shape == "circle":
        return ellipse(cx, cy, half, half, 0.0)
    if shape == "square":
        return (np.abs(_X - cx) <= half) & (np.abs(_Y - cy) <= half)
    # upright isosceles triangle filling the box: apex at the top centre
    t = (_Y - (cy - half)) / extent
    return (t >= 0) & (t <= 1) & (np.abs(_X - cx) <= t * half)


def paint(layers, colour_jitter: np.ndarray | None = None) -> np.ndarray:
    """Masks (supersampled) in order, later on top, each a palette colour; averaged to pixels."""
    canvas = np.empty((SIZE * SUPER, SIZE * SUPER, 3), np.float64)
    canvas[:] = BACKGROUND
    for i, (mask, colour) in enumerate(layers):
        rgb = np.asarray(PALETTE[colour], np.float64)
        if colour_jitter is not None:
            rgb = (rgb + colour_jitter[i]).clip(0, 255)
        canvas[mask] = rgb
    pixels = canvas.reshape(SIZE, SUPER, SIZE, SUPER, 3).mean(axis=(1, 3))
    return np.rint(pixels).clip(0, 255).astype(np.uint8)


def through_codec(pixels: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        y = _CODEC.decode(_CODEC.encode(x))
    return ((y[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().byte().numpy()


def _prompt(objects, relation=None):
    objects = tuple(objects)
    relation = relation or ("and" if len(objects) == 2 else None)
    return Prompt(objects, relation, caption(objects, relation))


def _colours(rng, k):
    names = list(PALETTE)
    return [names[i] for i in rng.permutation(len(names))[:k]]


def _jitter(rng, k):
    return rng.uniform(-6, 6, size=(k, 3))


def _spot(rng, extent):
    return rng.uniform(extent / 2 + 3, SIZE - extent / 2 - 3, size=2)


def faithful(rng):
    """One or two of the world's shapes, apart, at jittered sub-pixel places, sizes and colours."""
    count = int(rng.integers(1, 3))
    shapes = [("circle", "square", "triangle")[i] for i in rng.permutation(3)[:count]]
    colours = _colours(rng, count)
    while True:
        extents = rng.uniform(34, 54, size=count)
        spots = [_spot(rng, e) for e in extents]
        if count == 1 or np.abs(spots[0] - spots[1]).max() - extents.sum() / 2 >= 10:
            break
    layers = [(world_shape(s, *p, e), c) for s, p, e, c in zip(shapes, spots, extents, colours)]
    return paint(layers, _jitter(rng, count)), _prompt(zip(colours, shapes)), {"exact": True}


def wrong_shape(rng, kind):
    """A shape that is none of the world's, prompted as the world shape it most resembles."""
    colour = _colours(rng, 1)[0]
    extent = rng.uniform(38, 54)
    cx, cy = _spot(rng, extent * 1.2)
    if kind == "hexagon":
        mask, prompted = polygon(cx, cy, extent / 2, 6, rng.uniform(0, np.pi / 3)), "circle"
    elif kind == "pentagon":
        mask, prompted = polygon(cx, cy, extent / 2, 5, rng.uniform(0, 2 * np.pi / 5)), "circle"
    elif kind == "ellipse":
        rotation = float(rng.choice([0.0, np.pi / 2])) + rng.uniform(-0.1, 0.1)
        mask, prompted = ellipse(cx, cy, extent / 2, 0.75 * extent / 2, rotation), "circle"
    elif kind == "rounded square":
        mask, prompted = rounded_square(cx, cy, extent / 2, rng.uniform(0.25, 0.4) * extent), "square"
    elif kind == "sideways triangle":
        turn = float(rng.choice([np.pi / 2, -np.pi / 2]))
        mask, prompted = polygon(cx, cy, extent / 1.8, 3, turn + rng.uniform(-0.1, 0.1)), "circle"
    else:
        raise ValueError(kind)
    return paint([(mask, colour)], _jitter(rng, 1)), _prompt([(colour, prompted)]), {"exact": False}


def with_speck(rng):
    """A faithful picture and a 6-9 px speck of a colour not in it, away from the objects."""
    picture, prompt, _ = faithful(rng)
    used = {c for c, _ in prompt.objects}
    colour = next(c for c in _colours(rng, 7) if c not in used)
    diameter = rng.uniform(6, 9)
    for _ in range(1000):
        x, y = rng.uniform(8, SIZE - 8, size=2)  # clear of every object's ink by 8 px and more
        window = picture[max(int(y) - 13, 0):int(y) + 13, max(int(x) - 13, 0):int(x) + 13].astype(int)
        if (np.abs(window - BACKGROUND).max(axis=-1) < 4).all():
            break
    speck = paint([(ellipse(x, y, diameter / 2, diameter / 2, 0.0), colour)])
    inked = np.abs(speck.astype(int) - BACKGROUND).max(axis=-1) > 0
    picture = picture.copy()
    picture[inked] = speck[inked]
    return picture, prompt, {"exact": False}


def with_duplicate(rng):
    """A faithful picture and a second, smaller object (16-24 px, any world shape) of a prompted colour."""
    while True:
        picture, prompt, _ = faithful(rng)
        colour = prompt.objects[int(rng.integers(len(prompt.objects)))][0]
        shape = ("circle", "square", "triangle")[int(rng.integers(3))]
        extent = rng.uniform(16, 24)
        for _ in range(200):
            x, y = _spot(rng, extent)
            y0, y1, x0, x1 = int(y - extent / 2 - 10), int(y + extent / 2 + 10), int(x - extent / 2 - 10), int(x + extent / 2 + 10)
            window = picture[max(y0, 0):y1, max(x0, 0):x1].astype(int)
            if (np.abs(window - BACKGROUND).max(axis=-1) < 4).all():
                extra = paint([(world_shape(shape, x, y, extent), colour)])
                inked = np.abs(extra.astype(int) - BACKGROUND).max(axis=-1) > 0
                picture = picture.copy()
                picture[inked] = extra[inked]
                return picture, prompt, {"exact": False}


def touching(rng, colours=None):
    """Two squares side by side with no gap (0-1 px apart), in different colours."""
    shapes = ["square", "square"]
    colours = list(colours or _colours(rng, 2))
    extents = rng.uniform(36, 48, size=2)
    cy = rng.uniform(30, 98)
    left = rng.uniform(extents[0] / 2 + 4, SIZE - 4 - extents[1] - extents[0] / 2)
    gap = rng.uniform(0, 1)
    spots = [(left, cy + rng.uniform(-4, 4)), (left + extents.sum() / 2 + gap, cy + rng.uniform(-4, 4))]
    layers = [(world_shape(s, *p, e), c) for s, p, e, c in zip(shapes, spots, extents, colours)]
    prompt = Prompt(((colours[0], "square"),), None, caption(((colours[0], "square"),), None))  # shapes repeat
    return paint(layers, _jitter(rng, 2)), prompt, {"colours": set(colours)}


KINDS = ("hexagon", "pentagon", "ellipse", "rounded square", "sideways triangle")
