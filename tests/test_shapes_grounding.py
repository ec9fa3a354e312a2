"""The word-grounding loss base v2 is trained with (maskattn_shapes/grounding.py), on numbers a wrong
implementation cannot give: hand-built attention, cell-aligned shapes, the real tokenizer."""

import math

import pytest
import torch

from maskattn_shapes import grounding
from maskattn_shapes.world import Obj, Scene

PAIR = "a red circle to the left of a cyan square"


@pytest.fixture(scope="module")
def shapes_clip_words():
    from maskattn_shapes import model as shapes

    return shapes.shapes_clip(encoder="words")


def _scene(*objects, caption=PAIR):
    return Scene(tuple(objects), "left of", caption, 128)


def test_coverage_is_row_major_in_the_latent_layout():
    # a 32 px square centred at x=32, y=96: cells of 16 px at side 8 -> columns 1-2, rows 5-6, fully covered
    scene = _scene(Obj("cyan", "square", 32.0, 96.0, 32.0))
    cover = grounding.object_coverage(scene, 8).reshape(3, 8, 8)
    expected = torch.zeros(8, 8)
    expected[5:7, 1:3] = 1.0
    assert torch.equal(torch.from_numpy(cover[0]), expected)
    assert cover[1:].sum() == 0
    # at side 4 (32 px cells) the same square straddles four cells: a quarter of each
    quarter = grounding.object_coverage(scene, 4).reshape(3, 4, 4)[0]
    assert quarter[2:4, 0:2].flatten().tolist() == [0.25] * 4 and quarter.sum() == pytest.approx(1.0)


def test_object_tokens_are_the_colour_and_shape_columns(shapes_clip_words):
    scene = _scene(Obj("red", "circle", 32.0, 64.0, 40.0), Obj("cyan", "square", 96.0, 64.0, 40.0))
    tokens = grounding.object_tokens(shapes_clip_words, scene)
    assert [list(map(int, row.nonzero()[0])) for row in tokens[:2]] == [[2, 3], [9, 10, 11]]  # "cyan" is two tokens
    assert not tokens[2].any()


def test_an_object_named_by_its_shape_alone_has_its_shape_columns_only(shapes_clip_words):
    scene = _scene(Obj("red", "circle", 32.0, 64.0, 40.0), Obj("cyan", "square", 96.0, 64.0, 40.0),
                   caption="a circle to the left of a cyan square")
    tokens = grounding.object_tokens(shapes_clip_words, scene)
    assert [list(map(int, row.nonzero()[0])) for row in tokens[:2]] == [[2], [8, 9, 10]]


def test_nouns_ground_the_shape_words_and_let_the_cells_attend_to_any_objects_words(shapes_clip_words):
    scene = _scene(Obj("red", "circle", 32.0, 64.0, 40.0), Obj("cyan", "square", 96.0, 64.0, 40.0))
    tokens = grounding.object_tokens(shapes_clip_words, scene, nouns=True)
    assert [list(map(int, row.nonzero()[0])) for row in tokens[:2]] == [[3], [11]]
    targets = grounding.GroundingTargets([scene], shapes_clip_words, nouns=True)
    assert torch.equal(targets.tokens[0], torch.from_numpy(tokens))
    union = [2, 3, 9, 10, 11]
    assert [list(map(int, row.nonzero())) for row in targets.pixel_tokens[0]] == [union, union, []]
    plain = grounding.GroundingTargets([scene], shapes_clip_words)
    assert plain.pixel_tokens is plain.tokens


def test_with_nouns_a_colour_on_the_other_object_costs_nothing():
    # one row, two objects (cells 0 and 1); words: 1 = first colour, 2 = first shape, 3 = second colour, 4 = second shape
    coverage = torch.zeros(1, 3, 3)
    coverage[0, 0, 0] = coverage[0, 1, 1] = 1.0
    words = torch.zeros(1, 3, 6, dtype=torch.bool)
    words[0, 0, [1, 2]] = words[0, 1, [3, 4]] = True
    nouns = torch.zeros_like(words)
    nouns[0, 0, 2] = nouns[0, 1, 4] = True
    union = words.any(1, keepdim=True) & words.any(2, keepdim=True)
    weights = torch.zeros(1, 3, 6)
    weights[0, 0] = torch.tensor([0, 0, 0.5, 0.5, 0, 0])  # the first object's cell: its shape and the OTHER colour
    weights[0, 1] = torch.tensor([0, 0.5, 0, 0, 0.5, 0])  # and the second's: its shape and the first colour
    weights[0, 2] = torch.tensor([1.0, 0, 0, 0, 0, 0])
    captioned = torch.tensor([True])
    bound = grounding.grounding_loss(weights, words, coverage, captioned)
    assert bound[0].item() == pytest.approx(0.5) and bound[1].item() == pytest.approx(0.5)  # the swap is penalised
    free = grounding.grounding_loss(weights, nouns, coverage, captioned, union)
    assert free[0].item() == 0.0 and free[1].item() == 0.0  # nouns on their objects, colours free
    weights[0, 0] = torch.tensor([1.0, 0, 0, 0, 0, 0])  # the first object's cell on the start token
    assert grounding.grounding_loss(weights, nouns, coverage, captioned, union)[0].item() == pytest.approx(0.5)


def _case():
    """Two rows, two objects in the first (cells 0-1 and 2), one in the second; 4 cells, 6 tokens."""
    tokens = torch.zeros(2, 3, 6, dtype=torch.bool)
    tokens[0, 0, [1, 2]] = True
    tokens[0, 1, [3]] = True
    tokens[1, 0, [4]] = True
    coverage = torch.zeros(2, 3, 4)
    coverage[0, 0, [0, 1]] = 1.0
    coverage[0, 1, 2] = 1.0
    coverage[1, 0, 3] = 0.5
    return tokens, coverage


def test_perfect_grounding_costs_nothing():
    tokens, coverage = _case()
    weights = torch.full((2, 4, 6), 1 / 6)  # the background cell may attend anywhere
    weights[0, 0:2] = torch.tensor([0, 0.5, 0.5, 0, 0, 0])
    weights[0, 2] = torch.tensor([0, 0, 0, 1.0, 0, 0])
    weights[0, 3] = torch.tensor([1.0, 0, 0, 0, 0, 0])
    weights[1] = torch.tensor([[1.0, 0, 0, 0, 0, 0]] * 3 + [[0, 0, 0, 0, 1.0, 0]])
    pixel, token = grounding.grounding_loss(weights, tokens, coverage, torch.tensor([True, True]))
    # row 1's one word attends only to a cell its object half covers: 0.5 of 4 words
    assert pixel.item() == 0.0 and token.item() == pytest.approx(0.5 / 4)
    coverage[1, 0, 3] = 1.0
    assert grounding.grounding_loss(weights, tokens, coverage, torch.tensor([True, True]))[1].item() == 0.0


def test_uniform_attention_costs_what_the_arithmetic_says():
    tokens, coverage = _case()
    weights = torch.full((2, 4, 6), 1 / 6)
    pixel, token = grounding.grounding_loss(weights, tokens, coverage, torch.tensor([True, True]))
    # pixel: coverage-weighted mean of 1 - own share: (2 cells x 4/6 + 1 x 5/6 + 0.5 x 5/6) / 3.5
    assert pixel.item() == pytest.approx((2 * 4 / 6 + 5 / 6 + 0.5 * 5 / 6) / 3.5, abs=1e-6)
    # token: each map is uniform (1/4 per cell): 1 - covered share, over the 4 words
    assert token.item() == pytest.approx(((1 - 2 / 4) * 2 + (1 - 1 / 4) + (1 - 0.5 / 4)) / 4, abs=1e-6)


def test_a_dropped_caption_and_the_wrong_mask_are_seen():
    tokens, coverage = _case()
    weights = torch.full((2, 4, 6), 1 / 6)
    weights[0, 0:2] = torch.tensor([0, 0.5, 0.5, 0, 0, 0])
    weights[0, 2] = torch.tensor([0, 0, 0, 1.0, 0, 0])
    weights[1, 3] = torch.tensor([0, 0, 0, 0, 1.0, 0])
    only_first = grounding.grounding_loss(weights, tokens, coverage, torch.tensor([True, False]))
    assert only_first[0].item() == 0.0  # the second row's (uniform elsewhere) attention is not supervised
    swapped = coverage[:, [1, 0, 2]]  # each object's mask given to the other
    assert grounding.grounding_loss(weights, tokens, swapped, torch.tensor([True, False]))[0].item() == 1.0


def test_the_recorder_is_the_models_own_attention(shapes_clip_words):
    """Training through the recorder trains the model ComfyUI samples: same output within float32 rounding
    of two softmax routes (1e-5 relative), and one head-mean map per 8x8 and 4x4 layer, rows summing to 1."""
    from maskattn_shapes import model as shapes

    unet = shapes.shapes_unet(seed=3).model.diffusion_model.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    context, _ = shapes.encode_captions(shapes_clip_words, [PAIR, "a green triangle"])
    y = torch.randn(2, 2816, generator=generator)
    t = torch.tensor([500.0, 900.0])
    recorder = grounding.AttentionRecorder({64, 16})
    with torch.no_grad():
        plain = unet(x, timesteps=t, context=context, y=y)
        recorded = unet(x, timesteps=t, context=context, y=y, transformer_options=recorder.transformer_options(unet))
    assert ((recorded - plain).abs().max() / plain.abs().max()).item() < 1e-5
    sizes = sorted(w.shape[1] for w in recorder.weights)
    assert sizes == [16] * 12 + [64] * 5  # SDXL's 17 attn2 layers (input 4-5 and output 3-5 at 8x8)
    for w in recorder.weights:
        assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5) and math.isfinite(w.sum().item())


def test_the_saturation_loss_is_the_mean_excess_over_the_cap():
    peaks = [torch.tensor([[[0.9, 0.5]]]), torch.tensor([[[1.0]]])]  # two layers' [B, H, N] head maxima
    assert grounding.saturation_loss(peaks, 0.8).item() == pytest.approx((0.05 + 0.2) / 2)
    assert grounding.saturation_loss(peaks, 1.0 - 1e-9).item() == pytest.approx(0.0, abs=1e-8)


def test_the_saturation_loss_softens_the_models_heads(shapes_clip_words):
    """The recorder's peaks are each attn2 layer's per-head maxima [B, H, N] (17 layers, not just the targets'
    resolutions), and a gradient step on the saturation loss lowers the heads' mean maximum weight."""
    from maskattn_shapes import model as shapes

    unet = shapes.shapes_unet(seed=3).model.diffusion_model.train().requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    context, _ = shapes.encode_captions(shapes_clip_words, [PAIR, "a green triangle"])
    y, t = torch.randn(2, 2816, generator=generator), torch.tensor([500.0, 900.0])
    recorder = grounding.AttentionRecorder({64}, peaks=True)
    options = recorder.transformer_options(unet)

    def mean_peak():
        recorder.clear()
        unet(x, timesteps=t, context=context, y=y, transformer_options=options)
        return torch.stack([p.mean() for p in recorder.peaks]).mean()

    before = mean_peak()
    assert len(recorder.peaks) == 17 and len(recorder.weights) == 5
    assert all(p.shape[0] == 2 and p.shape[1] > 1 and p.shape[2] in (64, 16) for p in recorder.peaks)
    fine = [p for p in recorder.peaks if p.shape[2] == 64]
    for peak, weights in zip(fine, recorder.weights):  # the heads' maxima bound their mean's maximum from above
        assert (peak.mean(1) >= weights.amax(-1) - 1e-6).all() and (peak <= 1).all()
    loss = grounding.saturation_loss(recorder.peaks, cap=0.0)  # every peak counts: the loss is the mean peak itself
    assert loss.item() == pytest.approx(before.item(), rel=1e-6)
    loss.backward()
    moved = [p for p in unet.parameters() if p.grad is not None]
    norm = torch.stack([p.grad.norm() for p in moved]).norm()
    with torch.no_grad():
        for p in moved:
            p -= 0.05 * p.grad / norm  # a small step down the gradient, 0.05 long in all
    assert mean_peak().item() < before.item() - 1e-3
