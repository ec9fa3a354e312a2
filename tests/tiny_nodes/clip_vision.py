"""A tiny real CLIP vision model (comfy.clip_vision.ClipVisionModel, 2 layers, 32 wide, 224 px input), seeded.

Stands in for CLIPVisionLoader in the IPAdapter tests: IPAdapter_plus encodes the reference image
with it through its own code. Its 32-wide projection matches tests/ipadapter_kit.CLIP_EMBED_DIM.
"""

from pathlib import Path

from comfy_api.latest import io

CONFIG = Path(__file__).resolve().parent / "tiny_clip_vision.json"


def build_tiny_clip_vision(seed: int = 0):
    import comfy.clip_vision
    from maskattn_comfy.tiny_model import fill_

    clip_vision = comfy.clip_vision.ClipVisionModel(str(CONFIG))
    fill_(clip_vision.model, seed, scale=0.2)
    return clip_vision


class MaskAttnTinyCLIPVision(io.ComfyNode):
    """Stands in for CLIPVisionLoader."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="MaskAttnTinyCLIPVision", category="MaskAttn/testing",
                         inputs=[io.Int.Input("seed", default=0, min=0, max=2 ** 31)],
                         outputs=[io.ClipVision.Output()])

    @classmethod
    def execute(cls, seed) -> io.NodeOutput:
        return io.NodeOutput(build_tiny_clip_vision(seed))
