"""MaskAttn Region stacked as the Loader is (tests/test_stacks.py): PAG and SAG (an extra pass each), a ControlNet
and a LoRA, on real ComfyUI nodes and samplers, before or after the regions."""

import pytest
import torch

import nodes
from maskattn_comfy.regions import apply_regions, find_region_patch
from maskattn_comfy.tiny_model import build_sdxl_model
from test_loader import sample
from test_regions import RegionCheck, half_mask, regions_for, soft_mask
from test_stacks import controlnet, lora_folder, pag, run_node, sag, tiny_lora, with_controlnet  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return build_sdxl_model(seed=0)


def some_regions():
    return regions_for(((1, 2, 3), half_mask(128, 128), 1.0), ((5,), soft_mask(32, 32), 0.8))


@pytest.mark.parametrize("guidance", [pag, sag], ids=["PAG", "SAG"])
def test_pag_and_sag_in_either_order_with_regions_acting_in_their_extra_pass(tiny, guidance):
    regions_first = guidance(apply_regions(tiny, some_regions()))
    check = RegionCheck(regions_first, find_region_patch(regions_first).regions)
    out = sample(regions_first, steps=2)
    check.assert_close(1e-5)
    # the extra pass is a batch of one cond with cond_or_uncond [0] (SAG's holds the negative prompt: see README)
    assert check.single_chunk_calls > 0
    assert torch.equal(out, sample(apply_regions(guidance(tiny), some_regions()), steps=2))
    assert not torch.allclose(out, sample(guidance(tiny), steps=2), atol=1e-3)


def test_controlnet_residuals_reach_the_confined_unet(tiny, controlnet):  # noqa: F811
    positive, negative = with_controlnet(controlnet)
    patched = apply_regions(tiny, some_regions())
    check = RegionCheck(patched, find_region_patch(patched).regions)
    both = sample(patched, steps=2, positive=positive, negative=negative)
    check.assert_close(1e-5)
    assert not torch.allclose(both, sample(tiny, steps=2, positive=positive, negative=negative), atol=1e-3)
    assert not torch.allclose(both, sample(patched, steps=2), atol=1e-3)


def test_a_lora_before_or_after_the_regions_gives_the_same_output(tiny, lora_folder):  # noqa: F811
    import comfy.utils

    lora, _ = tiny_lora(tiny)
    comfy.utils.save_torch_file(lora, str(lora_folder / "tiny_lora.safetensors"))

    def with_lora(model):
        return run_node(nodes.LoraLoaderModelOnly, model=model, lora_name="tiny_lora.safetensors", strength_model=1.0)[0]

    lora_first = apply_regions(with_lora(tiny), some_regions())
    check = RegionCheck(lora_first, find_region_patch(lora_first).regions)
    out = sample(lora_first, steps=2)
    check.assert_close(1e-5)
    assert torch.equal(sample(with_lora(apply_regions(tiny, some_regions())), steps=2), out)
    assert not torch.allclose(out, sample(with_lora(tiny), steps=2), atol=1e-3)


def test_another_packs_attn2_replace_stops_the_regions_with_the_layers_name(tiny):
    from maskattn_comfy.compose import PatchConflictError
    from test_stacks import own_attention

    other = tiny.clone()
    other.set_model_attn2_replace(own_attention, "output", 1, 0)
    with pytest.raises(PatchConflictError, match=r"MaskAttn Region .* output\.1\.0"):
        apply_regions(other, some_regions())
    assert find_region_patch(other) is None
