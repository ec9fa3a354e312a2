"""maskattn_shapes.diagnose: which tokens a caption's objects sit on, which half each object is given,
and the routing and oracle measurements on the committed base, through the real sampler."""

import numpy as np
import pytest
import torch

from maskattn_shapes import diagnose
from maskattn_shapes.world import Prompt

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def world():
    from maskattn_comfy import host

    host.boot(cpu=True)
    from maskattn_shapes import model as shapes

    return shapes.load_shapes_checkpoint()


def test_token_layout_finds_each_objects_words_even_when_a_word_is_two_tokens(world):
    _, clip, _ = world
    prompt = Prompt((("cyan", "circle"), ("blue", "square")), "left of", "a blue square with a cyan circle on its left")
    layout = diagnose.token_layout(clip, prompt)
    # <start> a blue square with a cy an circle on its left <end> <pad>...: objects in caption-spec order
    assert layout.objects == ((6, 7, 8), (2, 3))
    assert layout.roles[:14] == (0, 2, 1, 1, 2, 2, 1, 1, 1, 2, 2, 2, 3, 4) and set(layout.roles[13:]) == {4}


@pytest.mark.parametrize("relation, expected", [("left of", ("left", "right")), ("right of", ("right", "left")),
                                                ("above", ("top", "bottom")), ("below", ("bottom", "top")),
                                                ("and", ("left", "right"))])
def test_each_relation_gives_the_first_object_its_half(relation, expected):
    prompt = Prompt((("red", "circle"), ("green", "square")), relation, "unused")
    assert diagnose.halves(prompt) == expected


def test_half_masks_split_odd_and_even_grids_exactly():
    left, top = diagnose.half_mask("left", 4, 8), diagnose.half_mask("top", 5, 3)
    assert left.sum() == 16 and left[:, :4].all() and not left[:, 4:].any()
    assert top.sum() == 6 and top[:2].all() and not top[2:].any()  # the middle row of 5 belongs to neither
    assert diagnose.half_mask("right", 5, 5).sum() == diagnose.half_mask("left", 5, 5).sum() == 10


def test_in_own_half_reads_the_largest_object_of_each_colour():
    from maskattn_shapes.evaluate import Found

    prompt = Prompt((("red", "circle"), ("green", "square")), "left of", "unused")
    found = [Found("red", "circle", 100.0, 60.0, 900), Found("red", "square", 20.0, 60.0, 100),
             Found("green", "square", 90.0, 60.0, 800)]
    assert diagnose.in_own_half(prompt, found, 128) == [False, True]
    assert diagnose.in_own_half(prompt, found[2:], 128) == [False, True]  # no red at all: not in its half


def test_the_probe_splits_attention_by_role_and_the_oracle_confines_through_the_region_path(world):
    """Sampled through ComfyUI: the probe's role shares sum to 1 on every layer, and under the oracle the
    objects' words get exactly zero weight outside their halves (the Region path's -10000)."""
    from maskattn_shapes.study import encode_prompts
    from maskattn_shapes.world import heldout_prompts

    model, clip, vae = world
    prompts = heldout_prompts(2, 0, "relation")
    layouts = [diagnose.token_layout(clip, q) for q in prompts]
    rows = diagnose.routing(model, vae, clip, prompts, layouts, steps=2, cfg=5.0, batch=2)
    assert len(rows) == 17 and {r["locations"] for r in rows} == {64, 16}
    for row in rows:
        assert abs(sum(row[role] for role in diagnose.ROLES) - 1.0) < 1e-6 and 0 < row["max_weight"] <= 1.0
    fine = diagnose.finest_layers(rows)
    assert fine["layers"] == 5 and 0.0 <= fine["object_words"] <= 1.0

    from maskattn_comfy.compose import REGION_KEY
    from maskattn_comfy.regions import apply_regions
    from maskattn_shapes.study import sample

    prompt, layout = prompts[0], layouts[0]
    confined = apply_regions(model, diagnose.oracle_regions(layout, prompt, 128))
    hooks = confined.model_options["transformer_options"]["patches"]["attn2_patch"]
    region_patch, seen = hooks[-1], {}

    def spy(n, context, value, extra_options):  # the additive mask the Region path leaves for the attention
        out = region_patch(n, context, value, extra_options)
        chunks = extra_options["cond_or_uncond"]
        if REGION_KEY in extra_options and 0 in chunks:
            mask = extra_options[REGION_KEY]
            per_chunk = mask.shape[0] // len(chunks)
            row = chunks.index(0) * per_chunk
            seen[n.shape[1]] = mask[row].reshape(n.shape[1], -1)
        return out

    hooks[-1] = spy
    sample(confined, vae, encode_prompts(clip, prompts[:1]), [0], 1, 5.0, 1)
    assert set(seen) == {64, 16}
    words = {p for positions in layout.objects for p in positions}
    for locations, mask in seen.items():
        side = int(locations ** 0.5)
        for positions, half in zip(layout.objects, diagnose.halves(prompt)):
            inside = diagnose.half_mask(half, side, side).flatten()
            for position in positions:
                assert torch.all(mask[inside, position] == 0) and torch.all(mask[~inside, position] <= -9999), (locations, position)
        assert torch.all(mask[:, [p for p in range(mask.shape[1]) if p not in words]] == 0)


def test_the_committed_base_reads_its_objects_from_their_words(world):
    """Base v2's routing, sampled through ComfyUI: on the 8x8 layers the prompted objects' colour and shape
    tokens get a large share of the conditional attention (measured 48.5 % over 80 prompts and 8 steps;
    v1, which read the caption from the pooled vector, 0.3 %), and no 8x8 layer puts most of its weight
    on the start, end or padding tokens alone (v1: 99 % there)."""
    from maskattn_shapes.world import heldout_prompts

    model, clip, vae = world
    prompts = heldout_prompts(3, 0, "relation") + heldout_prompts(3, 0, "pair")
    layouts = [diagnose.token_layout(clip, q) for q in prompts]
    rows = diagnose.routing(model, vae, clip, prompts, layouts, steps=4, cfg=5.0, batch=6)
    fine = diagnose.finest_layers(rows)
    assert fine["object_words"] > 0.3, fine
    # and its heads are not saturated (v2.3 stage 2, before maskattn_shapes.temper: 0.97 over 80 prompts)
    assert np.mean([row["max_weight"] for row in rows]) <= 0.9, [row["max_weight"] for row in rows]
    for row in rows:
        if row["locations"] == 64:
            assert row["object words"] + row["other words"] > 0.45, row


def test_the_swap_reports_colour_shape_and_exact_per_kind_of_single_prompt(world):
    from maskattn_shapes.world import heldout_prompts

    model, clip, vae = world
    prompts = heldout_prompts(2, 0, "single_seen") + heldout_prompts(1, 0, "single")
    report = diagnose.swap(model, vae, clip, prompts, steps=2, cfg=5.0, batch=3,
                           kinds=["single_seen", "single_seen", "single"])
    assert list(report) == ["own tokens, own pooled", "own tokens, empty pooled", "empty tokens, own pooled"]
    for groups in report.values():
        assert [(g, row["n"]) for g, row in groups.items()] == [("all", 3), ("single_seen", 2), ("single", 1)]
        for metric in ("colour", "shape", "exact"):
            parts = 2 * groups["single_seen"][metric] + groups["single"][metric]
            assert groups["all"][metric] == pytest.approx(parts / 3)
    lines = "\n".join(diagnose.swap_lines({"swap": report}))
    assert "| own tokens, own pooled | held-out combinations |" in lines
