"""COCO instance segmentations for --mask-loss: the objects of each image (instances_*.json), the caption words
that name their category, and their pixels, decoded without pycocotools (polygons, uncompressed and compressed RLE).

COCO's run-length encoding (pycocotools' maskApi.c) runs down the columns of an image (Fortran order),
starting with a run of 0s. Compressed RLE writes each count (after the third, as the difference from the
count two before) in little-endian groups of 5 bits, one character per group: chr(48 + bits), with 0x20 set
while more groups follow and 0x10 the sign bit of the last group.
"""

from __future__ import annotations

import numpy as np


class CocoMaskError(ValueError):
    """A segmentation that cannot be decoded; the message says what is wrong with it."""


def decode_counts(text: str) -> list[int]:
    """pycocotools' compressed RLE string -> run lengths (rleFrString)."""
    counts: list[int] = []
    data = text.encode("ascii") if isinstance(text, str) else bytes(text)
    position = 0
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(data):
                raise CocoMaskError("compressed RLE string ends inside a count")
            group = data[position] - 48
            if not 0 <= group < 64:
                raise CocoMaskError(f"compressed RLE holds the character {chr(data[position])!r}, outside its alphabet")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def encode_counts(counts: list[int]) -> str:
    """Run lengths -> pycocotools' compressed RLE string (rleToString); for making fixtures."""
    out = []
    for index, count in enumerate(counts):
        value = count - counts[index - 2] if index > 2 else count
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            if more:
                group |= 0x20
            out.append(chr(group + 48))
    return "".join(out)


def rle_to_mask(counts: list[int], height: int, width: int) -> np.ndarray:
    """Run lengths (0s first, down the columns) -> bool [height, width]."""
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        raise CocoMaskError(f"RLE runs sum to {sum(counts)} pixels (negative runs: {any(c < 0 for c in counts)}), "
                            f"but the image has {height} x {width} = {height * width}")
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """bool [height, width] -> run lengths, 0s first, down the columns (for making fixtures)."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def polygons_to_mask(polygons, height: int, width: int) -> np.ndarray:
    """COCO polygons ([[x1, y1, x2, y2, ...], ...], pixel coordinates) -> bool [height, width], filled."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if not isinstance(polygon, (list, tuple)) or len(polygon) < 6 or len(polygon) % 2:
            raise CocoMaskError(f"a polygon needs at least 3 (x, y) points as a flat list, got {str(polygon)[:60]}")
        points = [(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon), 2)]
        draw.polygon(points, fill=255, outline=255)
    return np.asarray(canvas) > 0


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """Any COCO `segmentation` (polygons, {"counts": [..]} or {"counts": "..."} with "size" [h, w]) -> bool mask."""
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size = segmentation.get("size", [height, width])
        if [int(s) for s in size] != [height, width]:
            raise CocoMaskError(f"RLE of size {list(size)} for an image of {height} x {width}")
        counts = segmentation["counts"]
        if isinstance(counts, str):
            counts = decode_counts(counts)
        elif not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise CocoMaskError("RLE counts must be a list of integers or a compressed string")
        return rle_to_mask(counts, height, width)
    raise CocoMaskError(f"a segmentation is a list of polygons or an RLE dict, got {type(segmentation).__name__}")


# -- instances_*.json: which objects each image holds, and which caption words name them ----------------

# Plurals the rules below get wrong, among COCO's 80 category names and common words.
IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis",
                     "scissors": "scissors", "glasses": "glasses", "bus": "buses"}


def plural(noun: str) -> str:
    """English plural of a (last) word: irregular ones, -es after s/x/z/ch/sh, -ies after a consonant + y, else -s."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and len(noun) > 1 and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def caption_words(caption: str) -> list[str]:
    import re

    return re.findall(r"[a-z0-9]+", caption.lower())


def named_as(category: str, caption: str) -> str | None:
    """The words of `caption` that name `category` ("dog" in "two dogs play" -> "dogs"), or None: the name or its
    plural (of the last word, "teddy bears"), as whole words."""
    words = caption_words(caption)
    name = caption_words(category)
    if not name:
        return None
    for form in (name, name[:-1] + [plural(name[-1])]):
        for start in range(len(words) - len(form) + 1):
            if words[start:start + len(form)] == form:
                return " ".join(form)
    return None


def read_instances(path) -> tuple[dict, dict]:
    """({image id: (height, width)}, {image id: {category name: [segmentation, ...]}}) from an instances file.

    Raises CocoMaskError for a file that is not COCO instance JSON."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        sizes = {record["id"]: (int(record["height"]), int(record["width"])) for record in data["images"]}
        names = {record["id"]: str(record["name"]) for record in data["categories"]}
        objects: dict = {}
        for record in data["annotations"]:
            if record.get("image_id") in sizes and record.get("category_id") in names and "segmentation" in record:
                by_name = objects.setdefault(record["image_id"], {})
                by_name.setdefault(names[record["category_id"]], []).append(record["segmentation"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CocoMaskError(f"{path} is not COCO instance JSON (needs \"images\" with id/height/width, "
                            f"\"categories\" with id/name and \"annotations\" with image_id/category_id/"
                            f"segmentation): {type(error).__name__}: {error}") from error
    return sizes, objects
