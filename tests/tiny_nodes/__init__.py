"""Test-only ComfyUI nodes that supply the tiny built-in SDXL-topology model.

They are loaded only by the tests and the demo (from a temporary custom_nodes folder),
never by a user's ComfyUI.
"""

import sys
from pathlib import Path

from comfy_api.latest import ComfyExtension, io

_pack_root = str(Path(__file__).resolve().parents[2])  # custom_nodes may load this before the pack
if _pack_root not in sys.path:
    sys.path.append(_pack_root)

from maskattn_comfy.tiny_model import build_sdxl_clip, build_sdxl_model, build_tiny_vae

from .clip_vision import MaskAttnTinyCLIPVision


class MaskAttnTinySDXL(io.ComfyNode):
    """Stands in for CheckpointLoaderSimple: MODEL, CLIP (SDXL's real tokenizers), VAE, all tiny and seeded."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="MaskAttnTinySDXL", category="MaskAttn/testing",
                         inputs=[io.Int.Input("seed", default=0, min=0, max=2 ** 31)],
                         outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

    @classmethod
    def execute(cls, seed) -> io.NodeOutput:
        return io.NodeOutput(build_sdxl_model(seed=seed), build_sdxl_clip(seed), build_tiny_vae(seed))


class TinyNodes(ComfyExtension):
    async def get_node_list(self):
        return [MaskAttnTinySDXL, MaskAttnTinyCLIPVision]


async def comfy_entrypoint():
    return TinyNodes()
