"""Visualize Mask's "region mask": what MaskAttn Region nodes let each token keep, per layer, drawn from the regions
themselves (no model call), with or without MaskAttn Loader."""

import pytest
import torch

from maskattn_comfy.patch import apply_maskattn
from maskattn_comfy.regions import layer_levels, word_positions
from maskattn_comfy.model_check import attn2_layers, diffusion_model_of
from maskattn_comfy.tiny_model import build_sdxl_clip, build_sdxl_model
from test_loader import tiny_gates
from test_regions import half_mask
from test_regions_node import region_node
from test_visualize import run_node

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "a red cube and a blue sphere"


@pytest.fixture(scope="module")
def tiny():
    return build_sdxl_model(seed=0)


@pytest.fixture(scope="module")
def clip():
    return build_sdxl_clip()


def test_layer_levels_follow_the_unets_own_downsamples(tiny):
    levels = layer_levels(diffusion_model_of(tiny))
    assert set(levels) == set(attn2_layers(diffusion_model_of(tiny)))
    # the tiny UNet: channel_mult [1, 2, 4], transformers at input 4, 5 (one downsample), 7, 8 and the middle (two)
    assert {k[:2]: v for k, v in levels.items()} == {("input", 4): 1, ("input", 5): 1, ("input", 7): 2,
                                                     ("input", 8): 2, ("middle", 0): 2, ("output", 0): 2,
                                                     ("output", 1): 2, ("output", 2): 2, ("output", 3): 1,
                                                     ("output", 4): 1, ("output", 5): 1}


@pytest.mark.parametrize("with_loader", [False, True])
def test_region_mask_shows_each_word_free_inside_its_mask_and_closed_outside(pack, tiny, clip, with_loader):
    model = apply_maskattn(tiny, tiny_gates(tiny)) if with_loader else tiny
    left = half_mask(192, 320)  # a 24 x 40 latent: 12 x 20 and 6 x 10 at the layers, the halves on cell edges
    confined = region_node(pack, model, clip, TEXT, "cube", left, strength=0.75)
    latent = {"samples": torch.zeros(1, 4, 24, 40)}
    grid, mask = run_node(pack, confined, clip, TEXT, latent=latent, map="region mask", grouping="layer",
                          words="cube").result[:2]
    assert mask.shape == (1, 192, 320)
    # the MASK output on [0, 1]: 1 on the left (free), 1 - 0.75 on the right, at every layer
    assert float(mask[0, :, :64].min()) == pytest.approx(1.0, abs=1e-6)
    assert float(mask[0, :, 256:].max()) == pytest.approx(0.25, abs=1e-6)
    (cube,) = word_positions(clip, TEXT, "cube")[0]
    sphere = word_positions(clip, TEXT, "sphere")[0]
    everything = run_node(pack, confined, clip, TEXT, latent=latent, map="region mask", words="sphere").result[1]
    assert torch.all(everything == 1.0) and cube not in sphere  # an unconfined word keeps everything
    assert grid.shape[0] == 1 and grid.shape[-1] == 3


def test_region_mask_without_regions_says_what_to_connect(pack, tiny, clip):
    with pytest.raises(ValueError, match="no MaskAttn Region"):
        run_node(pack, tiny, clip, TEXT, map="region mask")
