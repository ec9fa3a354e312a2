"""The Shapes study's control: a low-rank cross-attention update with the gates' parameter budget."""

import torch

from maskattn_comfy.model_check import require_sdxl
from maskattn_comfy.tiny_model import build_sdxl_model
from maskattn_core import GateSet, MaskAttnConfig, parse_layer_name
from maskattn_shapes.control import ControlSet, apply_control


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100.0, 700.0]), torch.randn(2, 77, 2048, generator=g),
            torch.randn(2, 2816, generator=g))


def _run(patcher):
    x, t, context, y = _inputs()
    with torch.no_grad():
        return patcher.model.diffusion_model(x, t, context=context, y=y,
                                             transformer_options=dict(patcher.model_options.get("transformer_options", {})))


def test_the_control_has_about_the_gates_parameter_count_on_the_gated_layers():
    model = build_sdxl_model(seed=0)
    config = MaskAttnConfig(stage="mid", gate_hidden_dim=16)
    control = ControlSet.matching(config, require_sdxl(model))
    gates = GateSet.create(config, require_sdxl(model))
    assert sorted(control.layer_heads) == sorted(gates.layer_heads)
    count = sum(p.numel() for p in control.parameters())
    per_rank = count / control.rank
    assert abs(count - gates.parameter_count()) <= per_rank / 2  # the nearest rank


def test_an_untrained_control_is_the_base_exactly():
    model = build_sdxl_model(seed=0)
    control = ControlSet.matching(MaskAttnConfig(stage="mid", gate_hidden_dim=16), require_sdxl(model))
    assert torch.equal(_run(apply_control(model, control)), _run(model))


def test_the_control_equals_its_update_merged_into_the_key_and_value_weights(tmp_path):
    model = build_sdxl_model(seed=0)
    control = ControlSet.matching(MaskAttnConfig(stage="mid", gate_hidden_dim=16), require_sdxl(model), seed=1)
    with torch.no_grad():
        for p in control.parameters():
            p.normal_(0, 0.05)
    path = control.save(tmp_path / "control.safetensors", {"steps": 0})
    control = ControlSet.load(path)  # what the study applies: the file, float16-rounded
    gated = _run(apply_control(model, control))

    merged = build_sdxl_model(seed=0)
    unet = merged.model.diffusion_model
    with torch.no_grad():
        for name in control.layer_heads:
            where, index, block = parse_layer_name(name)
            blocks = {"input": unet.input_blocks, "middle": [unet.middle_block], "output": unet.output_blocks}[where]
            transformer = blocks[index if where != "middle" else 0][1].transformer_blocks[block]
            update = control.update_for(name)
            transformer.attn2.to_k.weight += update.key_up.weight @ update.key_down.weight
            transformer.attn2.to_v.weight += update.value_up.weight @ update.value_down.weight
    reference = _run(merged)
    assert float((gated - _run(model)).abs().max()) > 1e-2  # the update acts
    assert float((gated - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
