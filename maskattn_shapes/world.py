"""A world of captioned pictures: 1-3 flat shapes on a grey ground, templated captions.

Every scene uses distinct colours and distinct shapes, so each object is named by its
colour or by its shape alone and a colour on the wrong shape is unambiguous (a binding
error). Some colour-shape combinations and some spatial pairings never occur in training;
`heldout_prompts` builds evaluation prompts from them. Same seed, same scenes, same PNG bytes.

    python -m maskattn_shapes.world OUT_DIR --n 20000 --seed 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND = (235, 235, 235)
PALETTE = {
    "red": (220, 30, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 0),
    "purple": (140, 60, 180),
    "orange": (245, 125, 0),
    "cyan": (30, 200, 210),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below", "and")
SPATIAL = RELATIONS[:4]
KINDS = ("single", "single_seen", "pair", "relation", "triple")

# Geometry at 128 px; everything scales with the image side.
EXTENT = (36, 52)
MIN_GAP = 8  # one latent cell, so the 8x-pooled picture keeps the objects apart
BORDER = 2
AXIS_MARGIN = 24  # a spatial relation's centres differ by this much along its axis ...
CROSS_RATIO = 0.5  # ... and by at most this fraction of that along the other axis

# Never in training, in any scene: each colour and each shape still occurs with others.
HELDOUT_COMBOS = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("cyan", "triangle"))
# A fixed share of the spatial pairings between seen combinations, drawn once for the world.
HELDOUT_PAIRING_SHARE = 0.15
SPLIT_SEED = 10
OBJECT_COUNT_WEIGHTS = (0.2, 0.6, 0.2)

Combo = tuple[str, str]


@dataclass(frozen=True)
class Obj:
    """One shape; (cx, cy) is the centre of its extent x extent box, in pixels."""

    color: str
    shape: str
    cx: float
    cy: float
    extent: float

    def __post_init__(self):
        if self.color not in PALETTE:
            raise ValueError(f"color {self.color!r} is not in the palette {COLORS}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {SHAPES}")


@dataclass(frozen=True)
class Prompt:
    """What a caption asks for: objects as (color, shape) in caption-spec order, the relation
    between objects[0] and objects[1] ("left of", "right of", "above", "below", "and"), or None."""

    objects: tuple[Combo, ...]
    relation: str | None
    text: str

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(tuple(o) for o in self.objects))
        for color, shape in self.objects:
            if color not in PALETTE or shape not in SHAPES:
                raise ValueError(f"object {(color, shape)} is not a colour in {COLORS} on a shape in {SHAPES}")
        if not _compatible(self.objects):
            raise ValueError(f"objects {self.objects} repeat a colour or a shape; the world's scenes never do")
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a prompt has 1-3 objects, got {len(self.objects)}: {self.objects}")
        if (self.relation is not None) != (len(self.objects) == 2):
            raise ValueError(f"relation {self.relation!r} with {len(self.objects)} objects: "
                             "exactly the two-object prompts have one")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation {self.relation!r} is not one of {RELATIONS}")


@dataclass(frozen=True)
class Scene:
    """A picture's layout (coordinates in pixels of a size x size image) and its caption."""

    objects: tuple[Obj, ...]
    relation: str | None
    caption: str
    size: int = 128

    @property
    def prompt(self) -> Prompt:
        return Prompt(tuple((o.color, o.shape) for o in self.objects), self.relation, self.caption)


# ---- captions ----

def _phrase(combo: Combo) -> str:
    color, shape = combo
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


# (relation, template); {0} {1} {2} are the objects in spec order.
TEMPLATES = {
    1: ((None, "{0}"),),
    2: (
        ("left of", "{0} to the left of {1}"), ("left of", "{0} is left of {1}"),
        ("left of", "{1} with {0} on its left"),
        ("right of", "{0} to the right of {1}"), ("right of", "{0} is right of {1}"),
        ("right of", "{1} with {0} on its right"),
        ("above", "{0} above {1}"), ("above", "{0} is above {1}"), ("above", "{1} with {0} above it"),
        ("below", "{0} below {1}"), ("below", "{0} is below {1}"), ("below", "{1} with {0} below it"),
        ("and", "{0} and {1}"),
    ),
    3: ((None, "{0}, {1} and {2}"), (None, "{0}, {1}, and {2}")),
}

_NOUN_PHRASE = rf"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"


def _template_pattern(template: str) -> tuple[re.Pattern, list[int]]:
    order = [int(i) for i in re.findall(r"\{(\d)\}", template)]
    pattern = re.escape(template)
    for i in range(3):
        pattern = pattern.replace(re.escape(f"{{{i}}}"), _NOUN_PHRASE)
    return re.compile(pattern), order


_PARSERS = [(count, relation, *_template_pattern(template))
            for count, templates in TEMPLATES.items() for relation, template in templates]


def caption(objects: tuple[Combo, ...], relation: str | None, template: int = 0) -> str:
    """The caption of `objects` (spec order) and `relation` with the relation's `template`-th form."""
    forms = [t for r, t in TEMPLATES[len(objects)] if r == relation]
    if not forms:
        raise ValueError(f"no caption for relation {relation!r} with {len(objects)} objects")
    return forms[template % len(forms)].format(*map(_phrase, objects))


def parse_caption(text: str) -> Prompt:
    """Invert every caption template: the objects in spec order and the relation."""
    for count, relation, pattern, order in _PARSERS:
        match = pattern.fullmatch(text.strip())
        if match:
            groups = match.groups()
            objects = [None] * count
            for slot, spec_index in enumerate(order):
                objects[spec_index] = (groups[2 * slot], groups[2 * slot + 1])
            return Prompt(tuple(objects), relation, text)
    raise ValueError(f"caption {text!r} matches none of the world's templates")


def _random_caption(objects: tuple[Combo, ...], relation: str | None, rng: np.random.Generator) -> str:
    forms = [r for r, _ in TEMPLATES[len(objects)]].count(relation)
    return caption(objects, relation, int(rng.integers(forms)))


# ---- the split ----

def pairing(a: Combo, relation: str, b: Combo) -> tuple[Combo, str, Combo]:
    """One geometric fact, however it is phrased: "a right of b" is "b left of a"."""
    if relation in ("right of", "below"):
        a, b = b, a
    return a, ("left of" if relation in ("left of", "right of") else "above"), b


def _compatible(objects) -> bool:
    colors = [c for c, _ in objects]
    shapes = [s for _, s in objects]
    return len(set(colors)) == len(colors) and len(set(shapes)) == len(shapes)


SEEN_COMBOS = tuple(c for c in itertools.product(COLORS, SHAPES) if c not in HELDOUT_COMBOS)


def _heldout_pairings() -> tuple[tuple[Combo, str, Combo], ...]:
    facts = [(a, axis, b) for axis in ("left of", "above")
             for a, b in itertools.permutations(SEEN_COMBOS, 2) if _compatible((a, b))]
    rng = np.random.Generator(np.random.PCG64(SPLIT_SEED))
    chosen = rng.choice(len(facts), size=round(HELDOUT_PAIRING_SHARE * len(facts)), replace=False)
    return tuple(facts[i] for i in sorted(chosen))


HELDOUT_PAIRINGS = _heldout_pairings()
_HELDOUT_PAIRING_SET = frozenset(HELDOUT_PAIRINGS)


def in_training_split(objects: tuple[Combo, ...], relation: str | None) -> bool:
    if any(o in HELDOUT_COMBOS for o in objects):
        return False
    return relation not in SPATIAL or pairing(objects[0], relation, objects[1]) not in _HELDOUT_PAIRING_SET


# ---- layout and rendering ----

def _boxes_apart(a: Obj, b: Obj, gap: float) -> bool:
    reach = (a.extent + b.extent) / 2
    return max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - reach >= gap


def relation_holds(a: Obj, b: Obj, relation: str, margin: float = AXIS_MARGIN, cross_ratio: float = CROSS_RATIO,
                   ) -> bool:
    """The generator's (strict) test: `a` lies `relation` `b` by `margin` along the axis, and off-axis
    by at most `cross_ratio` of the on-axis distance."""
    along, across = {"left of": (b.cx - a.cx, a.cy - b.cy), "right of": (a.cx - b.cx, a.cy - b.cy),
                     "above": (b.cy - a.cy, a.cx - b.cx), "below": (a.cy - b.cy, a.cx - b.cx)}[relation]
    return along >= margin and abs(across) <= cross_ratio * along


def _layout(objects: tuple[Combo, ...], relation: str | None, size: int, rng: np.random.Generator
            ) -> tuple[Obj, ...]:
    scale = size / 128
    low, high = round(EXTENT[0] * scale), round(EXTENT[1] * scale)
    for _ in range(10_000):
        placed = []
        for color, shape in objects:
            extent = int(rng.integers(low, high + 1))
            half = extent / 2 + BORDER * scale
            cx, cy = (float(v) for v in rng.uniform(half, size - half, size=2).round())
            placed.append(Obj(color, shape, cx, cy, float(extent)))
        if not all(_boxes_apart(a, b, MIN_GAP * scale) for a, b in itertools.combinations(placed, 2)):
            continue
        if relation in SPATIAL and not relation_holds(*placed, relation, AXIS_MARGIN * scale):
            continue
        return tuple(placed)
    raise RuntimeError(f"no layout found for {objects} {relation!r} at size {size}")


def scene_for(prompt: Prompt, seed: int = 0, size: int = 128) -> Scene:
    """A picture of `prompt` (split not checked): the generator's answer key for any prompt."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return Scene(_layout(prompt.objects, prompt.relation, size, rng), prompt.relation, prompt.text, size)


_SUPERSAMPLE = 4


def _coverage(obj: Obj, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Share of each pixel inside the shape, from a 4x4 grid of samples per pixel."""
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    sx = (x[:, None] + offsets).reshape(1, -1) - obj.cx
    sy = (y[:, None] + offsets).reshape(-1, 1) - obj.cy
    half = obj.extent / 2
    if obj.shape == "square":
        inside = (np.abs(sx) <= half) & (np.abs(sy) <= half)
    elif obj.shape == "circle":
        inside = sx ** 2 + sy ** 2 <= half ** 2
    else:  # upright triangle: apex at the top centre, base along the box's bottom edge
        inside = (sy <= half) & (np.abs(sx) <= (sy + half) / 2)
    return inside.reshape(len(y), _SUPERSAMPLE, len(x), _SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, size: int = 128) -> Image.Image:
    """The scene drawn at `size` px (coordinates scaled from scene.size), antialiased."""
    scale = size / scene.size
    canvas = np.empty((size, size, 3), np.float64)
    canvas[:] = BACKGROUND
    for o in scene.objects:
        o = Obj(o.color, o.shape, o.cx * scale, o.cy * scale, o.extent * scale)
        x0, y0 = (max(int(np.floor(c - o.extent / 2)) - 1, 0) for c in (o.cx, o.cy))
        x1, y1 = (min(int(np.ceil(c + o.extent / 2)) + 1, size) for c in (o.cx, o.cy))
        alpha = _coverage(o, np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64))[..., None]
        crop = canvas[y0:y1, x0:x1]
        crop[:] = crop * (1 - alpha) + np.asarray(PALETTE[o.color], np.float64) * alpha
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")


# ---- scenes and prompts ----

def _draw_spec(rng: np.random.Generator) -> tuple[tuple[Combo, ...], str | None]:
    while True:
        count = int(rng.choice(3, p=OBJECT_COUNT_WEIGHTS)) + 1
        shapes = rng.permutation(len(SHAPES))[:count]
        colors = rng.permutation(len(COLORS))[:count]
        objects = tuple((COLORS[c], SHAPES[s]) for c, s in zip(colors, shapes))
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))] if count == 2 else None
        if in_training_split(objects, relation):
            return objects, relation


def training_scenes(n: int, seed: int, size: int = 128) -> list[Scene]:
    """`n` scenes from the training split; scene i is the same for every n > i."""
    rng = np.random.Generator(np.random.PCG64(seed))
    scenes = []
    for _ in range(n):
        objects, relation = _draw_spec(rng)
        text = _random_caption(objects, relation, rng)
        scenes.append(Scene(_layout(objects, relation, size, rng), relation, text, size))
    return scenes


def without_colours(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with a caption that names some of its objects by their shape alone ("a circle" for "a red
    circle"): each object's colour word is left out with probability 1/2, at least one's. The picture is the
    same, so the shape word alone must carry the shape (training's colour-word dropout: a colour seen with
    only some shapes then pulls less towards them)."""
    dropped = rng.random(len(scene.objects)) < 0.5
    if not dropped.any():
        dropped[int(rng.integers(len(scene.objects)))] = True
    text = scene.caption
    for o, drop in zip(scene.objects, dropped):
        if drop:
            text = re.sub(rf"\ban? {o.color} {o.shape}\b", f"a {o.shape}", text, count=1)
    return Scene(scene.objects, scene.relation, text, scene.size)


def _heldout_specs(kind: str) -> list[tuple[tuple[Combo, ...], str | None]]:
    every = tuple(itertools.product(COLORS, SHAPES))
    if kind == "single":
        return [((c,), None) for c in HELDOUT_COMBOS]
    if kind == "single_seen":
        return [((c,), None) for c in SEEN_COMBOS]
    if kind == "pair":
        return [(pair, r) for pair in itertools.permutations(every, 2) for r in RELATIONS
                if _compatible(pair) and any(o in HELDOUT_COMBOS for o in pair)]
    if kind == "relation":
        return [(pair, r) for pair in itertools.permutations(SEEN_COMBOS, 2) for r in SPATIAL
                if _compatible(pair) and pairing(pair[0], r, pair[1]) in _HELDOUT_PAIRING_SET]
    if kind == "triple":
        return [(triple, None) for triple in itertools.permutations(every, 3)
                if _compatible(triple) and any(o in HELDOUT_COMBOS for o in triple)]
    raise ValueError(f"kind {kind!r} is not one of {KINDS}")


def heldout_prompts(n: int, seed: int, kind: str) -> list[Prompt]:
    """`n` evaluation prompts of `kind`, each distinct spec used equally often (±1), in shuffled order.

    single: one held-out combo. single_seen: one combo seen in training (the control set).
    pair: two objects, at least one a held-out combo, any relation. relation: two seen combos
    in a held-out spatial pairing, phrased either way round. triple: three objects, at least
    one a held-out combo.
    """
    specs = _heldout_specs(kind)
    rng = np.random.Generator(np.random.PCG64(seed))
    order = np.concatenate([rng.permutation(len(specs)) for _ in range(-(-n // len(specs)))])[:n]
    prompts = []
    for i in order:
        objects, relation = specs[i]
        prompts.append(Prompt(objects, relation, _random_caption(objects, relation, rng)))
    return prompts


def split_description() -> dict:
    return {
        "palette": PALETTE, "background": BACKGROUND, "shapes": SHAPES, "relations": RELATIONS,
        "heldout_combos": [list(c) for c in HELDOUT_COMBOS],
        "heldout_pairings": [[list(a), axis, list(b)] for a, axis, b in HELDOUT_PAIRINGS],
        "heldout_pairings_note": "each [A, axis, B] means A left of / above B, in every phrasing",
    }


MASK_FORMAT = ("NNNNNN.masks/<colour>_<shape>.png beside NNNNNN.png: one per object, 8-bit greyscale, the picture's "
               "size, 255 where at least half of the pixel lies inside the shape, else 0; the name is the caption "
               "words of the object with '_' for the space (trainer/README.md, --mask-loss)")


def object_mask(obj: Obj, size: int) -> Image.Image:
    """The object's pixels (at least half covered, the rendering's antialiasing cut at 0.5) as a 0/255 L image."""
    coverage = _coverage(obj, np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    return Image.fromarray(np.where(coverage >= 0.5, 255, 0).astype(np.uint8), "L")


def write_folder(folder, n: int, seed: int, size: int = 128) -> Path:
    """`n` training pictures as NNNNNN.png with same-name .txt captions, each object's mask in NNNNNN.masks/
    (MASK_FORMAT), and world.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(training_scenes(n, seed, size)):
        render(scene, size).save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
        masks = folder / f"{i:06d}.masks"
        masks.mkdir(exist_ok=True)
        scale = size / scene.size
        for o in scene.objects:
            scaled = Obj(o.color, o.shape, o.cx * scale, o.cy * scale, o.extent * scale)
            object_mask(scaled, size).save(masks / f"{o.color}_{o.shape}.png")
    description = {"n": n, "seed": seed, "size": size, "masks": MASK_FORMAT, **split_description()}
    (folder / "world.json").write_text(json.dumps(description, indent=1) + "\n", encoding="utf-8")
    return folder


def _image_size(text: str) -> int:
    from maskattn_shapes.cli import number

    size = number(int, text)
    if not (32 <= size <= 1024 and size % 8 == 0):
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (the latent's factor) from 32 to 1024, got {text}")
    return size


def main(argv=None):
    from maskattn_shapes.cli import non_negative, positive, writable_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=positive(int), default=20000, help="pictures")
    parser.add_argument("--seed", type=non_negative(int), default=0)
    parser.add_argument("--size", type=_image_size, default=128, help="image side in pixels")
    args = parser.parse_args(argv)
    writable_folder(parser, args.out_dir, "out_dir")
    folder = write_folder(args.out_dir, args.n, args.seed, args.size)
    print(f"{args.n} pictures, their captions and object masks, and world.json in {folder}")


if __name__ == "__main__":
    main()
