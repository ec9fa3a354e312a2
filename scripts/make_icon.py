"""Draw the pack's icon, docs/icon.png: a Shapes-world scene (its palette, its renderer) under the
grid of latent cells the gates decide on, the cells each word may reach outlined in its colour.

    .venv/bin/python scripts/make_icon.py [OUT.png]

256x256 px, square (the Comfy Registry shows icons up to 400x400). Nothing is copied: every
pixel comes from maskattn_shapes.world.render and the lines drawn here.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from maskattn_shapes.world import BACKGROUND, PALETTE, Obj, Scene, render  # noqa: E402

SIZE = 256
CELLS = 8  # the gates' view: one decision per latent location and word
OBJECTS = (Obj("red", "circle", 76, 84, 92), Obj("blue", "square", 184, 92, 84), Obj("yellow", "triangle", 128, 190, 88))


def icon():
    import numpy as np
    from PIL import Image

    shapes = render(Scene(OBJECTS, None, "a red circle, a blue square and a yellow triangle", SIZE), SIZE)
    ground = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(ground)
    cell = SIZE // CELLS
    for o in OBJECTS:  # the cells whose centre lies in the object's box, where its words stay open: tinted
        half = o.extent / 2
        tint = tuple(round(0.75 * b + 0.25 * c) for b, c in zip(BACKGROUND, PALETTE[o.color]))
        for row in range(CELLS):
            for col in range(CELLS):
                if abs((col + 0.5) * cell - o.cx) < half and abs((row + 0.5) * cell - o.cy) < half:
                    draw.rectangle([col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1], fill=tint)
    for i in range(1, CELLS):
        draw.line([(i * cell, 0), (i * cell, SIZE)], fill=(200, 200, 200), width=1)
        draw.line([(0, i * cell), (SIZE, i * cell)], fill=(200, 200, 200), width=1)
    # The shapes over the grid, with their antialiased edges blended onto it.
    drawn, plain = np.asarray(shapes, np.float64), np.asarray(BACKGROUND, np.float64)
    alpha = np.abs(drawn - plain).max(-1, keepdims=True) > 0
    out = np.where(alpha, drawn, np.asarray(ground, np.float64))
    return Image.fromarray(out.astype(np.uint8), "RGB")


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "icon.png"
    icon().save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
