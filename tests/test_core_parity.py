"""The paper's math, checked against vectors made by the authors' own implementation.

tests/fixtures/official/README.md says how they were made; inputs and base weights are rebuilt
here from seeds (comfy_kit's recipes), only the authors' outputs and gate checkpoints are stored.
"""

import re

import pytest
import torch
from safetensors.torch import save_file

from comfy_kit import FIXTURES, fixture_inputs, fixture_unet, layer_case_tensors, read_fixture, run_unet
from maskattn_core import (FORMAT_VERSION, GateFileError, GateHead, GateSet, MaskAttnConfig, OfficialCheckpointError,
                          additive_mask, closed_logit, closed_mask, hard_gate, load_gate_file,
                          load_official_checkpoint, open_connections, save_gate_file, straight_through)
from maskattn_core.layers import LayerKey, from_diffusers_name, stage_of

CASES = ["mixed", "sparse_fallback", "long_prompt"]
# The authors' two tiny checkpoints and the key of the UNet output they computed with each.
CHECKPOINTS = {"official_tiny_mid": "expected.sample",
               "official_tiny_all_per_layer": "expected.sample.official_tiny_all_per_layer"}
SDXL_UNET = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10}


def load_case(fixtures_dir, case):
    """A layer case: its seeded weights and inputs, the authors' outputs (expected.*), its metadata and gate head."""
    expected, meta = read_fixture(fixtures_dir / f"layer_{case}.safetensors")
    tensors = dict(layer_case_tensors(meta), **expected)
    head_state = {k[len("gate_head."):]: v for k, v in tensors.items() if k.startswith("gate_head.")}
    hidden, channels = head_state["feature_net.1.weight"].shape
    head = GateHead(channels, 2048, hidden)
    head.load_state_dict(head_state)
    return tensors, meta, head


def comfyui_attn2_layers(unet_config) -> dict[str, LayerKey]:
    """Diffusers attn2 processor name -> ComfyUI attn2 key, derived from ComfyUI's own diffusers key map."""
    import comfy.utils

    layers = {}
    for d_key, c_key in comfy.utils.unet_to_diffusers(unet_config).items():
        match = _COMFY_ATTN2.fullmatch(c_key)
        if match and d_key.endswith(".attn2.to_q.weight"):
            block, number, index = match.groups()
            layers[d_key.replace(".to_q.weight", ".processor")] = LayerKey(block or "middle", int(number or 0), int(index))
    return layers


_COMFY_ATTN2 = re.compile(r"(?:(input|output)_blocks\.(\d+)|middle_block)\.1\.transformer_blocks\.(\d+)\.attn2\.to_q\.weight")


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


def test_layer_cases_are_what_their_names_say(fixtures_dir):
    mixed, long_prompt = (load_case(fixtures_dir, case)[0]["expected.hard_gate"] for case in ("mixed", "long_prompt"))
    assert 0.2 < float(mixed.mean()) < 0.4
    assert long_prompt.shape[-1] == 154 and 0.0 < float(long_prompt.mean()) < 1.0


# -- the authors' diffusers layer names in ComfyUI's keys --------------------------------------

def test_every_sdxl_attn2_name_maps_to_the_comfyui_layer_that_holds_it_and_back():
    expected = comfyui_attn2_layers(SDXL_UNET)
    assert len(expected) == 70 and len(set(expected.values())) == 70, "ComfyUI's map should be one to one"
    assert {name: from_diffusers_name(name) for name in expected} == expected
    authors_stage = {"down_blocks.1": "high", "up_blocks.1": "high", "down_blocks.2": "mid", "up_blocks.0": "mid",
                     "mid_block": "low"}
    assert {name: stage_of(key) for name, key in expected.items()} == {
        name: authors_stage.get(name.split(".attentions.")[0]) for name in expected}


def test_each_layers_own_official_head_lands_on_its_comfyui_layer():
    from maskattn_comfy.tiny_model import FIXTURE_UNET_CONFIG

    path = FIXTURES / "official_tiny_all_per_layer.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    expected = comfyui_attn2_layers(FIXTURE_UNET_CONFIG)
    assert sorted(checkpoint["selected_layers"]) == sorted(expected), "the case should gate every attn2 layer"
    gates = load_official_checkpoint(path)
    assert len(gates.heads) == len(expected) == 17
    assert sorted(gates.layers) == sorted(expected.values())
    for name, key in expected.items():
        prefix = f"{name}.gate_head."
        stored = {k[len(prefix):]: v for k, v in checkpoint["gate_state_dict"].items() if k.startswith(prefix)}
        loaded = gates.head_for(key).state_dict()
        assert stored.keys() == loaded.keys() and all(torch.equal(stored[k], loaded[k]) for k in stored), name


# -- a whole tiny SDXL-topology UNet --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_unet():
    return fixture_unet()


@pytest.fixture(scope="module")
def unet_call():
    tensors, y = fixture_inputs()
    return tensors, (tensors["input.sample"], tensors["input.timestep"], tensors["input.encoder_hidden_states"], y)


def test_comfyui_unet_with_the_seeded_base_weights_is_the_authors_diffusers_unet(tiny_unet, unet_call):
    tensors, args = unet_call
    assert (run_unet(tiny_unet, *args) - tensors["expected.sample_without_gates"]).abs().max() < 1e-5


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_comfyui_unet_with_the_authors_checkpoint_gives_their_output(tiny_unet, unet_call, name):
    from maskattn_comfy.patch import apply_maskattn

    tensors, args = unet_call
    expected = tensors[CHECKPOINTS[name]]
    gated = run_unet(apply_maskattn(tiny_unet, load_official_checkpoint(FIXTURES / f"{name}.pt")), *args)
    assert (gated - expected).abs().max() < 1e-4
    assert (expected - tensors["expected.sample_without_gates"]).abs().max() > 0.1, "the gates should matter"


@pytest.mark.parametrize("first, second", [("input.7.0", "input.7.1"), ("input.4.0", "input.5.0"),
                                           ("output.0.1", "output.2.1"), ("middle.0.0", "middle.0.1")])
def test_per_layer_case_sees_two_layers_of_a_stage_swapped(tiny_unet, unet_call, first, second):
    """What the shared-head case cannot see: a mapping that swaps layers within a stage."""
    from maskattn_comfy.patch import apply_maskattn

    tensors, args = unet_call
    gates = load_official_checkpoint(FIXTURES / "official_tiny_all_per_layer.pt")
    gates.layer_heads[first], gates.layer_heads[second] = gates.layer_heads[second], gates.layer_heads[first]
    swapped = run_unet(apply_maskattn(tiny_unet, gates), *args)
    assert (swapped - tensors[CHECKPOINTS["official_tiny_all_per_layer"]]).abs().max() > 1e-3


# -- checks on what a file claims -----------------------------------------------------------

@pytest.mark.parametrize("name", CHECKPOINTS)
def test_a_checkpoint_that_claims_shared_heads_but_holds_different_ones_is_refused(tmp_path, name):
    checkpoint = torch.load(FIXTURES / f"{name}.pt", map_location="cpu", weights_only=True)
    state = {k: v.clone() for k, v in checkpoint["gate_state_dict"].items()}
    if checkpoint["maskattn_config"]["share_gate_heads_by_stage"]:
        state[f"{checkpoint['selected_layers'][-1]}.gate_head.logit_bias"] += 0.25  # one layer's copy drifts
    else:  # per-layer heads, now claimed to be shared
        checkpoint["maskattn_config"] = dict(checkpoint["maskattn_config"], share_gate_heads_by_stage=True)
    checkpoint["gate_state_dict"] = state
    torch.save(checkpoint, tmp_path / "edited.pt")
    with pytest.raises(OfficialCheckpointError, match="shared"):
        load_official_checkpoint(tmp_path / "edited.pt")


def test_the_shared_official_head_is_kept_once_with_the_authors_values():
    checkpoint = torch.load(FIXTURES / "official_tiny_mid.pt", map_location="cpu", weights_only=True)
    gates = load_official_checkpoint(FIXTURES / "official_tiny_mid.pt")
    assert list(gates.heads) == ["mid"] and len(gates.layers) == 10
    first = f"{checkpoint['selected_layers'][0]}.gate_head.logit_bias"
    assert torch.equal(gates.heads["mid"].logit_bias, checkpoint["gate_state_dict"][first])


def test_an_authors_checkpoint_of_another_format_is_refused(tmp_path):
    checkpoint = torch.load(FIXTURES / "official_tiny_mid.pt", map_location="cpu", weights_only=True)
    torch.save(dict(checkpoint, format="maskattn-sdxl-gates-v2"), tmp_path / "v2.pt")
    with pytest.raises(OfficialCheckpointError, match="maskattn-sdxl-gates-v2"):
        load_official_checkpoint(tmp_path / "v2.pt")


def test_a_gate_file_of_a_newer_format_version_is_refused_and_the_current_one_read(tmp_path):
    gates = load_official_checkpoint(FIXTURES / "official_tiny_all_per_layer.pt")
    tensors, meta = read_fixture(save_gate_file(gates, tmp_path / "gates.safetensors"))
    save_file(tensors, str(tmp_path / "current.safetensors"), metadata=dict(meta, format_version=str(FORMAT_VERSION)))
    save_file(tensors, str(tmp_path / "newer.safetensors"), metadata=dict(meta, format_version=str(FORMAT_VERSION + 1)))
    read = load_gate_file(tmp_path / "current.safetensors")
    assert read.layer_heads == gates.layer_heads
    written, kept = read.heads.state_dict(), gates.heads.state_dict()
    assert written.keys() == kept.keys() and all(torch.equal(written[k], kept[k]) for k in kept)
    with pytest.raises(GateFileError, match=f"format {FORMAT_VERSION + 1}"):
        load_gate_file(tmp_path / "newer.safetensors")
