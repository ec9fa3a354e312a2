"""The stack example workflows (ControlNet, gates in the early steps only, Visualize Mask's MASK as an inpainting
mask), each loaded from example_workflows/ and run on a real ComfyUI server over HTTP, on stand-in tiny models."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import comfy.samplers
import comfy.utils
import nodes
from conftest import COMFYUI, REPO
from maskattn_comfy.tiny_model import build_sdxl_model, tiny_conditioning
from maskattn_core import save_gate_file
from test_loader import loader, tiny_gates
from test_stacks import run_node, tiny_controlnet_state_dict

sys.path.append(str(REPO / "scripts"))
from demo import PROMPTS, regions_prompt, tiny_prompt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
from headless import TINY_NODES, ComfyServer, to_api_format  # noqa: E402

CONTROLNET = "controlnet-canny-sdxl-1.0.safetensors"  # the workflow's file name; here a tiny stand-in


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-stacks")
    srv = ComfyServer(COMFYUI, base, extra_nodes=[TINY_NODES])
    # bias -1.5: the word map of "cube" then lies around 0.5, so the inpainting workflow's threshold splits it
    gates = tiny_gates(build_sdxl_model(seed=0), seed=3, gain=10, bias=-1.5)
    save_gate_file(gates, base / "models" / "maskattn" / "maskattn_sdxl.safetensors")
    (base / "models" / "controlnet").mkdir(parents=True)
    comfy.utils.save_torch_file(tiny_controlnet_state_dict(), str(base / "models" / "controlnet" / CONTROLNET))
    layout = np.zeros((64, 64, 3), np.uint8)  # LoadImage's example.png: two shapes for Canny to outline
    layout[8:30, 6:28] = (220, 40, 40)
    layout[36:60, 30:58] = (40, 60, 220)
    (base / "input").mkdir()
    Image.fromarray(layout).save(base / "input" / "example.png")
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the server's torch: one intra-op thread, as the in-process tests use
    try:
        with srv:
            yield srv
    finally:
        os.environ.pop("OMP_NUM_THREADS") if threads is None else os.environ.update(OMP_NUM_THREADS=threads)


def example(server, name, size=64, steps=2):
    workflow = json.loads((REPO / "example_workflows" / name).read_text())
    return tiny_prompt(to_api_format(workflow, server.get("/object_info")), size=size, steps=steps)


def of_type(api, class_type):
    return [node_id for node_id, node in api.items() if node["class_type"] == class_type]


def run(server, api, keep_latents_of=()):
    """Queue `api` with a SaveLatent after each node named in `keep_latents_of`; their latents by node id, and the
    history entry."""
    api = json.loads(json.dumps(api))
    for node_id in keep_latents_of:
        api[f"latent_{node_id}"] = {"class_type": "SaveLatent",
                                    "inputs": {"samples": [node_id, 0], "filename_prefix": f"latents/node{node_id}"}}
    result = server.run(api, timeout=300)
    status = result["status"]
    assert status["status_str"] == "success", status
    assert not [m for m in status.get("messages", []) if m[0] == "execution_error"]
    latents = {}
    for node_id in keep_latents_of:
        (saved,) = result["outputs"][f"latent_{node_id}"]["latents"]
        path = server.output / saved["subfolder"] / saved["filename"]
        latents[node_id] = load_file(str(path))["latent_tensor"]
    return latents, result


def saved_images(server, result, node_id):
    return [np.asarray(Image.open(server.output / img["subfolder"] / img["filename"]))
            for img in result["outputs"][node_id]["images"]]


def differ(a, b):
    return float((a - b).abs().max()) > 1e-3 * float(a.abs().max())


def test_controlnet_workflow_applies_both_the_controlnet_and_the_gates(server):
    api = example(server, "maskattn_controlnet.json")
    (sampler,) = of_type(api, "KSampler")
    (apply,) = of_type(api, "ControlNetApplyAdvanced")
    (gates,) = of_type(api, "MaskAttnLoader")
    assert api[apply]["inputs"]["control_net"][0] in of_type(api, "ControlNetLoader")
    assert api[api[apply]["inputs"]["image"][0]]["class_type"] == "Canny"
    latents, result = run(server, api, [sampler])
    (image,) = saved_images(server, result, of_type(api, "SaveImage")[0])
    assert image.shape == (64, 64, 3)
    no_controlnet = json.loads(json.dumps(api))
    no_controlnet[apply]["inputs"]["strength"] = 0.0
    no_gates = json.loads(json.dumps(api))
    no_gates[gates]["inputs"]["strength"] = 0.0
    both = latents[sampler]
    assert differ(both, run(server, no_controlnet, [sampler])[0][sampler])
    assert differ(both, run(server, no_gates, [sampler])[0][sampler])


def test_early_steps_workflow_gates_some_steps_and_not_all(server):
    api = example(server, "maskattn_early_steps.json", steps=4)
    (sampler,) = of_type(api, "KSampler")
    (gates,) = of_type(api, "MaskAttnLoader")
    assert (api[gates]["inputs"]["start_percent"], api[gates]["inputs"]["end_percent"]) == (0.0, 0.4)
    early = run(server, api, [sampler])[0][sampler]
    variants = {}
    for name, change in {"every step": {"end_percent": 1.0}, "no gates": {"strength": 0.0}}.items():
        variant = json.loads(json.dumps(api))
        variant[gates]["inputs"].update(change)
        variants[name] = run(server, variant, [sampler])[0][sampler]
    assert differ(early, variants["no gates"])
    # the late steps refine little, so gating them too changes the result only a little, but it does change it
    assert not torch.equal(early, variants["every step"])


def test_early_steps_equal_a_gated_sampler_for_the_steps_in_range_then_the_plain_model(pack, gate_folder):
    """The workflow's claim in exact terms: gating 0-40 % of the schedule is sampling the steps whose sigma lies in
    that range with the gated model, then the rest with the plain one (euler: one step depends only on the last)."""
    workflow = json.loads((REPO / "example_workflows" / "maskattn_early_steps.json").read_text())
    (widgets,) = [n["widgets_values"] for n in workflow["nodes"] if n["type"] == "MaskAttnLoader"]
    start, end = widgets[2:4]
    model = build_sdxl_model(seed=0)
    save_gate_file(tiny_gates(model, gain=10), gate_folder / "gates.safetensors")
    gated = loader(pack, model, "gates.safetensors", start=start, end=end)
    steps = 4
    sampling = model.get_model_object("model_sampling")
    schedule = comfy.samplers.calculate_sigmas(sampling, "normal", steps)[:-1]
    in_range = int((schedule >= sampling.percent_to_sigma(end)).sum())
    assert 0 < in_range < steps
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    conds = {"positive": tiny_conditioning(seed=1), "negative": tiny_conditioning(seed=2)}

    def advanced(model, latent, first, last, add_noise, leftover):
        return run_node(nodes.KSamplerAdvanced, model=model, add_noise=add_noise, noise_seed=0, steps=steps, cfg=5.0,
                        sampler_name="euler", scheduler="normal", latent_image=latent, start_at_step=first,
                        end_at_step=last, return_with_leftover_noise=leftover, **conds)[0]

    whole = advanced(gated, latent, 0, steps, "enable", "disable")["samples"]
    split = advanced(model, advanced(gated, latent, 0, in_range, "enable", "enable"), in_range, steps, "disable",
                     "disable")["samples"]
    always = advanced(loader(pack, model, "gates.safetensors"), latent, 0, steps, "enable", "disable")["samples"]
    plain = advanced(model, latent, 0, steps, "enable", "disable")["samples"]
    scale = float(whole.abs().max())
    assert float((whole - split).abs().max()) < 1e-5 * scale
    assert differ(whole, always) and differ(whole, plain)


def test_inpaint_workflow_resamples_only_where_the_gate_map_is_above_the_threshold(server):
    api = example(server, "maskattn_inpaint.json", size=128, steps=2)
    first, inpaint = (next(i for i in of_type(api, "KSampler") if api[i]["inputs"]["denoise"] == d) for d in (1.0, 0.6))
    (noise_mask,) = of_type(api, "SetLatentNoiseMask")
    (threshold,) = of_type(api, "ThresholdMask")
    assert api[noise_mask]["inputs"]["samples"] == [first, 0] and api[inpaint]["inputs"]["latent_image"] == [noise_mask, 0]
    assert api[api[threshold]["inputs"]["mask"][0]]["class_type"] == "MaskAttnVisualize"
    (preview,) = of_type(api, "PreviewImage")  # the mask's preview, saved here so the test can read it
    api[preview] = {"class_type": "SaveImage", "inputs": dict(api[preview]["inputs"], filename_prefix="inpaint_mask")}
    latents, result = run(server, api, [first, inpaint])
    (mask_image,) = saved_images(server, result, preview)
    mask = torch.from_numpy(mask_image[..., 0] / 255.0).float()
    assert set(np.unique(mask_image)) <= {0, 255}  # a thresholded map: 0 or 1 everywhere
    before, after = latents[first], latents[inpaint]
    kept = comfy.utils.reshape_mask(mask[None], before.shape)  # as the sampler scales the noise mask
    assert 0.05 < float((kept == 0).float().mean()) and 0.05 < float((kept == 1).float().mean())
    outside, inside = kept == 0, kept == 1
    scale = float(before.abs().max())
    assert float((after - before)[outside].abs().max()) < 1e-5 * scale  # kept exactly (up to latent scaling)
    assert float((after - before)[inside].abs().max()) > 1e-2 * scale


# -- MaskAttn Region workflows ---------------------------------------------------------------

def without_regions(api):
    """The same graph with the MaskAttn Region nodes taken out: the sampler gets the checkpoint's MODEL."""
    api = json.loads(json.dumps(api))
    regions = of_type(api, "MaskAttnRegion")
    for node in api.values():
        for name, value in node["inputs"].items():
            while isinstance(value, list) and value[0] in regions:
                value = api[value[0]]["inputs"]["model"]
            node["inputs"][name] = value
    return {i: n for i, n in api.items() if i not in regions}


@pytest.mark.parametrize("name, size", [("maskattn_regions_sdxl.json", 64), ("maskattn_regions_shapes.json", 128)])
def test_regions_workflow_confines_each_objects_words_to_its_half(server, name, size):
    api = example(server, name, size=size)
    regions = of_type(api, "MaskAttnRegion")
    (sampler,) = of_type(api, "KSampler")
    assert len(regions) == 2
    for region in regions:  # each mask: Solid Mask 0 with a Solid Mask 1 of half the width composited onto it
        composite = api[api[region]["inputs"]["mask"][0]]
        assert composite["class_type"] == "MaskComposite"
        assert [api[composite["inputs"][k][0]]["class_type"] for k in ("destination", "source")] == ["SolidMask"] * 2
    assert api[api[sampler]["inputs"]["model"][0]]["class_type"] == "MaskAttnRegion"
    confined = run(server, api, [sampler])[0][sampler]
    off = json.loads(json.dumps(api))
    for region in regions:
        off[region]["inputs"]["strength"] = 0.0
    plain = run(server, without_regions(api), [sampler])[0][sampler]
    assert torch.equal(run(server, off, [sampler])[0][sampler], plain)  # strength 0: the checkpoint's model
    assert differ(confined, plain)


def _mask_of(api, node_id):
    """The 128x128 mask a Solid Mask / Mask Composite graph draws, computed here from the node inputs."""
    node = api[node_id]
    inputs = node["inputs"]
    if node["class_type"] == "SolidMask":
        return torch.full((inputs["height"], inputs["width"]), float(inputs["value"]))
    assert node["class_type"] == "MaskComposite" and inputs["operation"] == "add"
    out = _mask_of(api, inputs["destination"][0]).clone()
    source = _mask_of(api, inputs["source"][0])
    x, y = inputs["x"], inputs["y"]
    out[y:y + source.shape[0], x:x + source.shape[1]] += source[:out.shape[0] - y, :out.shape[1] - x]
    return out.clamp(0, 1)


@pytest.mark.parametrize("text", PROMPTS)
def test_the_demos_regions_give_each_objects_words_the_half_its_caption_names(server, text):
    """scripts/demo.py's Regions column: "a cyan circle below a red square" confines "cyan, circle" to the
    bottom half and "red, square" to the top; "and" puts the first named on the left."""
    from maskattn_shapes.diagnose import half_mask, halves
    from maskattn_shapes.world import parse_caption

    api = to_api_format(json.loads((REPO / "example_workflows" / "maskattn_regions_shapes.json").read_text()),
                        server.get("/object_info"))
    run_api = regions_prompt(api, text, seed=5, prefix="R")
    prompt = parse_caption(text)
    expected = {f"{c}, {s}": half_mask(half, 128, 128).float() for (c, s), half in zip(prompt.objects, halves(prompt))}
    regions = of_type(run_api, "MaskAttnRegion")
    assert sorted(run_api[r]["inputs"]["words"] for r in regions) == sorted(expected)
    for region in regions:
        inputs = run_api[region]["inputs"]
        assert inputs["text"] == text
        assert torch.equal(_mask_of(run_api, inputs["mask"][0]), expected[inputs["words"]]), inputs["words"]
    (sampler,) = of_type(run_api, "KSampler")
    assert run_api[sampler]["inputs"]["seed"] == 5
    assert run_api[run_api[sampler]["inputs"]["positive"][0]]["inputs"]["text"] == text
