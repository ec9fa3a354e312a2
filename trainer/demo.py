"""`--demo`: the whole pipeline on a CPU in about a minute, with nothing to download.

Everything here is RANDOM and only shows that the pipeline works: the UNet is the tiny
SDXL-topology model from maskattn_comfy.tiny_model with seeded random weights; the "VAE" is
a fixed random projection of 8x8 pixel patches to 4 channels; the "text encoders" give each
word a seeded random 2048-wide embedding and each caption a 1280-wide pooled vector. The
gates it trains load in MaskAttn Loader, but they mean nothing for a real SDXL checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import random
from pathlib import Path

import torch

from .base_model import BaseModel

DEMO_MODEL_NAME = "maskattn-demo-tiny-random"
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "white": (240, 240, 240), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")


def _seeded(text: str, *shape) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class DemoEncoders:
    """Deterministic random stand-ins for SDXL's VAE and text encoders (see the module docstring)."""

    identities = ("demo-patch-projection-1", "demo-word-embeddings-1")

    def __init__(self):
        self.projection = _seeded("demo-vae", 4, 3) * 0.5

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,H,W,3] in [0,1] -> [B,4,H/8,W/8]: 8x8 patch means, mixed by a fixed random 3->4 matrix."""
        patches = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1) * 2.0 - 1.0, 8)
        return torch.einsum("oc,bchw->bohw", self.projection, patches) / 0.13025

    def encode_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> context [1,77,2048] (start token, one random vector per word, end tokens), pooled [1,1280]."""
        words = caption.lower().replace(",", " ").split()[:75]
        end = _seeded("<end>", 2048)
        rows = [_seeded("<start>", 2048)] + [_seeded(w, 2048) for w in words]
        rows += [end] * (77 - len(rows))
        pooled = torch.stack([_seeded("pooled:" + w, 1280) for w in words] or [_seeded("pooled:", 1280)]).mean(0)
        return torch.stack(rows).unsqueeze(0), pooled.unsqueeze(0)

    def word_positions(self, caption: str) -> list[tuple[str, list[int]]]:
        """Each word and its context column (after the start token), as encode_text places them."""
        return [(word, [i + 1]) for i, word in enumerate(caption.lower().replace(",", " ").split()[:75])]

    def close(self) -> None:
        pass


@functools.lru_cache(maxsize=2)
def tiny_unet(seed: int = 0, dtype: torch.dtype = torch.float32):
    # Built once per process (filling its weights is the slow part); runs share it through clones,
    # and it stays frozen, so a run in the same process (the tests) starts from the same weights.
    from maskattn_comfy.tiny_model import TINY_UNET_CONFIG, build_sdxl_model

    return build_sdxl_model(TINY_UNET_CONFIG, seed=seed, dtype=dtype)


def validation_encoders(seed: int = 0):
    """(CLIP, VAE) for --validate-every in the demo: the stand-ins above cannot tokenize or decode, so
    validation uses ComfyUI's tiny SDXL CLIP (real tokenizers) and tiny VAE, seeded and random."""
    from maskattn_comfy.tiny_model import build_sdxl_clip, build_tiny_vae

    return build_sdxl_clip(seed), build_tiny_vae(seed)


def demo_base_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> BaseModel:
    from .base_model import check_sdxl, prediction_type

    patcher = tiny_unet(seed, dtype).clone()
    return BaseModel(patcher, check_sdxl(patcher, DEMO_MODEL_NAME), DemoEncoders, DemoEncoders.identities,
                     {"base_model": DEMO_MODEL_NAME, "base_model_sha256": "none (random weights, seed "
                      f"{seed})", "prediction": prediction_type(patcher)},
                     functools.partial(validation_encoders, seed))


def write_demo_dataset(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` images of coloured shapes with same-name .txt captions, in two subfolders; idempotent."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    names = list(COLOURS)
    for i in range(count):
        image_path = folder / f"set{i % 2}" / f"shape_{i:03d}.png"
        shape, fg, bg = rng.choice(SHAPES), rng.choice(names), rng.choice(names)
        while bg == fg:
            bg = rng.choice(names)
        size = (rng.choice((72, 80, 96)), rng.choice((64, 72, 80)))
        box = (size[0] // 4 + rng.randint(-6, 6), size[1] // 4 + rng.randint(-6, 6))
        box = box + (box[0] + size[0] // 2, box[1] + size[1] // 2)
        if image_path.is_file():
            continue
        image_path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", size, COLOURS[bg])
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[fg])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[fg])
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[fg])
        image.save(image_path)
        image_path.with_suffix(".txt").write_text(f"a {fg} {shape} on a {bg} background", encoding="utf-8")
    return folder
