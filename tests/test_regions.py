"""MaskAttn Region on a real ComfyUI: every confined call against masked attention computed by hand in float64,
the negative's rows and strength 0 exactly as without regions, and the stacks the Loader composes with."""

import math

import pytest
import torch

import comfy.ldm.modules.attention as comfy_attention
import nodes
from maskattn_comfy.compose import MASK_KEY, REGION_KEY, GatedReplace, without_regions
from maskattn_comfy.patch import apply_maskattn
from maskattn_comfy.regions import Region, apply_regions, find_region_patch
from maskattn_comfy.tiny_model import build_sdxl_model, tiny_conditioning
from test_loader import ReferenceCheck, sample, tiny_gates

pytestmark = pytest.mark.usefixtures("one_thread")

CLOSED = math.exp(-10000.0)  # the weight factor of a -10000 logit: 0 in float64


@pytest.fixture(scope="module")
def tiny():
    return build_sdxl_model(seed=0)


def half_mask(height, width, left=True):
    """1 on the left (or right) half of a height x width mask."""
    mask = torch.zeros(height, width)
    if left:
        mask[:, : width // 2] = 1.0
    else:
        mask[:, width // 2:] = 1.0
    return mask


def soft_mask(height, width, seed=3):
    return torch.rand(height, width, generator=torch.Generator().manual_seed(seed))


# -- the reference: the region's factor at a layer cell, by explicit loops over coordinates ----------

def reference_latent_value(mask, r, c, height, width):
    """Mean of the mask pixels latent cell (r, c) of a height x width latent covers (adaptive pooling's bins)."""
    mh, mw = mask.shape
    r0, r1 = (r * mh) // height, -(-((r + 1) * mh) // height)
    c0, c1 = (c * mw) // width, -(-((c + 1) * mw) // width)
    total = 0.0
    for y in range(r0, r1):
        for x in range(c0, c1):
            total += float(mask[y, x])
    return total / ((r1 - r0) * (c1 - c0))


def reference_latent(mask, full):
    return [[reference_latent_value(mask, r, c, *full) for c in range(full[1])] for r in range(full[0])]


def reference_cells(latent, crop, offset, grid):
    """[h*w] float64 mask values at a layer grid: the latent cells of the crop each layer cell holds, averaged."""
    (ch, cw), (top, left), (h, w) = crop, offset, grid
    step = 1
    while (-(-ch // step), -(-cw // step)) != (h, w):
        step *= 2
        assert step <= max(ch, cw), (crop, grid)
    values = []
    for i in range(h):
        for j in range(w):
            cells = [latent[top + r][left + c] for r in range(i * step, min((i + 1) * step, ch))
                     for c in range(j * step, min((j + 1) * step, cw))]
            values.append(sum(cells) / len(cells))
    return torch.tensor(values, dtype=torch.float64)


def masked_attention(q, k, v, scale, heads):
    """float64 softmax attention with each weight multiplied by `scale` [B,N,T], then renormalised."""
    return ReferenceCheck.masked_attention(None, q, k, v, scale, heads)


class RegionCheck:
    """Wraps each attn2 replace a region patch set and recomputes every call by hand in float64 from the call's
    q, k, v, the regions' own definitions (positions, mask, strength) and the crop offsets the test declares:
    the confined rows against masked attention (times the Loader's hard gate, read from the gate hook's mask,
    where the gates act too), the other rows bit for bit against ComfyUI's attention of the call without regions."""

    def __init__(self, patched, regions, offsets=None, unconditional=False):
        self.regions, self.offsets, self.unconditional = regions, offsets or {}, unconditional
        replaces = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
        for key, fn in list(replaces.items()):
            if isinstance(fn, GatedReplace) and fn.regions is not None:
                replaces[key] = self.hook(fn)
        self.errors, self.free_rows, self.calls, self.full, self.latents = [], 0, 0, None, {}
        self.single_chunk_calls = 0

    def __deepcopy__(self, memo):
        return self

    def hook(self, replace):
        check = self

        class Hook:
            def __deepcopy__(self, memo):
                return self

            def __call__(self, q, k, v, extra_options):
                return check.attention(replace, q, k, v, extra_options)

        return Hook()

    def attention(self, replace, q, k, v, extra_options):
        gates = extra_options.get(MASK_KEY)
        unmasked_options = {key: value for key, value in extra_options.items() if key != REGION_KEY}
        out = replace(q, k, v, extra_options)
        alone = without_regions(replace)  # the same layer without regions: the Loader's, IPAdapter's, or none
        if alone is None:
            without = comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                          attn_precision=extra_options["attn_precision"])
        else:
            without = alone(q, k, v, unmasked_options)
        self.calls += 1
        chunks = extra_options["cond_or_uncond"]
        self.single_chunk_calls += len(chunks) == 1
        rows = q.shape[0] // len(chunks)
        crop = tuple(extra_options["original_shape"][-2:])
        full = self.full or crop
        scale = torch.ones(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float64)
        if gates is not None:
            scale = torch.where(gates[:, 0] == 0, 1.0, CLOSED).double()
        grid = grid_of(q.shape[1], crop)
        for chunk, which in enumerate(chunks):
            part = slice(chunk * rows, (chunk + 1) * rows)
            if which != 0 and not self.unconditional:
                assert torch.equal(out[part], without[part]), "a row no region confines changed"
                self.free_rows += rows
                continue
            for region in self.regions:
                length = region.prompt_length
                for b in range(rows):
                    index = b % region.mask.shape[0]
                    latent = self.latents.get((id(region), index, full))
                    if latent is None:
                        latent = self.latents[(id(region), index, full)] = reference_latent(region.mask[index], full)
                    m = reference_cells(latent, crop, self.offsets.get(crop, (0, 0)), grid)
                    factor = (1.0 - region.strength * (1.0 - m)).clamp_min(CLOSED)
                    for p in region.positions:
                        for column in range(p, k.shape[1], length):
                            scale[chunk * rows + b, :, column] *= factor
        expected = masked_attention(q, k, v, scale, extra_options["n_heads"]) + self.extra(replace, q, extra_options)
        self.errors.append(float((out.double() - expected).abs().max() / expected.abs().max()))
        return out

    def extra(self, replace, q, extra_options):
        """What the layer adds beside the text attention (IPAdapter's image prompt in test_regions_ipadapter.py)."""
        return 0.0

    def assert_close(self, tolerance=1e-5):
        assert self.calls and self.errors, "no confined attention ran"
        assert max(self.errors) < tolerance, (max(self.errors), len(self.errors))


def grid_of(locations, crop):
    height, width, step = crop[0], crop[1], 1
    while (-(-height // step)) * (-(-width // step)) != locations:
        step *= 2
    return -(-height // step), -(-width // step)


def regions_for(*specs):
    return [Region(*spec) for spec in specs]


# -- every confined call against the reference --------------------------------------------------

@pytest.mark.parametrize("shape, masks, strength", [
    ((1, 4, 16, 16), [half_mask(128, 128)], 1.0),
    ((1, 4, 13, 21), [half_mask(104, 168)], 1.0),  # 104 x 168 px: sides not multiples of 64, rounded up per level
    ((1, 4, 13, 21), [soft_mask(50, 77)], 0.6),  # a soft mask at another resolution and aspect ratio
    ((2, 4, 12, 20), [torch.stack([half_mask(96, 160), half_mask(96, 160, left=False)])], 1.0),  # one mask per image
], ids=["square", "odd-sides", "soft-resized-strength-0.6", "batch-of-two-masks"])
def test_every_confined_call_equals_masked_attention_computed_by_hand(tiny, shape, masks, strength):
    regions = regions_for(((1, 2), masks[0], strength), ((5,), 1.0 - masks[0], strength))
    patched = apply_regions(tiny, regions)
    check = RegionCheck(patched, find_region_patch(patched).regions)
    out = sample(patched, steps=2, shape=shape)
    check.assert_close(1e-5)
    assert check.free_rows > 0  # the negative's rows were seen and left as they were
    assert not torch.allclose(out, sample(tiny, steps=2, shape=shape), atol=1e-3)


@pytest.mark.parametrize("attention_backend", ["pytorch", "split", "sub_quad", "basic"], indirect=True)
def test_on_each_backend_the_negatives_rows_are_bit_identical_to_the_call_without_regions(tiny, attention_backend):
    regions = regions_for(((1, 2), half_mask(128, 128), 1.0))
    patched = apply_regions(tiny, regions)
    check = RegionCheck(patched, find_region_patch(patched).regions)
    sample(patched, steps=2)
    check.assert_close(1e-5)
    assert check.free_rows > 0


def test_a_long_prompt_against_a_short_negative_confines_every_copy(tiny):
    # The 77-token negative beside a 154-token positive is repeated to 154; a 77-token positive beside a
    # 154-token negative is: its region's columns are confined in both copies.
    regions = regions_for(((3, 4), half_mask(128, 128), 1.0))
    patched = apply_regions(tiny, regions)
    check = RegionCheck(patched, find_region_patch(patched).regions)
    sample(patched, steps=2, positive=tiny_conditioning(seed=1), negative=tiny_conditioning(tokens=154, seed=2))
    check.assert_close(1e-5)


def test_unconditional_rows_are_confined_only_when_asked(tiny):
    regions = regions_for(((1, 2), half_mask(128, 128), 1.0))
    patched = apply_regions(tiny, regions, unconditional=True)
    check = RegionCheck(patched, find_region_patch(patched).regions, unconditional=True)
    sample(patched, steps=2)
    check.assert_close(1e-5)
    assert check.free_rows == 0


# -- off means off ------------------------------------------------------------------------------

def test_strength_zero_is_the_input_model_bit_for_bit(tiny):
    off = apply_regions(tiny, regions_for(((1, 2), half_mask(128, 128), 0.0)))
    assert find_region_patch(off) is None
    assert "attn2" not in off.model_options.get("transformer_options", {}).get("patches_replace", {})
    assert torch.equal(sample(off, steps=2), sample(tiny, steps=2))


def test_a_full_mask_changes_nothing_but_the_attention_path(tiny):
    # m = 1 everywhere: every factor is 1 and the additive mask 0. Checked call by call against float64
    # attention with no mask at all (RegionCheck's reference of a full mask), not by comparing two
    # samplers' outputs after several steps, whose rounding compounds differently on each CPU.
    regions = regions_for(((1, 2, 3), torch.ones(128, 128), 1.0))
    on = apply_regions(tiny, regions)
    check = RegionCheck(on, find_region_patch(on).regions)
    sample(on, steps=2)
    check.assert_close(1e-5)


def test_a_second_region_on_the_same_words_replaces_the_first(tiny):
    first = apply_regions(tiny, regions_for(((1, 2), half_mask(128, 128), 1.0), ((7,), half_mask(128, 128), 1.0)))
    second = apply_regions(first, regions_for(((2, 1), half_mask(128, 128, left=False), 1.0)))
    kept = find_region_patch(second).regions
    assert [r.positions for r in kept] == [(7,), (1, 2)]
    alone = apply_regions(tiny, regions_for(((7,), half_mask(128, 128), 1.0),
                                            ((1, 2), half_mask(128, 128, left=False), 1.0)))
    assert torch.equal(sample(second, steps=2), sample(alone, steps=2))
    # strength 0 on the same words takes them away; the other region stays
    removed = apply_regions(second, regions_for(((1, 2), half_mask(128, 128), 0.0)))
    assert [r.positions for r in find_region_patch(removed).regions] == [(7,)]
    # the model given to the second node is unchanged
    assert [r.positions for r in find_region_patch(first).regions] == [(1, 2), (7,)]


def test_positions_beyond_the_prompt_and_bad_masks_are_clear_errors():
    with pytest.raises(ValueError, match="beyond the prompt's 77"):
        Region((80,), torch.ones(8, 8), prompt_length=77)
    with pytest.raises(ValueError, match=r"\[height, width\]"):
        Region((1,), torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="strength"):
        Region((1,), torch.ones(8, 8), 1.5)


# -- area and mask conditioning -----------------------------------------------------------------

def run_node(cls, **inputs):
    if hasattr(cls, "FUNCTION"):
        return getattr(cls(), cls.FUNCTION)(**inputs)
    return tuple(cls.execute(**inputs).result)


def test_an_area_crop_is_confined_with_its_own_part_of_the_mask(tiny):
    full = tiny_conditioning(seed=1, width=192, height=192)
    # 104 x 72 pixels at (64, 40): a 9 x 13 latent crop at latent (5, 8) of the 24 x 24 latent
    (area,) = run_node(nodes.ConditioningSetArea, conditioning=tiny_conditioning(seed=3), width=104, height=72,
                       x=64, y=40, strength=1.0)
    (positive,) = run_node(nodes.ConditioningCombine, conditioning_1=full, conditioning_2=area)
    mask = soft_mask(192, 192, seed=5)
    regions = regions_for(((1, 2), mask, 1.0))
    patched = apply_regions(tiny, regions)
    check = RegionCheck(patched, find_region_patch(patched).regions, offsets={(9, 13): (5, 8)})
    check.full = (24, 24)
    sample(patched, steps=2, positive=positive, negative=tiny_conditioning(seed=2, width=192, height=192),
           shape=(1, 4, 24, 24))
    check.assert_close(1e-5)


# -- with MaskAttn Loader --------------------------------------------------------------------

def test_with_the_loader_in_either_order_a_connection_is_open_only_if_both_allow_it(tiny):
    gates = tiny_gates(tiny, gain=10)
    regions = regions_for(((1, 2, 3), half_mask(128, 128), 1.0), ((6,), soft_mask(64, 64), 0.7))
    loader_first = apply_regions(apply_maskattn(tiny, gates), regions)
    regions_first = apply_maskattn(apply_regions(tiny, regions), gates)
    check = RegionCheck(loader_first, find_region_patch(loader_first).regions)
    out = sample(loader_first, steps=2)
    check.assert_close(1e-5)
    assert torch.equal(out, sample(regions_first, steps=2))
    assert not torch.allclose(out, sample(apply_maskattn(tiny, gates), steps=2), atol=1e-3)
    assert not torch.allclose(out, sample(apply_regions(tiny, regions), steps=2), atol=1e-3)


def test_a_second_loader_or_a_strength_zero_loader_keeps_the_regions(tiny):
    gates = tiny_gates(tiny, gain=10)
    regions = regions_for(((1, 2, 3), half_mask(128, 128), 1.0))
    from maskattn_comfy.patch import PatchOptions

    off = apply_maskattn(apply_maskattn(apply_regions(tiny, regions), gates), gates, PatchOptions(strength=0.0))
    assert torch.equal(sample(off, steps=2), sample(apply_regions(tiny, regions), steps=2))
    # regions taken off a gated model leave the gates alone
    ungated = apply_regions(apply_maskattn(apply_regions(tiny, regions), gates), regions_for(((1, 2, 3), torch.ones(4, 4), 0.0)))
    assert torch.equal(sample(ungated, steps=2), sample(apply_maskattn(tiny, gates), steps=2))
