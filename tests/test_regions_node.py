"""The MaskAttn Region node, loaded as ComfyUI loads the pack: words found by the real SDXL tokenizer, errors that
name the missing words, and the words' columns confined exactly as apply_regions confines them."""

import pytest
import torch

from maskattn_comfy.regions import Region, apply_regions, find_region_patch, word_positions
from maskattn_comfy.tiny_model import build_sdxl_clip, build_sdxl_model
from maskattn_comfy.tokens import token_labels
from test_loader import sample
from test_regions import RegionCheck, half_mask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return build_sdxl_model(seed=0)


@pytest.fixture(scope="module")
def clip():
    return build_sdxl_clip()


def region_node(pack, model, clip, text, words, mask, strength=1.0, negative_too=False):
    return pack["MaskAttnRegion"].execute(model, clip, text, words, mask, strength, negative_too).result[0]


def test_the_node_confines_the_words_tokens_as_the_tokenizer_splits_them(pack, tiny, clip):
    text = "a (red:1.2) cube beside a blue 猫"
    labels = {label.word: [] for label in token_labels(clip, clip.tokenize(text))}
    for label in token_labels(clip, clip.tokenize(text)):
        labels[label.word].append(label.position)
    patched = region_node(pack, tiny, clip, text, "(red:1.2), 猫", half_mask(128, 128))
    (region,) = find_region_patch(patched).regions
    assert region.positions == tuple(sorted(labels["red"] + labels["猫"])) and len(labels["猫"]) >= 2
    assert region.prompt_length == 77
    check = RegionCheck(patched, [region])
    sample(patched, steps=2)
    check.assert_close(1e-5)
    direct = apply_regions(tiny, [Region(region.positions, half_mask(128, 128), 1.0, 77)])
    assert torch.equal(sample(patched, steps=2), sample(direct, steps=2))


def test_words_not_in_the_prompt_are_named_in_one_error(clip):
    with pytest.raises(ValueError, match=r"'sphere', 'green' are not in the prompt .*a red cube.*red, cube"):
        word_positions(clip, "a red cube", "cube, sphere, green")
    with pytest.raises(ValueError, match="needs the word"):
        word_positions(clip, "a red cube", " , ")


def test_a_chain_of_region_nodes_and_strength_zero(pack, tiny, clip):
    text = "a red cube and a blue sphere"
    left, right = half_mask(1024, 1024), half_mask(1024, 1024, left=False)
    chained = region_node(pack, region_node(pack, tiny, clip, text, "red, cube", left), clip, text,
                          "blue, sphere", right)
    assert len(find_region_patch(chained).regions) == 2
    moved = region_node(pack, chained, clip, text, "cube, red", right)  # the same words again: replaces the first
    assert [r.mask.equal(right[None]) for r in find_region_patch(moved).regions] == [True, True]
    assert torch.equal(sample(region_node(pack, tiny, clip, text, "red", left, 0.0), steps=2), sample(tiny, steps=2))


def test_a_long_prompt_has_its_second_chunk_positions(clip):
    text = ", ".join(["a small red cube"] * 20) + ", a green sphere"
    positions, length = word_positions(clip, text, "sphere")
    assert length == 154 and all(77 <= p < 154 for p in positions)
