from comfy_api.latest import io

from maskattn_comfy.folders import gate_fingerprint, gate_names, load_gates
from maskattn_comfy.patch import PatchOptions, apply_maskattn


class MaskAttnLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MaskAttnLoader",
            display_name="MaskAttn Loader",
            category="MaskAttn",
            description="Patches an SDXL-family MODEL with learned MaskAttn gates, which close the cross-attention "
                        "between image regions and the words that do not belong there (MaskAttn-SDXL, arXiv 2509.15357).",
            inputs=[
                io.Model.Input("model", tooltip="An SDXL-family model: SDXL base, a fine-tune, or a v-prediction model."),
                io.Combo.Input("gate_name", options=gate_names(),
                               tooltip="Gates from models/maskattn: this pack's .safetensors (made by trainer/train.py) "
                                       "or the authors' .pt checkpoints."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1 closes gated connections fully (the paper); 0.5 halves their attention; "
                                       "0 leaves the model untouched."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Where in the sampling schedule the gates start (0 = the first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Where in the sampling schedule the gates stop (1 = the last step)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with MaskAttn gates on its cross-attention.")],
        )

    @classmethod
    def fingerprint_inputs(cls, gate_name, **kwargs):
        return gate_fingerprint(gate_name)  # the file's content: a rewritten gate file re-runs the Loader

    @classmethod
    def execute(cls, model, gate_name, strength, start_percent, end_percent) -> io.NodeOutput:
        options = PatchOptions(strength=strength, start_percent=start_percent, end_percent=end_percent)
        return io.NodeOutput(apply_maskattn(model, load_gates(gate_name), options))
