"""What keeps MaskAttn's overhead near its floor, checked without timing anything
(benchmarks/sampling.py measures the time; BENCHMARKS.md has the numbers)."""

import pytest
import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.sample
from comfy_kit import run_unet
from maskattn_comfy.model_check import require_sdxl
from maskattn_comfy.patch import MaskAttnPatch, PatchOptions, apply_maskattn, find_maskattn_patch
from maskattn_comfy.tiny_model import build_sdxl_model, tiny_conditioning
from maskattn_core import GateHead, GateSet, MaskAttnConfig, additive_mask, hard_gate


@pytest.fixture(scope="module")
def tiny():
    return build_sdxl_model(seed=0)


def default_gates(model):
    return GateSet.create(MaskAttnConfig(), require_sdxl(model), seed=1)


def forward(model, batch=2, side=16, tokens=77, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, side, side, generator=g).to(dtype)
    context = torch.randn(batch, tokens, 2048, generator=g).to(dtype)
    y = torch.randn(batch, 2816, generator=g).to(dtype)
    return run_unet(model, x, torch.full((batch,), 500.0), context, y)


@pytest.fixture
def spy(monkeypatch):
    """Counts gate-head work, records each mask's dtype as the gate hook leaves it, and what reaches
    ComfyUI's masked attention."""
    seen = {"masks": [], "hook_mask_dtypes": [], "token_features": 0, "location_features": 0}
    masked = comfy_attention.optimized_attention_masked
    gate_hook = MaskAttnPatch.__call__

    def gate_hook_spy(self, n, context, value, extra_options):
        out = gate_hook(self, n, context, value, extra_options)
        if "maskattn_mask" in extra_options:  # a gated layer inside the step range
            seen["hook_mask_dtypes"].append(extra_options["maskattn_mask"].dtype)
        return out

    def masked_spy(q, k, v, heads, mask, **kwargs):
        seen["masks"].append((tuple(q.shape), tuple(k.shape), tuple(mask.shape), mask.dtype, q.dtype, mask.stride()))
        return masked(q, k, v, heads, mask, **kwargs)

    for name in ("token_features", "location_features"):
        method = getattr(GateHead, name)

        def counted(self, *args, _name=name, _method=method):
            seen[_name] += 1
            return _method(self, *args)

        monkeypatch.setattr(GateHead, name, counted)
    monkeypatch.setattr(comfy_attention, "optimized_attention_masked", masked_spy)
    monkeypatch.setattr(MaskAttnPatch, "__call__", gate_hook_spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_gated_layer_hands_attention_one_batch_1_n_t_mask_in_the_attention_dtype(spy, dtype):
    model = build_sdxl_model(seed=0, dtype=dtype)
    gates = default_gates(model)
    forward(apply_maskattn(model, gates), batch=2, side=16, tokens=154, dtype=dtype)
    assert len(spy["masks"]) == len(gates.layers)
    assert spy["hook_mask_dtypes"] == [dtype] * len(gates.layers)  # made in the model's dtype, not cast later
    for q_shape, k_shape, mask_shape, mask_dtype, q_dtype, stride in spy["masks"]:
        batch, locations, _ = q_shape
        assert mask_shape == (batch, 1, locations, k_shape[1])  # one mask for all heads, never per head
        assert mask_dtype == q_dtype == dtype  # built in the attention's dtype: no cast per call
        assert stride[-1] == 1


def test_token_side_runs_once_per_head_per_model_call_and_location_side_once_per_layer(tiny, spy):
    gates = default_gates(tiny)
    patched = apply_maskattn(tiny, gates)
    steps = 3
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    comfy.sample.sample(patched, noise, steps, 5.0, "euler", "normal", tiny_conditioning(seed=1),
                        tiny_conditioning(seed=2), torch.zeros_like(noise), seed=0, disable_pbar=True)
    assert spy["token_features"] == steps * len(gates.heads)
    assert spy["location_features"] == steps * len(gates.layers)


def test_gate_weights_are_used_where_they_are_not_copied_per_call(tiny, monkeypatch):
    gates = default_gates(tiny)
    pointers = [p.data_ptr() for p in gates.parameters()]
    monkeypatch.setattr("maskattn_comfy.patch._copy_to", lambda *a: pytest.fail("gate heads copied"))
    patched = apply_maskattn(tiny, gates)
    forward(patched)
    forward(patched)
    assert find_maskattn_patch(patched)._heads_on(torch.device("cpu")) is gates.heads
    assert [p.data_ptr() for p in gates.parameters()] == pointers


def test_the_gate_hook_makes_no_host_sync(tiny):
    # Meta tensors have no values: a bool(), item() or data-dependent branch on them raises.
    gates = default_gates(tiny)
    patch = MaskAttnPatch(gates, PatchOptions(), sigma_range=None)
    key = gates.layers[0]
    channels = gates.head_for(key).feature_dim
    extra_options = {"block": key[:2], "block_index": key[2], "sigmas": torch.ones(2, device="meta")}
    n = torch.empty(2, 64, channels, device="meta")
    context = torch.empty(2, 77, 2048, device="meta")
    with torch.no_grad():
        patch(n, context, context, extra_options)
    mask = extra_options["maskattn_mask"]
    assert mask.shape == (2, 1, 64, 77) and mask.device.type == "meta"
    assert hard_gate(torch.empty(2, 64, 77, device="meta")).device.type == "meta"
    assert additive_mask(torch.empty(2, 64, 77, device="meta"), -10000.0, torch.float16).dtype == torch.float16


def test_outside_the_step_range_no_gate_runs_and_attention_is_unmasked(tiny, spy):
    patched = apply_maskattn(tiny, default_gates(tiny), PatchOptions(start_percent=1.0, end_percent=1.0))
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    comfy.sample.sample(patched, noise, 2, 5.0, "euler", "normal", tiny_conditioning(seed=1),
                        tiny_conditioning(seed=2), torch.zeros_like(noise), seed=0, disable_pbar=True)
    assert spy["masks"] == [] and spy["token_features"] == 0 and spy["location_features"] == 0
