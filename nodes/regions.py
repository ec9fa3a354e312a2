from comfy_api.latest import io

from maskattn_comfy.regions import apply_region_words


class MaskAttnRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MaskAttnRegion",
            display_name="MaskAttn Region",
            category="MaskAttn",
            description="Confines words of the prompt to a mask: their tokens may reach only the masked part of the "
                        "image in every cross-attention layer (an additive mask on the attention logits, as MaskAttn's "
                        "gates use; no training, no extra model pass). Chain several for several regions; works with "
                        "or without MaskAttn Loader, in either order.",
            inputs=[
                io.Model.Input("model", tooltip="An SDXL-family model, with or without MaskAttn Loader before or after."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint: it splits the prompt into tokens to "
                                              "find where the words stand."),
                io.String.Input("text", multiline=True,
                                tooltip="The POSITIVE prompt exactly as given to CLIP Text Encode. The words' token "
                                        "positions are found in this text and confined in the positive prompt's "
                                        "rows; if the sampled prompt differs (another text, or the negative), "
                                        "whatever tokens stand at those positions are confined instead."),
                io.String.Input("words", default="",
                                tooltip="Word(s) of the prompt to confine, comma-separated, any script (猫, straße); "
                                        "(red:1.2) matches red. Every occurrence of each word is confined. A word "
                                        "not in the prompt is an error that names it."),
                io.Mask.Input("mask", tooltip="Where the words may go (1) and may not (0), over the whole image, any "
                                              "size: averaged onto each layer's grid. A batch of masks: one per image."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1 closes the words outside the mask fully (-10000 on the logits); 0.5 halves "
                                       "their attention there; 0 removes this region (and an earlier one on the "
                                       "same words)."),
                io.Boolean.Input("negative_too", default=False,
                                 tooltip="Also confine the same token positions in the negative prompt's rows "
                                         "(they hold the negative's own words there). Off: the negative is untouched."),
            ],
            outputs=[io.Model.Output(tooltip="The model on which the words reach only the mask; a second Region on "
                                             "the same words replaces this one.")],
        )

    @classmethod
    def execute(cls, model, clip, text, words, mask, strength, negative_too=False) -> io.NodeOutput:
        return io.NodeOutput(apply_region_words(model, clip, text, words, mask, strength, negative_too))
