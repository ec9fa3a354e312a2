"""The paper's math, checked against vectors made by the authors' own implementation."""

import pytest
import torch

from comfy_kit import read_fixture
from maskattn_core import (GateHead, GateSet, MaskAttnConfig, additive_mask, closed_logit, closed_mask, hard_gate,
                          open_connections, straight_through)

CASES = ["mixed", "sparse_fallback", "long_prompt"]


def load_case(fixtures_dir, case):
    tensors, meta = read_fixture(fixtures_dir / f"layer_{case}.safetensors")
    head_state = {k[len("gate_head."):]: v for k, v in tensors.items() if k.startswith("gate_head.")}
    hidden, channels = head_state["feature_net.1.weight"].shape
    head = GateHead(channels, 2048, hidden)
    head.load_state_dict(head_state)
    return tensors, meta, head


@pytest.mark.parametrize("case", CASES)
def test_gate_head_and_hard_gate_match_the_authors(fixtures_dir, case):
    tensors, meta, head = load_case(fixtures_dir, case)
    with torch.no_grad():
        probabilities = head(tensors["input.hidden_states"], tensors["input.encoder_hidden_states"])
    hard = hard_gate(probabilities, float(meta["threshold"]))
    assert (probabilities - tensors["expected.probabilities"]).abs().max() < 1e-5
    assert torch.equal(hard, tensors["expected.hard_gate"])


def test_sparse_case_exercises_the_empty_row_fallback(fixtures_dir):
    tensors, meta, head = load_case(fixtures_dir, "sparse_fallback")
    probabilities = tensors["expected.probabilities"]
    empty_rows = (probabilities <= float(meta["threshold"])).all(dim=-1)
    assert empty_rows.any(), "the fixture should contain locations with no open token"
    hard = hard_gate(probabilities, float(meta["threshold"]))
    assert torch.equal(hard.sum(-1)[empty_rows], torch.ones(int(empty_rows.sum())))
    assert torch.equal(hard.argmax(-1)[empty_rows], probabilities.argmax(-1)[empty_rows])


@pytest.mark.parametrize("case", CASES)
def test_masked_softmax_matches_the_authors_attention(fixtures_dir, case):
    tensors, meta, _ = load_case(fixtures_dir, case)
    heads, dim_head = int(meta["heads"]), int(meta["dim_head"])
    x, context = tensors["input.hidden_states"], tensors["input.encoder_hidden_states"]
    q = (x @ tensors["attn.to_q.weight"].T).unflatten(-1, (heads, dim_head)).transpose(1, 2)
    k = (context @ tensors["attn.to_k.weight"].T).unflatten(-1, (heads, dim_head)).transpose(1, 2)
    mask = additive_mask(tensors["expected.hard_gate"], float(meta["negative_value"]))
    attention = torch.softmax(q @ k.transpose(-1, -2) * dim_head ** -0.5 + mask, dim=-1).mean(1)
    assert (attention - tensors["expected.attention"]).abs().max() < 1e-5


def test_straight_through_passes_probability_gradients_and_hard_values():
    probabilities = torch.tensor([[[0.2, 0.7, 0.6]]], requires_grad=True)
    hard = hard_gate(probabilities.detach())
    gate = straight_through(hard, probabilities)
    assert torch.equal(gate.detach(), torch.tensor([[[0.0, 1.0, 1.0]]]))
    (gate * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(probabilities.grad, torch.tensor([[[1.0, 2.0, 3.0]]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_inference_mask_equals_the_straight_through_mask(dtype, strength):
    probabilities = torch.rand(2, 40, 77, generator=torch.Generator().manual_seed(3))
    probabilities[0, :5] *= 0.4  # rows with no open token: the fallback
    penalty = closed_logit(strength)
    expected = additive_mask(hard_gate(probabilities), penalty, dtype)
    mask = closed_mask(open_connections(probabilities), penalty, dtype)
    assert mask.shape == expected.shape == (2, 1, 40, 77) and mask.dtype == dtype
    assert torch.equal(mask, expected)
    assert mask.is_contiguous()


def test_threshold_is_strict():
    probabilities = torch.tensor([[[0.5, 0.5000001, 0.1]]])
    assert hard_gate(probabilities, 0.5).tolist() == [[[0.0, 1.0, 0.0]]]


def test_default_gates_are_the_papers_fifty_layers_and_one_shared_head():
    from maskattn_core.layers import LayerKey

    sdxl = {}
    for block, number, depth, channels in ([("input", 4, 2, 640), ("input", 5, 2, 640), ("input", 7, 10, 1280),
                                            ("input", 8, 10, 1280), ("middle", 0, 10, 1280)]
                                           + [("output", i, 10, 1280) for i in range(3)]
                                           + [("output", i, 2, 640) for i in range(3, 6)]):
        sdxl.update({LayerKey(block, number, t): channels for t in range(depth)})
    gates = GateSet.create(MaskAttnConfig(), sdxl)
    assert len(sdxl) == 70 and len(gates.layers) == 50
    assert list(gates.heads) == ["mid"] and gates.parameter_count() == 465_921
    per_layer = GateSet.create(MaskAttnConfig(stage="all", share_heads_by_stage=False), sdxl)
    assert len(per_layer.heads) == 70
    encoder_low = pytest.raises(ValueError, GateSet.create, MaskAttnConfig(stage="low", placement="encoder"), sdxl)
    assert "middle block" in str(encoder_low.value)
