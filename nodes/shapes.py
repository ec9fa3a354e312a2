from comfy_api.latest import io

from maskattn_shapes.model import load_shapes_checkpoint


class MaskAttnShapesCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MaskAttnShapesCheckpoint",
            display_name="MaskAttn Shapes Checkpoint",
            category="MaskAttn",
            description="A small SDXL-topology model trained on a world of coloured circles, squares and triangles "
                        "(128x128 pictures), shipped with this pack so MaskAttn can be seen at work on any machine: "
                        "connect it as you would Load Checkpoint and use the shapes_gates_soft.safetensors gates (the ones that help most; EVIDENCE.md).",
            inputs=[],
            outputs=[io.Model.Output(tooltip="ComfyUI's SDXL UNet at 64 channels, v-prediction."),
                     io.Clip.Output(tooltip="ComfyUI's SDXL CLIP (real tokenizers), 3 layers, frozen random weights."),
                     io.Vae.Output(tooltip="A fixed 8x linear codec of each cell's colour.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(*load_shapes_checkpoint())
