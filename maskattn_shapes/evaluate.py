"""Read what was drawn and score it against the prompt.

A pixel is explained as the background mixed with one palette colour: `coverage` of that
colour along the straight line from the background to it, `residual` off that line. This is
exactly what antialiasing and a blurry decoder produce, so edges never read as a third
colour, and the 50 % coverage contour lands on the drawn edge however blurred it is.
Same-colour pixels connect into objects; the shape comes from how the object's rows widen
downwards, how much of its box it fills, and whether it fills the box's corners.

    python -m maskattn_shapes.evaluate --n 500 --seed 1   # accuracy on the generator's own pictures
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import BACKGROUND, COLORS, PALETTE, SPATIAL, Prompt, render, training_scenes

# At 128 px; areas scale with the square of the image side.
MIN_AREA = 60
CORE_RADIUS = 2  # a pixel is core when its 5x5 neighbourhood is all one colour ...
MIN_CORE = 16  # ... and an object needs this many: mixed edge slivers between objects have none
MIN_COVERAGE = 0.5
MAX_RESIDUAL = 60.0  # RGB units off the background-colour line before a pixel is "no palette colour"
MAX_ASPECT = 1.5  # a triangle's box; the world's circles and squares fill a square box ...
ROUND_ASPECT = 1.18  # ... within this through the latent (measured <= 1.12; an ellipse of aspect 0.75 is 1.24-1.41)
# Share of the box's inscribed ellipse a circle must match (intersection over union). World circles:
# >= 0.956 crisp, >= 0.916 through the latent with noise; hexagons 0.90-0.92 and pentagons 0.85-0.88 crisp.
# Through the latent a neighbour's blur dents circles to 0.87 and a hexagon is a circle (0.92-0.97):
# there the test only refuses what is far from round (sideways triangles <= 0.74).
CIRCLE_IOU = {"crisp": 0.94, "blurred": 0.80}
# The box itself: rounded squares 0.88-0.95 crisp. Through the latent they are 0.81-0.93, world squares
# 0.84-0.99 and the base's own squares as low as 0.83: no threshold there refuses one and keeps the other.
SQUARE_IOU = {"crisp": 0.96, "blurred": 0.0}
SHARP_CORNERS = 0.5  # crisp squares fill their box's corner tips (|u| + |v| > 0.85): 0.8-1; rounded ones 0-0.01
BLURRED_BAND = 2.0  # pixels of under 90 % coverage per edge pixel: ~1 crisp (after the 3x3 mean), 3-6 through the latent
SPECK_COVERAGE = 0.2  # ink: at least this share of the nearest palette colour's distance from the ground ...
MIN_SPECK = 6  # ... in a blob of this many pixels (at 128 px) with no object in it is an extra object
TRIANGLE_WIDENING = (0.5, 1.5)
TRIANGLE_FILL = (0.4, 0.8)
SQUARENESS = 0.6  # (fill + corners) / 2: square above, circle below (see classify_shape)
CIRCLE_FILL = 0.6

_GROUND = np.asarray(BACKGROUND, np.float32)
_DIRECTIONS = (np.asarray([PALETTE[c] for c in COLORS], np.float64) - _GROUND).astype(np.float32)
_LENGTH2 = (_DIRECTIONS ** 2).sum(axis=1)
_REACH = float(np.sqrt(_LENGTH2.min()))
_UNKNOWN = len(COLORS) + 1  # label of pixels far from the background on no palette line


@dataclass(frozen=True)
class Found:
    """One object read from a picture. color None: no palette colour; shape None: no shape fits.
    (cx, cy) is the centre of its box in pixels (the generator's Obj convention); area in pixels."""

    color: str | None
    shape: str | None
    cx: float
    cy: float
    area: int


def through_latent(image, factor: int = 8) -> np.ndarray:
    """What survives a latent `factor` times smaller: area-average down, bilinear back up
    (half-pixel centres, as torch's interpolate with align_corners=False)."""
    pixels = np.asarray(image, np.float64)
    h, w = pixels.shape[:2]
    small = pixels.reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))

    def upsample(a: np.ndarray, axis: int) -> np.ndarray:
        n = a.shape[axis]
        position = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)
        low = np.floor(position).astype(int)
        high = np.minimum(low + 1, n - 1)
        t = (position - low).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
        return np.take(a, low, axis) * (1 - t) + np.take(a, high, axis) * t

    return np.rint(upsample(upsample(small, 0), 1)).clip(0, 255).astype(np.uint8)


def _box_mean(pixels: np.ndarray) -> np.ndarray:
    """3x3 mean: a decoder's pixel noise would otherwise fray edges and flip pixels between
    neighbouring palette lines; the reading is built to tolerate blur."""
    padded = np.pad(pixels.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9


def palette_labels(pixels: np.ndarray) -> np.ndarray:
    """Per pixel: 0 background, 1 + index into COLORS, or _UNKNOWN (far from the background,
    more than MAX_RESIDUAL off every palette line)."""
    return _palette_fit(pixels)[0]


def _palette_fit(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """palette_labels, the chosen colour's coverage per pixel (0 on the ground), and the ink mask:
    pixels at least SPECK_COVERAGE of the nearest palette distance away from the ground."""
    offset = pixels.reshape(-1, 3).astype(np.float32) - _GROUND
    distance = np.sqrt((offset ** 2).sum(axis=1))
    labels = np.zeros(len(offset), np.int64)
    covered = np.zeros(len(offset), np.float32)
    ink = (distance >= SPECK_COVERAGE * _REACH).reshape(pixels.shape[:2])
    # Under half of the nearest palette colour's distance, no coverage can reach 50 %.
    candidates = np.flatnonzero(distance >= MIN_COVERAGE * _REACH)
    offset, distance = offset[candidates], distance[candidates]
    along = offset @ _DIRECTIONS.T
    coverage = along / _LENGTH2
    # Darker or more saturated than the palette colour still counts as it, a little beyond.
    clipped = coverage.clip(0, 1.25)
    residual2 = (distance ** 2)[:, None] - 2 * clipped * along + clipped ** 2 * _LENGTH2
    best = residual2.argmin(axis=1)
    rows = np.arange(len(best))
    chosen = np.where(coverage[rows, best] >= MIN_COVERAGE, best + 1, 0)
    chosen[residual2[rows, best] > MAX_RESIDUAL ** 2] = _UNKNOWN
    labels[candidates] = chosen
    covered[candidates] = coverage[rows, best]
    return labels.reshape(pixels.shape[:2]), covered.reshape(pixels.shape[:2]), ink


def _core(labels: np.ndarray) -> np.ndarray:
    """Pixels whose whole (2·CORE_RADIUS+1)² neighbourhood has their label."""
    r = CORE_RADIUS
    padded = np.pad(labels, r, constant_values=-1)
    h, w = labels.shape
    core = labels > 0
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            core &= padded[dy:dy + h, dx:dx + w] == labels
    return core


def _runs(labels: np.ndarray):
    """Horizontal runs of one label: row, start, end (exclusive), label; background dropped."""
    h, w = labels.shape
    starts = np.ones((h, w), bool)
    starts[:, 1:] = labels[:, 1:] != labels[:, :-1]
    rows, cols = np.nonzero(starts)
    ends = np.append(cols[1:], w)
    ends[np.append(rows[1:] != rows[:-1], True)] = w
    keep = labels[rows, cols] > 0
    return rows[keep], cols[keep], ends[keep], labels[rows, cols][keep]


def _components(rows, starts, ends, labels, width: int) -> np.ndarray:
    """Component id per run: runs of one label touching in consecutive rows (8-connected)."""
    # Within a row, runs are disjoint and sorted, so the runs of the next row that touch
    # [start, end) form one contiguous range, found by searching row-major keys.
    stride = width + 2
    first = np.searchsorted(rows * stride + ends, (rows + 1) * stride + starts, "left")
    last = np.searchsorted(rows * stride + starts, (rows + 1) * stride + ends, "right")
    count = np.maximum(last - first, 0)
    above = np.repeat(np.arange(len(rows)), count)
    below = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count) + np.repeat(first, count)
    same = labels[above] == labels[below]

    parent = list(range(len(rows)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(above[same].tolist(), below[same].tolist()):
        root_i, root_j = find(i), find(j)
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)
    return np.array([find(i) for i in range(len(rows))], dtype=np.int64)


def _opened(mask: np.ndarray) -> np.ndarray:
    """3x3 erosion then dilation, cropped to what is left: drops the one-pixel spurs noise
    leaves on edges, which would stretch the box; a square comes through unchanged."""
    h, w = mask.shape
    shifts = [(dy, dx) for dy in range(3) for dx in range(3)]
    padded = np.pad(mask, 1)
    eroded = np.logical_and.reduce([padded[dy:dy + h, dx:dx + w] for dy, dx in shifts])
    padded = np.pad(eroded, 1)
    opened = np.logical_or.reduce([padded[dy:dy + h, dx:dx + w] for dy, dx in shifts])
    rows, cols = np.flatnonzero(opened.any(axis=1)), np.flatnonzero(opened.any(axis=0))
    if not len(rows):
        return mask
    return opened[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _edge_pixels(mask: np.ndarray) -> int:
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return int((mask & ~inner).sum())


def _template_iou(mask: np.ndarray, template: np.ndarray) -> float:
    return float((mask & template).sum() / max(int((mask | template).sum()), 1))


def classify_shape(mask: np.ndarray, blurred: bool = True) -> str | None:
    """circle, square or triangle from an object's mask; None when none fits.

    Measures on the mask's box that survive blur and pixel noise: `widening`, the slope of
    row width (in box widths) against height (in box heights): 1 for the upright triangle,
    0 for the symmetric circle and square; `fill`, the share of the box covered (triangle
    0.5, circle 0.785, square 1); `corners`, the share of the box's four corner regions
    (|u - 1/2| + |v - 1/2| > 0.7 in box units) covered (circle 0, square 1). Through the 8x
    latent, with pixel noise up to sd 32 per channel, squareness (fill + corners) / 2 stays
    >= 0.62 for squares and <= 0.59 for circles, and widening >= 0.5 for most triangles.

    What is read as a circle or a square must also be one: a box within ROUND_ASPECT of square
    (not an ellipse) and the mask close to the inscribed ellipse (CIRCLE_IOU: not a hexagon,
    pentagon or sideways triangle) or to the whole box (SQUARE_IOU; crisp: with sharp corners, not
    a rounded square). `blurred` (an edge as wide as the 8x latent leaves it) loosens what blur
    cannot keep."""
    mask = _opened(mask)
    h, w = mask.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return None
    heights = (np.arange(h) + 0.5) / h - 0.5
    widening = (heights * mask.sum(axis=1) / w).sum() / (heights ** 2).sum() if h > 1 else 0.0
    fill = mask.mean()
    if TRIANGLE_WIDENING[0] <= widening <= TRIANGLE_WIDENING[1]:
        return "triangle" if TRIANGLE_FILL[0] <= fill <= TRIANGLE_FILL[1] else None
    if abs(widening) >= TRIANGLE_WIDENING[0]:
        return None
    u, v = (np.arange(w) + 0.5) / w - 0.5, (np.arange(h) + 0.5) / h - 0.5
    diamond = np.abs(u)[None, :] + np.abs(v)[:, None]
    corners = mask[diamond > 0.7].mean()
    regime = "blurred" if blurred else "crisp"
    if max(h, w) > ROUND_ASPECT * min(h, w):
        return None
    if (fill + corners) / 2 >= SQUARENESS:
        if _template_iou(mask, np.ones_like(mask)) < SQUARE_IOU[regime]:
            return None
        return "square" if blurred or mask[diamond > 0.85].mean() >= SHARP_CORNERS else None
    if fill < CIRCLE_FILL:
        return None
    disc = (u ** 2)[None, :] + (v ** 2)[:, None] <= 0.25
    return "circle" if _template_iou(mask, disc) >= CIRCLE_IOU[regime] else None


def read_image(image) -> list[Found]:
    """The objects in a picture (PIL image or uint8 HxWx3), largest first.

    Pixels of under 50 % palette coverage are background; same-colour pixels connect (8-way)
    into an object, kept when it has at least MIN_AREA pixels and MIN_CORE core pixels (scaled
    from 128 px), which drops blur slivers between objects and specks."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image HxWx3, got an array of shape {pixels.shape}")
    smooth = _box_mean(pixels)
    labels, coverage, ink = _palette_fit(smooth)
    rows, starts, ends, run_labels = _runs(labels)
    if not len(rows):
        return []
    component = _components(rows, starts, ends, run_labels, pixels.shape[1])
    core_before = np.pad(np.cumsum(_core(labels), axis=1), ((0, 0), (1, 0)))
    run_core = core_before[rows, ends] - core_before[rows, starts]
    scale = pixels.shape[0] * pixels.shape[1] / 128 ** 2
    found, kept = [], np.zeros(labels.shape, bool)
    for c in np.unique(component):
        mine = component == c
        r, s, e = rows[mine], starts[mine], ends[mine]
        area = int((e - s).sum())
        if area < MIN_AREA * scale or run_core[mine].sum() < MIN_CORE * scale:
            continue
        y0, y1, x0, x1 = r.min(), r.max() + 1, s.min(), e.max()
        mask = np.zeros((y1 - y0, x1 - x0), bool)
        for row, start, end in zip(r, s, e):
            mask[row - y0, start - x0:end - x0] = True
        label = run_labels[mine][0]
        color = COLORS[label - 1] if label != _UNKNOWN else None
        box = kept[y0:y1, x0:x1]
        box |= mask
        if _is_seam(mask, label, labels, smooth, y0, x0):
            continue
        blurred = ((coverage[y0:y1, x0:x1] < 0.9) & mask).sum() > BLURRED_BAND * _edge_pixels(mask)
        shape = classify_shape(mask, blurred) if color is not None else None
        found.append(Found(color, shape, float(x0 + x1) / 2, float(y0 + y1) / 2, area))
    found += _specks(ink, kept, labels, MIN_SPECK * scale)
    return sorted(found, key=lambda f: -f.area)


def _is_seam(mask: np.ndarray, label: int, labels: np.ndarray, pixels: np.ndarray, y0: int, x0: int) -> bool:
    """A blurred seam between two touching objects: its pixels lie on the plane of the two
    neighbouring colours (mixes of them and the ground) much better than on their own colour's line.
    Where they touch, two colours' blur can read as a third (orange and purple as red)."""
    h, w = mask.shape
    r = 2
    top, left = max(y0 - r, 0), max(x0 - r, 0)
    bottom, right = min(y0 + h + r, labels.shape[0]), min(x0 + w + r, labels.shape[1])
    placed = np.zeros((bottom - top, right - left), bool)
    placed[y0 - top:y0 - top + h, x0 - left:x0 - left + w] = mask
    around = labels[top:bottom, left:right][_grown(placed, r) & ~placed]
    neighbours = [n for n in np.unique(around).tolist() if n not in (0, label, _UNKNOWN)]
    if len(neighbours) < 2:
        return False
    ink = pixels[y0:y0 + h, x0:x0 + w][mask].astype(np.float64) - _GROUND
    if label == _UNKNOWN:  # on no palette line: a mix of its neighbours if it lies on their plane
        own_residual = 2 * MAX_RESIDUAL
    else:
        own = _DIRECTIONS[label - 1].astype(np.float64)
        own_residual = np.linalg.norm(ink - np.outer(ink @ own / (own @ own), own), axis=1).mean()
    for i, j in itertools.combinations(neighbours, 2):
        basis = np.linalg.qr(_DIRECTIONS[[i - 1, j - 1]].astype(np.float64).T)[0]  # [3, 2]
        plane_residual = np.linalg.norm(ink - ink @ basis @ basis.T, axis=1).mean()
        if plane_residual < 0.5 * own_residual:
            return True
    return False


def _grown(mask: np.ndarray, by: int) -> np.ndarray:
    """Dilation by a (2·by+1)² square."""
    h, w = mask.shape
    padded = np.pad(mask, by)
    rows = np.logical_or.reduce([padded[d:d + h] for d in range(2 * by + 1)])
    return np.logical_or.reduce([rows[:, d:d + w] for d in range(2 * by + 1)])


def _specks(ink: np.ndarray, kept: np.ndarray, labels: np.ndarray, min_area: float) -> list[Found]:
    """Blobs of ink with no kept object in them: a speck, or an object too faint or small to read,
    is still something drawn that the prompt did not ask for (colour: its most common label)."""
    # Blobs 2 px apart are one: noise near the ink threshold leaves islands beside an object's halo.
    near = _grown(ink, 1)
    rows, starts, ends, _ = _runs(near.astype(np.int64))
    if not len(rows):
        return []
    component = _components(rows, starts, ends, np.ones(len(rows), np.int64), ink.shape[1])
    kept_before = np.pad(np.cumsum(kept, axis=1), ((0, 0), (1, 0)))
    run_kept = kept_before[rows, ends] - kept_before[rows, starts]
    ink_before = np.pad(np.cumsum(ink, axis=1), ((0, 0), (1, 0)))
    run_ink = ink_before[rows, ends] - ink_before[rows, starts]
    specks = []
    for c in np.unique(component):
        mine = component == c
        r, s, e = rows[mine], starts[mine], ends[mine]
        area = int(run_ink[mine].sum())
        if area < min_area or run_kept[mine].sum():
            continue
        votes = np.concatenate([labels[row, start:end] for row, start, end in zip(r, s, e)])
        votes = votes[(votes > 0) & (votes != _UNKNOWN)]
        color = COLORS[np.bincount(votes).argmax() - 1] if len(votes) else None
        specks.append(Found(color, None, float(s.min() + e.max()) / 2, float(r.min() + r.max() + 1) / 2, area))
    return specks


def relation_seen(a: Found, b: Found, relation: str) -> bool:
    """`a` is `relation` `b`: displaced the right way along the axis, more than across it."""
    along, across = {"left of": (b.cx - a.cx, a.cy - b.cy), "right of": (a.cx - b.cx, a.cy - b.cy),
                     "above": (b.cy - a.cy, a.cx - b.cx), "below": (a.cy - b.cy, a.cx - b.cx)}[relation]
    return bool(along > abs(across))


def score(prompt: Prompt, found: list[Found]) -> dict:
    """How a picture answers its prompt. The world's prompts have distinct colours and
    distinct shapes, which the definitions rely on.

    present: every prompted (colour, shape) is among the found objects.
    binding: present, and no prompted colour also appears on another prompted shape.
    spatial: for "left of"/"right of"/"above"/"below", both objects found and the first
        (its largest instance) lies that way of the second, along the axis by more than
        across it; None for "and" and prompts without a relation.
    extra: how many found objects are left once each prompted (colour, shape) has claimed one
        found object: duplicates, other objects, unreadable shapes and specks, each counted.
    no_extra: extra is 0.
    exact: present, binding, no_extra and spatial not False.
    parseable: every found object has a palette colour and a shape that fits.
    Per prompted object not found as prompted, one error from the found objects of its shape:
    own_colour_errors: one has another prompted object's colour (a swap or leak, binding);
    other_colour_errors: otherwise one has a colour not in the prompt (weak conditioning);
    shape_errors: none has its shape but its colour is on another shape;
    missing: neither its shape nor its colour is anywhere.
    """
    pairs = {(f.color, f.shape) for f in found}
    colors = {c for c, _ in prompt.objects}
    present = all(o in pairs for o in prompt.objects)
    binding = present and not any((c, s) in pairs for c, _ in prompt.objects for _, s in prompt.objects
                                  if (c, s) not in prompt.objects)
    unclaimed = list(prompt.objects)
    extra = 0
    for f in found:
        if (f.color, f.shape) in unclaimed:
            unclaimed.remove((f.color, f.shape))
        else:
            extra += 1

    spatial = None
    if prompt.relation in SPATIAL:
        first, second = (next((f for f in found if (f.color, f.shape) == o), None) for o in prompt.objects)
        spatial = first is not None and second is not None and relation_seen(first, second, prompt.relation)

    errors = {"own_colour_errors": 0, "other_colour_errors": 0, "shape_errors": 0, "missing": 0}
    for color, shape in prompt.objects:
        if (color, shape) in pairs:
            continue
        drawn = {f.color for f in found if f.shape == shape}
        if drawn & (colors - {color}):
            errors["own_colour_errors"] += 1
        elif drawn:
            errors["other_colour_errors"] += 1
        elif any(f.color == color for f in found):
            errors["shape_errors"] += 1
        else:
            errors["missing"] += 1

    return {"present": present, "binding": binding, "spatial": spatial, "no_extra": extra == 0, "extra": extra,
            "exact": present and binding and extra == 0 and spatial is not False,
            "parseable": all(f.color is not None and f.shape is not None for f in found), **errors}


def validate(n: int, seed: int, degraded: bool, noise_sd: float = 0.0, size: int = 128) -> dict:
    """The evaluator on the generator's own pictures, optionally through the 8x latent and with
    Gaussian pixel noise of `noise_sd` per channel: share exact, the failures, ms per picture."""
    noise = np.random.Generator(np.random.PCG64(seed))
    failures, seconds = [], 0.0
    for scene in training_scenes(n, seed, size):
        pixels = np.asarray(render(scene, size))
        if degraded:
            pixels = through_latent(pixels)
        if noise_sd:
            pixels = np.rint(pixels + noise.normal(0, noise_sd, pixels.shape)).clip(0, 255).astype(np.uint8)
        start = time.perf_counter()
        result = score(scene.prompt, read_image(pixels))
        seconds += time.perf_counter() - start
        if not result["exact"]:
            failures.append((scene, result))
    return {"n": n, "exact": 1 - len(failures) / n, "failures": failures, "ms_per_image": 1000 * seconds / n}


def main(argv=None):
    from maskattn_shapes.cli import non_negative, positive

    parser = argparse.ArgumentParser(description="the evaluator's accuracy on the generator's own pictures")
    parser.add_argument("--n", type=positive(int), default=500, help="pictures per row")
    parser.add_argument("--seed", type=non_negative(int), default=1)
    parser.add_argument("--noise-sd", type=non_negative(float), default=16.0,
                        help="Gaussian pixel noise per channel for the third, noisy row")
    args = parser.parse_args(argv)
    for name, degraded, noise_sd in (("crisp", False, 0.0), ("through the latent", True, 0.0),
                                     (f"latent + noise sd {args.noise_sd:g}", True, args.noise_sd)):
        result = validate(args.n, args.seed, degraded, noise_sd)
        print(f"{name:>28}: {result['exact']:.1%} exact of {args.n}, {result['ms_per_image']:.1f} ms per picture")
        for scene, outcome in result["failures"][:5]:
            print(f"    {scene.caption!r}: {outcome}")


if __name__ == "__main__":
    main()
