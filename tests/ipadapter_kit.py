"""cubiq's ComfyUI_IPAdapter_plus from the host snapshot, and tiny random IPAdapter weights for the tiny SDXL model.

The snapshot (`ComfyUI_IPAdapter_plus-9d076a3.tar.gz`) is looked for in $MASKATTN_HOSTS, else in
../shared/hosts beside the repository; .ci/run exports MASKATTN_HOSTS. Its code is never modified:
it is unpacked into a temporary custom_nodes/ and loaded through ComfyUI's own loader.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
HOSTS = Path(os.environ.get("MASKATTN_HOSTS") or REPO.parent / "shared" / "hosts")
SNAPSHOT = HOSTS / "ComfyUI_IPAdapter_plus-9d076a3.tar.gz"
PACK = "ComfyUI_IPAdapter_plus"
MISSING = (f"IPAdapter_plus snapshot not found at {SNAPSHOT} (set MASKATTN_HOSTS to the folder holding "
           "ComfyUI_IPAdapter_plus-9d076a3.tar.gz)")
needs_snapshot = pytest.mark.skipif(not SNAPSHOT.is_file(), reason=MISSING)

CLIP_EMBED_DIM = 32  # the image embedding's width: the tiny CLIP vision model's projection
IMAGE_TOKENS = 4  # the basic (non-plus) IPAdapter's extra context tokens


def unpack(custom_nodes: Path) -> Path:
    """The pack as a folder of `custom_nodes`, exactly as in the snapshot."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    with tarfile.open(SNAPSHOT) as archive:
        archive.extractall(custom_nodes, filter="data")
    folder = custom_nodes / PACK
    assert (folder / "CrossAttentionPatch.py").is_file(), f"{SNAPSHOT} holds no {PACK}/CrossAttentionPatch.py"
    return folder


def load_pack(custom_nodes: Path):
    """The pack loaded by ComfyUI's loader (nodes.load_custom_node); its IPAdapterPlus module."""
    import nodes

    if not SNAPSHOT.is_file():
        pytest.skip(MISSING)
    folder = unpack(custom_nodes)
    assert asyncio.run(nodes.load_custom_node(str(folder))), "ComfyUI failed to load ComfyUI_IPAdapter_plus"
    (module,) = [m for name, m in sys.modules.items() if name.endswith(f"{PACK}.IPAdapterPlus")]
    return module


def ipadapter_layer_order() -> list[tuple[str, int, int]]:
    """SDXL's attn2 keys in the order IPAdapter numbers its weights (layer i: "{2i+1}.to_k_ip")."""
    depth = {4: 2, 5: 2, 7: 10, 8: 10}
    keys = [("input", b, i) for b in (4, 5, 7, 8) for i in range(depth[b])]
    keys += [("output", b, i) for b in range(6) for i in range(10 if b < 3 else 2)]
    return keys + [("middle", 1, i) for i in range(10)]


def tiny_ipadapter_weights(model, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A basic SDXL IPAdapter for `model` as a flat state dict (image_proj.*, ip_adapter.*), seeded: the layers the
    model has get to_k_ip/to_v_ip of their own width, as a real file's would."""
    from maskattn_comfy.model_check import diffusion_model_of

    unet = diffusion_model_of(model)
    g = torch.Generator().manual_seed(seed)
    width = {}
    for name, block in (("input", unet.input_blocks), ("output", unet.output_blocks)):
        for number, seq in enumerate(block):
            for layer in seq:
                for index, transformer in enumerate(getattr(layer, "transformer_blocks", None) or []):
                    width[(name, number, index)] = transformer.attn2.to_k.out_features
    weights = {
        "image_proj.proj.weight": torch.randn(IMAGE_TOKENS * 2048, CLIP_EMBED_DIM, generator=g) / CLIP_EMBED_DIM ** 0.5,
        "image_proj.proj.bias": 0.1 * torch.randn(IMAGE_TOKENS * 2048, generator=g),
        "image_proj.norm.weight": 1.0 + 0.1 * torch.randn(2048, generator=g),
        "image_proj.norm.bias": 0.1 * torch.randn(2048, generator=g),
    }
    for i, key in enumerate(ipadapter_layer_order()):
        if key in width:
            for kind in ("k", "v"):
                weights[f"ip_adapter.{2 * i + 1}.to_{kind}_ip.weight"] = (
                    scale * torch.randn(width[key], 2048, generator=g) / 2048 ** 0.5)
    return weights


def as_ipadapter_model(flat: dict[str, torch.Tensor]) -> dict:
    """The dict IPAdapterModelLoader returns for a .safetensors file ({"image_proj": ..., "ip_adapter": ...})."""
    return {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
            for part in ("image_proj", "ip_adapter")}


def image_embeds(seed: int, batch: int = 1) -> torch.Tensor:
    """What a CLIP vision model's image_embeds would be: [batch, CLIP_EMBED_DIM]."""
    return torch.randn(batch, CLIP_EMBED_DIM, generator=torch.Generator().manual_seed(seed))
