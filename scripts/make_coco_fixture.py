#!/usr/bin/env python
"""Write tests/fixtures/coco_tiny/: three 64x48 pictures in COCO's layout, their captions and instance masks.

    .venv/bin/python scripts/make_coco_fixture.py [OUT_DIR]

captions_tiny.json is COCO caption JSON; instances_tiny.json is COCO instance JSON with every segmentation
kind COCO uses: polygons (the dogs, the teddy bear), compressed RLE (the cat) and uncompressed RLE with
iscrowd 1 (the person). One caption names its person only as "a man": that category stays unmatched. The
pictures are drawn from the same geometry as the masks. Deterministic: the same bytes every run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.coco_masks import encode_counts, mask_to_rle, polygons_to_mask  # noqa: E402

WIDTH, HEIGHT = 64, 48
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
              {"id": 17, "name": "cat", "supercategory": "animal"},
              {"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 88, "name": "teddy bear", "supercategory": "indoor"}]
COLOURS = {1: (230, 190, 150), 17: (90, 90, 90), 18: (150, 90, 40), 88: (200, 150, 60)}
GROUND = (70, 150, 70)


def ellipse_mask(box) -> np.ndarray:
    canvas = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(canvas).ellipse(box, fill=255)
    return np.asarray(canvas) > 0


# (image id, file, [(category id, kind, geometry)], captions)
SCENES = [
    (101, "000000000101.png", [(18, "polygon", [[4, 10, 26, 6, 30, 30, 8, 34]]),
                               (18, "polygon", [[38, 20, 60, 18, 58, 44, 36, 40]])],
     ["two dogs playing on the grass", "a dog and another dog"]),
    (102, "000000000102.png", [(17, "rle", (6, 8, 30, 40)), (88, "polygon", [[40, 8, 58, 8, 58, 40, 40, 40]])],
     ["a cat sitting next to a teddy bear", "a grey cat and a small teddy bear"]),
    (103, "000000000103.png", [(1, "crowd", (34, 2, 60, 46)), (18, "polygon", [[4, 26, 28, 26, 28, 44, 4, 44]])],
     ["a man walking his dog"]),
]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    images, captions, instances = [], [], []
    for image_id, file_name, objects, texts in SCENES:
        images.append({"id": image_id, "file_name": file_name, "height": HEIGHT, "width": WIDTH})
        picture = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        picture[:] = GROUND
        for category, kind, geometry in objects:
            if kind == "polygon":
                segmentation = geometry
                mask = polygons_to_mask(geometry, HEIGHT, WIDTH)
            else:
                mask = ellipse_mask(geometry)
                counts = mask_to_rle(mask)
                segmentation = ({"size": [HEIGHT, WIDTH], "counts": encode_counts(counts)} if kind == "rle"
                                else {"size": [HEIGHT, WIDTH], "counts": counts})
            picture[mask] = COLOURS[category]
            ys, xs = np.nonzero(mask)
            instances.append({"id": 1000 + len(instances), "image_id": image_id, "category_id": category,
                              "segmentation": segmentation, "area": int(mask.sum()),
                              "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                              "iscrowd": int(kind == "crowd")})
        Image.fromarray(picture, "RGB").save(out / file_name)
        for text in texts:
            captions.append({"id": 500 + len(captions), "image_id": image_id, "caption": text})
    (out / "captions_tiny.json").write_text(json.dumps({"images": images, "annotations": captions}, indent=1) + "\n")
    (out / "instances_tiny.json").write_text(json.dumps({"images": images, "categories": CATEGORIES,
                                                         "annotations": instances}) + "\n")
    print(f"{len(images)} images, {len(captions)} captions, {len(instances)} instances in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "tests" / "fixtures" / "coco_tiny")
