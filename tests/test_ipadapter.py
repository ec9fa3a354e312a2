"""MaskAttn with cubiq's IPAdapter_plus (its own code, unmodified, from the host snapshot) on the tiny SDXL model.

On a layer both patch, the output must be IPAdapter's with MaskAttn's mask on the text attention
only: a float64 reference recomputes, at every gated call of a real sampling run, the hard gate and
the masked text attention (test_loader.ReferenceCheck) and, from the IPAdapter weights and image
embeddings alone, each adapter's image-prompt attention, and adds them.
"""

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

from ipadapter_kit import (IMAGE_TOKENS, as_ipadapter_model, image_embeds, ipadapter_layer_order, load_pack,
                           tiny_ipadapter_weights)
from maskattn_comfy.compose import GatedReplace, is_image_prompt_replace
from maskattn_comfy.patch import MASK_KEY, PatchConflictError, PatchOptions, apply_maskattn
from maskattn_comfy.tiny_model import build_sdxl_model
from test_loader import ReferenceCheck, sample, tiny_gates


@pytest.fixture(scope="module")
def ipadapter_plus(tmp_path_factory):
    """IPAdapter_plus loaded by ComfyUI's loader; the test skips, saying where it looked, without the snapshot."""
    return load_pack(tmp_path_factory.mktemp("custom_nodes"))


@pytest.fixture(scope="module")
def tiny():
    return build_sdxl_model(seed=0)


@pytest.fixture(scope="module")
def gates(tiny):
    return tiny_gates(tiny, gain=10)  # logits spread away from 0: a mix of open and closed connections


class Adapter:
    """One IPAdapter application: its weights, image embeddings and weight, applied by IPAdapter's own node."""

    def __init__(self, model, seed, weight=1.0):
        self.flat = tiny_ipadapter_weights(model, seed=seed)
        self.positive, self.negative = image_embeds(seed + 100), image_embeds(seed + 200)
        self.weight = weight

    def apply(self, ipadapter_plus, model):
        node = ipadapter_plus.IPAdapterEmbeds()
        return node.apply_ipadapter(model, as_ipadapter_model(self.flat), self.positive, self.weight, "linear", 0.0,
                                    1.0, neg_embed=self.negative)[0]

    def tokens64(self, embeds):
        """IPAdapter's image tokens for `embeds` (its ImageProjModel: a linear map, then LayerNorm), in float64."""
        w = {k: v.double() for k, v in self.flat.items() if k.startswith("image_proj.")}
        x = (embeds.double() @ w["image_proj.proj.weight"].T + w["image_proj.proj.bias"]).reshape(-1, IMAGE_TOKENS, 2048)
        return F.layer_norm(x, (2048,), w["image_proj.norm.weight"], w["image_proj.norm.bias"], 1e-5)

    def attention64(self, check, key, q, cond_or_uncond, heads):
        """weight * softmax(q ip_k^T / sqrt(d)) ip_v, the rows of each batch chunk reading the positive (cond, 0)
        or negative (uncond, 1) image's tokens, in float64."""
        number = 2 * ipadapter_layer_order().index(tuple(key)) + 1
        w_k, w_v = (self.flat[f"ip_adapter.{number}.to_{kind}_ip.weight"].double() for kind in ("k", "v"))
        rows = q.shape[0] // len(cond_or_uncond)
        tokens = {0: self.tokens64(self.positive), 1: self.tokens64(self.negative)}
        context = torch.cat([tokens[c].expand(rows, -1, -1) for c in cond_or_uncond])
        everything = torch.ones(q.shape[0], q.shape[1], IMAGE_TOKENS, dtype=torch.bool)
        return self.weight * check.masked_attention(q, context @ w_k.T, context @ w_v.T, everything, heads)


class Probe:
    """On the final model: the gate hook's inputs and each gated layer's replace inputs and output, every call."""

    def __init__(self, model, keys):
        self.model, self.calls = model.clone(), []
        self.model.set_model_attn2_patch(self.gate_inputs)
        replaces = self.model.model_options["transformer_options"]["patches_replace"]["attn2"]
        for key in keys:
            replaces[tuple(key)] = self.wrap(tuple(key), replaces[tuple(key)])

    def __deepcopy__(self, memo):
        return self

    def gate_inputs(self, n, context, value, extra_options):
        extra_options["probe_inputs"] = (n, context)
        return n, context, value

    def wrap(self, key, replace):
        def recorded(q, k, v, extra_options):
            mask = extra_options.get(MASK_KEY)
            out = replace(q, k, v, extra_options)
            n, context = extra_options.pop("probe_inputs")
            self.calls.append(dict(key=key, n=n, context=context, q=q, k=k, v=v, mask=mask, out=out,
                                   heads=extra_options["n_heads"], cond_or_uncond=list(extra_options["cond_or_uncond"]),
                                   extra_options=dict(extra_options)))
            return out
        return recorded


def reference_errors(probe, gates, adapters):
    """Per gated call: max |out - (masked text + image prompts)| / max |reference|, all in float64."""
    check = ReferenceCheck(apply_maskattn(build_sdxl_model(seed=0), gates))
    errors, closed, image_share = [], 0, []
    for call in probe.calls:
        assert call["mask"] is not None, call["key"]
        head = gates.head_for(call["key"])
        opened = check.hard_gate(head, call["n"], call["context"], call["mask"][:, 0] == 0)
        text = check.masked_attention(call["q"], call["k"], call["v"], opened, call["heads"])
        image = sum(a.attention64(check, call["key"], call["q"], call["cond_or_uncond"], call["heads"]) for a in adapters)
        expected = text + image
        errors.append(float((call["out"].double() - expected).abs().max() / expected.abs().max()))
        closed += int((~opened).sum())
        image_share.append(float(image.abs().max() / text.abs().max()))
    assert check.ambiguous <= 1e-3 * check.entries, (check.ambiguous, check.entries)  # gates within 1e-5 of 0.5
    assert closed > 0, "the gates closed nothing: the test would not see the mask"
    assert min(image_share) > 0.1, "the image prompt is too small to be seen"
    return errors


def no_warnings(run):
    """`run()`'s result; fails on any warning (logging or warnings) raised while it runs."""
    import comfy.model_management

    # Earlier runs' patchers of the shared tiny model are garbage by now; ComfyUI would warn of a leak on finding them.
    comfy.model_management.unload_all_models()
    logger = logging.getLogger()
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run()
    finally:
        logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
    assert not caught, [str(w.message) for w in caught]
    return result


def stack(order, ipadapter_plus, tiny, gates, adapters, options=PatchOptions()):
    if order == "ipadapter_then_maskattn":
        model = tiny
        for adapter in adapters:
            model = adapter.apply(ipadapter_plus, model)
        return apply_maskattn(model, gates, options)
    model = apply_maskattn(tiny, gates, options)
    for adapter in adapters:
        model = adapter.apply(ipadapter_plus, model)
    return model


def ipadapter_alone(ipadapter_plus, tiny, adapters):
    model = tiny
    for adapter in adapters:
        model = adapter.apply(ipadapter_plus, model)
    return model


ORDERS = ["maskattn_then_ipadapter", "ipadapter_then_maskattn"]


@pytest.mark.parametrize("order", ORDERS)
def test_each_gated_layer_gives_ipadapters_output_with_the_mask_on_the_text_attention_only(
        ipadapter_plus, tiny, gates, order):
    adapters = [Adapter(tiny, seed=1)]
    model = no_warnings(lambda: stack(order, ipadapter_plus, tiny, gates, adapters))
    probe = Probe(model, gates.layers)
    out = no_warnings(lambda: sample(probe.model, steps=2))
    assert torch.isfinite(out).all()
    assert len(probe.calls) == 2 * len(gates.layers)  # two steps, cond and uncond in one batch
    errors = reference_errors(probe, gates, adapters)
    assert max(errors) < 1e-5, max(errors)


def test_both_orders_sample_the_same_and_differ_from_either_patch_alone(ipadapter_plus, tiny, gates):
    adapters = [Adapter(tiny, seed=1)]
    first, second = (sample(stack(order, ipadapter_plus, tiny, gates, adapters), steps=2) for order in ORDERS)
    assert torch.equal(first, second)
    assert not torch.equal(first, sample(ipadapter_alone(ipadapter_plus, tiny, adapters), steps=2))
    assert not torch.equal(first, sample(apply_maskattn(tiny, gates), steps=2))


@pytest.mark.parametrize("order", ORDERS)
def test_two_ipadapters_and_maskattn_each_adapter_keeps_its_image_prompt(ipadapter_plus, tiny, gates, order):
    adapters = [Adapter(tiny, seed=1), Adapter(tiny, seed=2, weight=0.5)]
    model = no_warnings(lambda: stack(order, ipadapter_plus, tiny, gates, adapters))
    replace = model.model_options["transformer_options"]["patches_replace"]["attn2"][tuple(gates.layers[0])]
    assert isinstance(replace, GatedReplace) and len(replace.image_prompt.callback) == 2
    probe = Probe(model, gates.layers)
    no_warnings(lambda: sample(probe.model, steps=2))
    assert max(reference_errors(probe, gates, adapters)) < 1e-5


def test_ipadapter_between_two_maskattn_loaders(ipadapter_plus, tiny, gates):
    adapters = [Adapter(tiny, seed=1)]
    first = apply_maskattn(adapters[0].apply(ipadapter_plus, apply_maskattn(tiny, tiny_gates(tiny, seed=5))), gates)
    probe = Probe(first, gates.layers)
    no_warnings(lambda: sample(probe.model, steps=2))
    assert max(reference_errors(probe, gates, adapters)) < 1e-5  # the second Loader's gates, IPAdapter's prompt kept


@pytest.mark.parametrize("order", ORDERS)
def test_strength_zero_is_ipadapter_alone_bit_for_bit(ipadapter_plus, tiny, gates, order):
    adapters = [Adapter(tiny, seed=1)]
    alone = sample(ipadapter_alone(ipadapter_plus, tiny, adapters), steps=2)
    model = no_warnings(lambda: stack(order, ipadapter_plus, tiny, gates, adapters, PatchOptions(strength=0.0)))
    assert torch.equal(no_warnings(lambda: sample(model, steps=2)), alone)


def test_a_strength_zero_loader_after_the_stack_gives_back_ipadapters_own_replace(ipadapter_plus, tiny, gates):
    adapters = [Adapter(tiny, seed=1)]
    alone = sample(ipadapter_alone(ipadapter_plus, tiny, adapters), steps=2)
    stacked = stack("maskattn_then_ipadapter", ipadapter_plus, tiny, gates, adapters)
    off = apply_maskattn(stacked, gates, PatchOptions(strength=0.0))
    replaces = off.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert all(is_image_prompt_replace(replaces[tuple(key)]) for key in gates.layers)
    assert torch.equal(sample(off, steps=2), alone)


@pytest.mark.parametrize("order", ORDERS)
def test_outside_the_gates_step_range_the_stack_samples_as_ipadapter_alone(ipadapter_plus, tiny, gates, order):
    adapters = [Adapter(tiny, seed=1)]
    alone = sample(ipadapter_alone(ipadapter_plus, tiny, adapters), steps=2)
    model = stack(order, ipadapter_plus, tiny, gates, adapters, PatchOptions(start_percent=1.0, end_percent=1.0))
    assert torch.equal(no_warnings(lambda: sample(model, steps=2)), alone)


def test_ipadapters_own_step_range_still_decides_when_its_image_prompt_acts(ipadapter_plus, tiny, gates):
    adapter = Adapter(tiny, seed=1)

    def late(model):  # IPAdapter only in the second half of the schedule
        return ipadapter_plus.IPAdapterEmbeds().apply_ipadapter(model, as_ipadapter_model(adapter.flat), adapter.positive,
                                                                1.0, "linear", 0.5, 1.0, neg_embed=adapter.negative)[0]

    for model in (late(apply_maskattn(tiny, gates)), apply_maskattn(late(tiny), gates)):
        probe = Probe(model, gates.layers)
        sample(probe.model, steps=2)
        first_step = probe.calls[:len(gates.layers)]
        check = ReferenceCheck(apply_maskattn(tiny, gates))
        for call in first_step:  # no image prompt at the first step: the masked text attention alone
            opened = check.hard_gate(gates.head_for(call["key"]), call["n"], call["context"], call["mask"][:, 0] == 0)
            text = check.masked_attention(call["q"], call["k"], call["v"], opened, call["heads"])
            assert float((call["out"].double() - text).abs().max() / text.abs().max()) < 1e-5


@pytest.mark.parametrize("order", ORDERS)
def test_ipadapters_attention_mask_weight_type_and_scaling_reach_its_image_prompt_unchanged(
        ipadapter_plus, tiny, gates, order):
    # IPAdapter's own callbacks, called here on each layer's q with their own arguments, are the image prompt's oracle.
    adapter = Adapter(tiny, seed=3)
    region = torch.zeros(1, 128, 128)
    region[:, :, :64] = 1.0  # the image prompt only on the left half

    def apply(model):
        return ipadapter_plus.IPAdapterEmbeds().apply_ipadapter(
            model, as_ipadapter_model(adapter.flat), adapter.positive, 0.8, "ease in", 0.0, 1.0,
            neg_embed=adapter.negative, attn_mask=region, embeds_scaling="K+V")[0]

    model = no_warnings(lambda: apply_maskattn(apply(tiny), gates) if order == "ipadapter_then_maskattn"
                        else apply(apply_maskattn(tiny, gates)))
    replaces = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    probe = Probe(model, gates.layers)
    no_warnings(lambda: sample(probe.model, steps=2))
    check = ReferenceCheck(apply_maskattn(tiny, gates))
    for call in probe.calls:
        opened = check.hard_gate(gates.head_for(call["key"]), call["n"], call["context"], call["mask"][:, 0] == 0)
        text = check.masked_attention(call["q"], call["k"], call["v"], opened, call["heads"])
        image_prompt = replaces[call["key"]].image_prompt
        with torch.no_grad():
            image = sum(callback(call["out"], call["q"], call["k"], call["v"], call["extra_options"], **kwargs)
                        for callback, kwargs in zip(image_prompt.callback, image_prompt.kwargs))
        expected = text + image.double()
        assert float((call["out"].double() - expected).abs().max() / expected.abs().max()) < 1e-5
        assert image.abs().max() > 0.1 * text.abs().max()
        assert (image.abs().amax(-1) == 0).any()  # IPAdapter's attention mask keeps the right half free of it


# -- what MaskAttn cannot compose with is still a clear stop ----------------------------------------

class Attn2Replace:
    """Another pack's replace that looks like IPAdapter's from outside, with its own callback."""

    def __init__(self, callback, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def get_multigpu_kwargs(self, device):
        return self.kwargs

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        return v


def other_attention(out, q, k, v, extra_options, **kwargs):
    return out


def test_another_packs_replace_before_maskattn_is_a_conflict(tiny, gates):
    key = gates.layers[0]
    other = tiny.clone()
    other.set_model_attn2_replace(Attn2Replace(other_attention, sigma_start=1e9, sigma_end=0.0), *key)
    with pytest.raises(PatchConflictError, match=r"input\.7\.0"):
        apply_maskattn(other, gates)


def test_another_pack_adding_to_maskattns_replace_is_a_conflict(tiny, gates):
    model = apply_maskattn(tiny, gates)
    replace = model.model_options["transformer_options"]["patches_replace"]["attn2"][tuple(gates.layers[0])]
    with pytest.raises(PatchConflictError, match="other_attention"):
        replace.add(other_attention, sigma_start=1e9, sigma_end=0.0)
