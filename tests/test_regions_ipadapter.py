"""MaskAttn Region with cubiq's IPAdapter_plus (its own code, from the host snapshot; skips without it): the
regions mask the prompt's text tokens only, IPAdapter's image-prompt attention is added unchanged."""

import sys

import pytest
import torch

from ipadapter_kit import PACK, load_pack
from maskattn_comfy.compose import GatedReplace, is_image_prompt_replace
from maskattn_comfy.patch import apply_maskattn
from maskattn_comfy.regions import apply_regions, find_region_patch
from maskattn_comfy.tiny_model import build_sdxl_model
from test_ipadapter import Adapter
from test_loader import ReferenceCheck, sample, tiny_gates
from test_regions import RegionCheck, half_mask, regions_for, soft_mask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ipadapter_plus(tmp_path_factory):
    """IPAdapter_plus as test_ipadapter.py loads it; one copy per session: ipadapter_kit.load_pack expects to find
    exactly one loaded IPAdapterPlus module, so a copy loaded here is taken out of sys.modules afterwards."""
    loaded = [m for name, m in sys.modules.items() if name.endswith(f"{PACK}.IPAdapterPlus")]
    if loaded:
        yield loaded[0]
        return
    folder = tmp_path_factory.mktemp("custom_nodes")
    yield load_pack(folder)
    for name in [n for n in sys.modules if n.startswith(str(folder))]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def tiny():
    return build_sdxl_model(seed=0)


class Float64:
    masked_attention = staticmethod(lambda q, k, v, scale, heads: ReferenceCheck.masked_attention(None, q, k, v, scale,
                                                                                                  heads))


class RegionAndImagePromptCheck(RegionCheck):
    """RegionCheck whose expected output adds each adapter's image-prompt attention, computed in float64 from the
    IPAdapter weights and image embeddings alone."""

    def __init__(self, patched, adapters):
        super().__init__(patched, find_region_patch(patched).regions)
        self.adapters = adapters

    def extra(self, replace, q, extra_options):
        if replace.image_prompt is None:  # IPAdapter_plus keys the middle block ("middle", 1): not this ComfyUI's
            return 0.0
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        return sum(a.attention64(Float64, key, q, extra_options["cond_or_uncond"], extra_options["n_heads"])
                   for a in self.adapters)


@pytest.mark.parametrize("order", ["ipadapter-first", "regions-first"])
def test_regions_mask_the_text_and_leave_the_image_prompt_as_ipadapter_adds_it(ipadapter_plus, tiny, order):
    adapter = Adapter(tiny, seed=11)
    regions = regions_for(((1, 2), half_mask(128, 128), 1.0), ((4,), soft_mask(40, 90), 0.8))
    if order == "ipadapter-first":
        patched = apply_regions(adapter.apply(ipadapter_plus, tiny), regions)
    else:
        patched = adapter.apply(ipadapter_plus, apply_regions(tiny, regions))
    replaces = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    ours = [r for r in replaces.values() if isinstance(r, GatedReplace)]
    assert all(r.regions is not None for r in ours)
    # every attn2 layer of the tiny UNet but the middle block's two
    assert sum(is_image_prompt_replace(r.image_prompt) for r in ours) == len(ours) - 2 == 15
    check = RegionAndImagePromptCheck(patched, [adapter])
    out = sample(patched, steps=2)
    check.assert_close(1e-5)
    assert check.free_rows > 0  # the negative's rows: IPAdapter's output bit for bit
    other = (adapter.apply(ipadapter_plus, apply_regions(tiny, regions)) if order == "ipadapter-first"
             else apply_regions(adapter.apply(ipadapter_plus, tiny), regions))
    assert torch.equal(out, sample(other, steps=2))
    assert not torch.allclose(out, sample(adapter.apply(ipadapter_plus, tiny), steps=2), atol=1e-3)


def test_regions_the_loader_and_ipadapter_together_and_regions_off_give_ipadapter_with_the_loader(ipadapter_plus,
                                                                                                   tiny):
    adapter, gates = Adapter(tiny, seed=12), tiny_gates(tiny, gain=10)
    regions = regions_for(((1, 2, 3), half_mask(128, 128), 1.0))
    stacked = apply_maskattn(apply_regions(adapter.apply(ipadapter_plus, tiny), regions), gates)
    check = RegionAndImagePromptCheck(stacked, [adapter])
    out = sample(stacked, steps=2)
    check.assert_close(1e-5)
    off = apply_regions(stacked, regions_for(((1, 2, 3), half_mask(128, 128), 0.0)))
    assert torch.equal(sample(off, steps=2), sample(apply_maskattn(adapter.apply(ipadapter_plus, tiny), gates), steps=2))
    assert not torch.equal(out, sample(off, steps=2))
