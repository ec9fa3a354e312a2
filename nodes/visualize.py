from comfy_api.latest import io, ui

from maskattn_comfy.render import GROUPINGS
from maskattn_comfy.visualize import VisualizeOptions, visualize_mask

MAPS = {
    "gate probability": "probability",
    "hard gate": "hard",
    "attention with mask": "attention_masked",
    "attention without mask": "attention_unmasked",
    "attention difference": "difference",
    "region mask": "region",
}


class MaskAttnVisualize(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MaskAttnVisualize",
            display_name="Visualize Mask",
            category="MaskAttn",
            is_output_node=True,  # runs and shows its grid even when nothing is connected to its outputs
            description="Shows which image regions each word of the prompt may reach through MaskAttn's gates, "
                        "layer by layer, and how cross-attention changes because of them.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of MaskAttn Loader (or of MaskAttn Region for the "
                                                "region mask)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint: it encodes the prompt and splits "
                                              "it into the tokens that label the columns."),
                io.String.Input("text", multiline=True, tooltip="The prompt to map (ComfyUI's (word:1.2) syntax works)."),
                io.Latent.Input("latent", tooltip="A sampled image's latent, or an empty latent for the image size."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise added at each noise level."),
                io.Int.Input("noise_levels", default=4, min=1, max=50,
                             tooltip="How many noise levels to average over (one model call each)."),
                io.Float.Input("start_percent", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="The noisiest level, as a fraction of the sampling schedule (0 = pure noise)."),
                io.Float.Input("end_percent", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="The least noisy level (1 = the end of the schedule)."),
                io.Combo.Input("map", options=list(MAPS), default="gate probability",
                               tooltip="Gate probability, the hard gate (open/closed), cross-attention with the "
                                       "mask, the same attention with the mask removed, or their difference; "
                                       "region mask: what MaskAttn Region nodes on this MODEL let each token keep "
                                       "of its attention weight, per layer (1 = free, 0 = closed; needs no "
                                       "Loader and runs no model)."),
                io.Combo.Input("grouping", options=list(GROUPINGS), default="block",
                               tooltip="One row per gated layer, per ComfyUI block, per stage, or all averaged."),
                io.String.Input("words", default="",
                                tooltip="Word(s) of the prompt for the MASK output, comma-separated, any script "
                                        "(猫, straße), also words the grid had no room for: each word's tokens are "
                                        "averaged and the words combined by maximum. Empty: all words averaged."),
                io.Int.Input("batch_index", default=0, min=0, max=4095,
                             tooltip="Which image of a LATENT batch to map."),
                io.Boolean.Input("show_special_tokens", default=False,
                                 tooltip="Also draw the start, end and padding tokens."),
                io.Image.Input("image", optional=True,
                               tooltip="Draw the maps over this image (e.g. the decoded sample); RGBA is composited "
                                       "over white."),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="The labelled grid of maps: columns wrap at 4096 px and "
                                                             "the grid stays under 4 megapixels (a note says which "
                                                             "tokens a long prompt left out)."),
                io.Mask.Output(display_name="mask", tooltip="The chosen words' map at the image's pixel size, on "
                                                            "the grid's colour scale (0 to 1)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, text, latent, seed, noise_levels, start_percent, end_percent, map, grouping,
                words, batch_index, show_special_tokens, image=None) -> io.NodeOutput:
        options = VisualizeOptions(seed=seed, noise_levels=noise_levels, start_percent=start_percent,
                                   end_percent=end_percent, map=MAPS[map], grouping=grouping, words=words,
                                   batch_index=batch_index, show_special_tokens=show_special_tokens)
        result = visualize_mask(model, clip, text, latent, options, image=image)
        return io.NodeOutput(result.image, result.mask, ui=ui.PreviewImage(result.image, cls=cls))
