"""MaskAttn and cubiq's IPAdapter_plus both installed in a real ComfyUI server's custom_nodes/, driven over HTTP.

IPAdapter runs through its own nodes (IPAdapter Model Loader, IPAdapter Advanced) on a tiny random
IPAdapter file; only the CLIP vision model is a stand-in (tests/tiny_nodes/clip_vision.py), which
IPAdapter's own code uses to encode the reference image.
"""

import json
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from conftest import COMFYUI, REPO
from ipadapter_kit import needs_snapshot, tiny_ipadapter_weights, unpack
from maskattn_comfy.tiny_model import build_sdxl_model
from maskattn_core import save_gate_file
from test_loader import tiny_gates
from test_server import run_and_read

sys.path.append(str(REPO / "scripts"))
from demo import tiny_prompt  # noqa: E402
from headless import TINY_NODES, ComfyServer, to_api_format  # noqa: E402

pytestmark = needs_snapshot
WORKFLOW = REPO / "example_workflows" / "maskattn_ipadapter.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-base")
    srv = ComfyServer(COMFYUI, base, extra_nodes=[TINY_NODES])
    unpack(base / "custom_nodes")  # as a user's git clone leaves it
    model = build_sdxl_model(seed=0)
    save_gate_file(tiny_gates(model, gain=10), base / "models" / "maskattn" / "maskattn_sdxl.safetensors")
    (base / "models" / "ipadapter").mkdir(parents=True)
    save_file(tiny_ipadapter_weights(model, seed=1), base / "models" / "ipadapter" / "ip-adapter_sdxl_vit-h.safetensors")
    (base / "input").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(base / "input" / "example.png")
    with srv:
        yield srv


def example_prompt(server) -> dict:
    """The example workflow on the tiny model, the stand-in CLIP vision model in place of CLIPVisionLoader."""
    api = tiny_prompt(to_api_format(json.loads(WORKFLOW.read_text()), server.get("/object_info")), size=64, steps=2)
    for node in api.values():
        if node["class_type"] == "CLIPVisionLoader":
            node.update(class_type="MaskAttnTinyCLIPVision", inputs={"seed": 0})
    return api


def node_of(api, class_type) -> str:
    (node_id,) = [i for i, n in api.items() if n["class_type"] == class_type]
    return node_id


def test_both_packs_load_from_custom_nodes(server):
    info = server.get("/object_info")
    assert {"IPAdapterAdvanced", "IPAdapterModelLoader", "MaskAttnLoader"} <= set(info), server.log()[-3000:]
    assert "IMPORT FAILED" not in server.log()


def test_the_ipadapter_example_workflow_runs_over_http_without_a_warning(server):
    api = example_prompt(server)
    model_chain = [api[node_of(api, "KSampler")]["inputs"]["model"][0], api[node_of(api, "MaskAttnLoader")]["inputs"]["model"][0]]
    assert model_chain == [node_of(api, "MaskAttnLoader"), node_of(api, "IPAdapterAdvanced")]
    result = server.run(api, timeout=300)
    assert result["status"]["status_str"] == "success", result["status"]
    (image,) = result["outputs"][node_of(api, "SaveImage")]["images"]
    assert (server.output / image["filename"]).stat().st_size > 0
    assert "MaskAttn:" not in server.log()  # no "computed but not applied", no conflict


def test_either_node_order_gives_the_same_picture_and_strength_zero_gives_ipadapters(server):
    api = example_prompt(server)
    ksampler, loader, ipadapter = (node_of(api, t) for t in ("KSampler", "MaskAttnLoader", "IPAdapterAdvanced"))
    checkpoint = api[ipadapter]["inputs"]["model"][0]

    def variant(seed_offset, chain, strength=1.0):
        run = json.loads(json.dumps(api))
        run[ksampler]["inputs"]["seed"] += seed_offset  # a fresh seed per queue: nothing comes from ComfyUI's cache
        run[loader]["inputs"]["strength"] = strength
        previous = [checkpoint, 0]
        for node_id in chain:
            run[node_id]["inputs"]["model"] = previous
            previous = [node_id, 0]
        run[ksampler]["inputs"]["model"] = previous
        if loader not in chain:
            del run[loader]
        return run

    for offset in (1, 2):  # seed 42 (offset 0) ran in the test above: its picture would come from the cache
        ipadapter_first, _ = run_and_read(server, variant(offset, [ipadapter, loader]))
        maskattn_first, _ = run_and_read(server, variant(offset, [loader, ipadapter]))
        off, _ = run_and_read(server, variant(offset, [loader, ipadapter], strength=0.0))
        alone, _ = run_and_read(server, variant(offset, [ipadapter]))
        gates_only, _ = run_and_read(server, variant(offset, [loader]))
        assert np.array_equal(ipadapter_first, maskattn_first)
        assert np.array_equal(off, alone)
        assert not np.array_equal(ipadapter_first, alone)  # the gates act
        assert not np.array_equal(ipadapter_first, gates_only)  # and so does the image prompt
    assert "MaskAttn:" not in server.log()
