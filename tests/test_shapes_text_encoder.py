"""The Shapes world's frozen text encoders (maskattn_shapes.model.TEXT_ENCODERS), measured on ComfyUI's
own SDXL CLIP class: what each recipe lets reach the UNet, and through which tokens.

The "words" recipe (base v2) is what makes the world a testbed for word masks: the caption reaches the
picture only through its words' tokens, never through the padding, the start or end tokens or the pooled
vector."""

import pytest
import torch

from maskattn_shapes import model as shapes

PAIR = "a red circle to the left of a blue square"
OTHER = "a green triangle above a yellow circle"


@pytest.fixture(scope="module", params=["v1", "v2", "words"])
def encoded(request):
    clip = shapes.shapes_clip(encoder=request.param)
    context, pooled = shapes.encode_captions(clip, [PAIR, OTHER, "", "a purple square", "a blue square"])
    return request.param, context, pooled


def _padding_spread(context):
    """Largest difference between any prompt's padding and the empty prompt's, 4+ past the longest caption's end,
    relative to the padding's norm."""
    end = 11  # start + 10 words of PAIR; its end token is at 11
    tail = context[:, end + 4:]
    return ((tail - tail[2:3]).norm(dim=-1) / tail[2:3].norm(dim=-1)).max().item()


def test_only_the_local_encoder_keeps_the_caption_out_of_the_padding(encoded):
    name, context, _ = encoded
    spread = _padding_spread(context)
    if name == "words":
        # no attention: a padding token's output is a function of its position alone (measured 0.0; float32
        # rows of one batched product may round differently on other CPUs, never by 1e-5)
        assert spread < 1e-5, spread
    else:
        assert spread > 0.05, spread  # v1 and v2: a causal encoder's padding sums the caption (v2: 0.08-0.3)


def test_the_pooled_vector_carries_the_caption_only_in_v1(encoded):
    name, _, pooled = encoded
    if name == "v1":
        assert (pooled[0] - pooled[2]).norm() > 0.1 * pooled[2].norm()
    else:
        assert pooled.abs().max().item() == 0.0


def test_a_local_noun_carries_its_adjective_and_a_colour_word_stays_its_own(encoded):
    name, context, _ = encoded
    cos = torch.nn.functional.cosine_similarity
    noun = cos(context[3, 3], context[4, 3], dim=0).item()  # "square" after "purple" vs after "blue"
    colour = cos(context[3, 2], context[4, 2], dim=0).item()  # "purple" vs "blue"
    assert colour < 0.4, colour  # every recipe: the words are distinct (words: 0.12)
    if name == "words":
        assert noun > 1 - 1e-5, noun  # the noun hears nothing of its colour: binding is the UNet's work
    if name == "v2":
        assert noun > 0.97, noun


def test_a_words_end_token_is_the_same_whatever_the_caption_says(encoded):
    """"a purple square" and "a blue square": the end token (position 4) of a causal encoder sums the
    caption; under "words" it is a function of its position alone."""
    name, context, _ = encoded
    end = ((context[3, 4] - context[4, 4]).norm() / context[4, 4].norm()).item()
    if name == "words":
        assert end < 1e-5, end
    else:
        assert end > 1e-2, end


def test_a_base_file_names_its_text_encoder_and_an_unknown_one_is_refused():
    assert shapes.text_encoder_of({}) == "v1"  # files from before v2 name none
    assert shapes.text_encoder_of({"text_encoder": "words"}) == "words"
    with pytest.raises(shapes.ShapesWeightsError, match="unknown Shapes text encoder 'v9'"):
        shapes.text_encoder_of({"text_encoder": "v9"})
