"""Object masks as --mask-loss targets: which context columns each mask supervises, and the mask on the latent grid.

A mask names caption words ("red circle", "dogs"); every token of those words, wherever the words stand
in the caption as a whole, is supervised with it (a token named by two masks gets their union). The mask
takes the image's own crop (resized to cover the training size, centre-cropped, as `load_image`) and is
averaged onto the latent grid: each latent cell holds the share of its pixels inside the object. Each
gated layer averages it further to its own grid (maskattn_core.regions.layer_mask) when the loss is taken.

A mask that cannot be used is left out and counted, the example trains without it: unreadable, not the
image's size, not binary (values other than 0 and the maximum), or naming words the caption lacks.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import torch
import torch.nn.functional as F

from .data import MaskSource, SizeConditioning

REGIONS_VERSION = "regions-area-1"  # change when the targets' geometry changes: old cache entries no longer apply

# Why a mask was left out, by code (stored in the cache entry, so a cached run counts the same).
PROBLEMS = ("", "mask left out: unreadable", "mask left out: not the image's size",
            "mask left out: not binary (only 0 and the maximum allowed)",
            "mask left out: names words the caption does not hold")
OK, UNREADABLE, WRONG_SIZE, NOT_BINARY, NOT_IN_CAPTION = range(len(PROBLEMS))


class MaskProblem(ValueError):
    def __init__(self, code: int, detail: str = ""):
        super().__init__(detail)
        self.code = code


def decode_mask(source: MaskSource) -> np.ndarray:
    """bool [height, width] of a mask source; MaskProblem when it cannot be used."""
    if source.coco is not None:
        from .coco_masks import CocoMaskError, segmentation_to_mask

        record = json.loads(source.coco)
        height, width = record["height"], record["width"]
        mask = np.zeros((height, width), bool)
        try:
            for segmentation in record["segmentations"]:
                mask |= segmentation_to_mask(segmentation, height, width)
        except CocoMaskError as error:
            raise MaskProblem(UNREADABLE, str(error)) from None
        return mask
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source.path.read_bytes())) as image:
            image.load()
            if image.mode == "1":
                return np.asarray(image, bool)
            if image.mode not in ("L", "I;16", "I", "P", "RGB", "RGBA", "LA"):
                raise MaskProblem(NOT_BINARY, f"mode {image.mode}")
            values = np.asarray(image.convert("L") if image.mode in ("P", "RGB", "RGBA", "LA") else image)
    except MaskProblem:
        raise
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError
        raise MaskProblem(UNREADABLE, f"{type(error).__name__}: {error}") from None
    top = values.max() if values.size else 0
    if top == 0:  # all 0: an object that is not in the picture, every location closed for its words
        return np.zeros(values.shape, bool)
    if not np.isin(values, (0, top)).all():
        raise MaskProblem(NOT_BINARY, f"values {np.unique(values)[:5].tolist()}...")
    return values == top


def phrase_positions(words: list[tuple[str, list[int]]], phrase: str) -> list[int]:
    """Context columns of every whole-word occurrence of `phrase` in a caption split into (word, columns)."""
    wanted = re.findall(r"\w+|[^\w\s]", phrase.lower())
    texts = [word.lower() for word, _ in words]
    found: list[int] = []
    if not wanted:
        return found
    for start in range(len(texts) - len(wanted) + 1):
        if texts[start:start + len(wanted)] == wanted:
            for _, columns in words[start:start + len(wanted)]:
                found.extend(columns)
    return sorted(set(found))


def latent_grid_mask(mask: np.ndarray, size: SizeConditioning) -> torch.Tensor:
    """bool [H, W] at the image's original size -> float [h, w] on the latent grid of its training crop."""
    (width, height), (left, top), (target_w, target_h) = size.original, size.crop, size.target
    scale = max(target_w / width, target_h / height)
    resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))  # as load_image
    pixels = torch.from_numpy(mask.astype(np.float32))[None, None]
    pixels = F.interpolate(pixels, size=(resized[1], resized[0]), mode="area" if scale <= 1 else "bilinear",
                           **({} if scale <= 1 else {"align_corners": False}))
    crop = pixels[..., top:top + target_h, left:left + target_w]
    return F.adaptive_avg_pool2d(crop, (target_h // 8, target_w // 8))[0, 0].clamp(0.0, 1.0)


def region_targets(sources, size: SizeConditioning, words: list[tuple[str, list[int]]]):
    """(positions int64 [K], masks float32 [K, h, w], problem codes uint8 [len(sources)]) for one example."""
    by_position: dict[int, torch.Tensor] = {}
    codes = []
    for source in sources:
        try:
            mask = decode_mask(source)
            if mask.shape != (size.original[1], size.original[0]):
                raise MaskProblem(WRONG_SIZE)
            positions = phrase_positions(words, source.words)
            if not positions:
                raise MaskProblem(NOT_IN_CAPTION)
        except MaskProblem as problem:
            codes.append(problem.code)
            continue
        codes.append(OK)
        grid = latent_grid_mask(mask, size)
        for position in positions:
            by_position[position] = grid if position not in by_position else torch.maximum(by_position[position], grid)
    h, w = size.target[1] // 8, size.target[0] // 8
    positions = sorted(by_position)
    masks = torch.stack([by_position[p] for p in positions]) if positions else torch.zeros(0, h, w)
    return torch.tensor(positions, dtype=torch.int64), masks, torch.tensor(codes, dtype=torch.uint8)
