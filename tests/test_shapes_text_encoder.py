"""The Shapes world's frozen text encoders (maskattn_shapes.model.TEXT_ENCODERS), measured on ComfyUI's
own SDXL CLIP class: what each recipe lets reach the UNet, and through which tokens.

The "local" recipe is what makes the world a testbed for word masks: the caption reaches the picture
only through its words' tokens (and the two or three after the end), never through the padding or the
pooled vector, and a noun carries its own adjective."""

import pytest
import torch

from maskattn_shapes import model as shapes

PAIR = "a red circle to the left of a blue square"
OTHER = "a green triangle above a yellow circle"


@pytest.fixture(scope="module", params=["v1", "v2", "local"])
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
    if name == "local":
        assert spread < 1e-3, spread  # measured 3e-4
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
    assert colour < 0.4, colour  # every recipe: the words are distinct (local: 0.22)
    if name == "local":
        assert noun < 0.92, noun  # measured 0.88; v2 0.99, where the noun barely hears its colour
    if name == "v2":
        assert noun > 0.97, noun


@torch.no_grad()
def test_every_local_head_attends_to_its_own_token_and_the_one_before():
    from comfy.clip_model import optimized_attention_for_device

    clip = shapes.shapes_clip(encoder="local")
    clip.load_model()
    for tower in ("clip_l", "clip_g"):
        text_model = getattr(clip.cond_stage_model, tower).transformer.text_model
        tokens = torch.tensor([[t for t, _ in clip.tokenize(PAIR)[tower[-1]][0]]])
        x = text_model.embeddings(tokens)
        causal = torch.full((77, 77), float("-inf")).triu(1)
        for index, layer in enumerate(text_model.encoder.layers[:2]):  # SDXL reads the second layer's output
            h = layer.layer_norm1(x)
            attention = layer.self_attn
            heads = attention.heads
            q = attention.q_proj(h).view(77, heads, -1).transpose(0, 1)
            k = attention.k_proj(h).view(77, heads, -1).transpose(0, 1)
            weights = (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5 + causal).softmax(-1)  # [heads, i, j]
            near = weights.diagonal(dim1=1, dim2=2)[:, 1:] + weights.diagonal(offset=-1, dim1=1, dim2=2)
            assert near.min().item() > 0.95, (tower, index, near.min().item())  # measured >= 0.98
            both = torch.stack([weights.diagonal(dim1=1, dim2=2)[:, 1:], weights.diagonal(offset=-1, dim1=1, dim2=2)])
            assert both.min().item() > 0.2, (tower, index)  # neither the token nor its predecessor is ignored
            x = layer(x, causal.unsqueeze(0), optimized_attention_for_device(x.device, mask=True, small_input=True))


def test_a_base_file_names_its_text_encoder_and_an_unknown_one_is_refused():
    assert shapes.text_encoder_of({}) == "v1"  # files from before v2 name none
    assert shapes.text_encoder_of({"text_encoder": "local"}) == "local"
    with pytest.raises(shapes.ShapesWeightsError, match="unknown Shapes text encoder 'v9'"):
        shapes.text_encoder_of({"text_encoder": "v9"})
