"""The pack in a real ComfyUI server, driven over HTTP as the frontend drives it."""

import json
import sys

import pytest

from conftest import COMFYUI, REPO
from maskattn_comfy.model_check import require_sdxl
from maskattn_comfy.tiny_model import build_sdxl_model
from maskattn_core import GateSet, MaskAttnConfig, save_gate_file

sys.path.append(str(REPO / "scripts"))
from demo import tiny_prompt  # noqa: E402
from headless import TINY_NODES, ComfyServer, to_api_format  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-base")
    srv = ComfyServer(COMFYUI, base, extra_nodes=[TINY_NODES])
    gates = GateSet.create(MaskAttnConfig(gate_hidden_dim=16), require_sdxl(build_sdxl_model(seed=0)), seed=3)
    save_gate_file(gates, base / "models" / "maskattn" / "maskattn_sdxl.safetensors")
    with srv:
        yield srv


def test_object_info_lists_the_loader_with_its_inputs(server):
    info = server.get("/object_info/MaskAttnLoader")["MaskAttnLoader"]
    required = info["input"]["required"]
    assert info["category"] == "MaskAttn"
    assert list(required) == ["model", "gate_name", "strength", "start_percent", "end_percent"]
    assert "maskattn_sdxl.safetensors" in required["gate_name"][1]["options"]
    assert required["strength"][1]["default"] == 1.0 and required["strength"][1]["max"] == 1.0
    assert all(spec[1].get("tooltip") for spec in required.values())


def test_example_workflow_over_http_saves_an_image(server):
    workflow = json.loads((REPO / "example_workflows" / "maskattn_sdxl.json").read_text())
    api = tiny_prompt(to_api_format(workflow, server.get("/object_info")), size=64, steps=2)
    assert any(n["class_type"] == "MaskAttnLoader" for n in api.values())
    result = server.run(api, timeout=300)
    status = result["status"]
    assert status["status_str"] == "success", status
    assert not [m for m in status.get("messages", []) if m[0] == "execution_error"]
    saved = {node_id: out.get("images", []) for node_id, out in result["outputs"].items()}
    save_nodes = [i for i, n in api.items() if n["class_type"] == "SaveImage"]
    assert len(save_nodes) == 2  # the sample and the Visualize Mask grid
    for node_id in save_nodes:
        assert saved[node_id] and (server.output / saved[node_id][0]["filename"]).stat().st_size > 0


def test_object_info_lists_visualize_mask_with_its_inputs(server):
    info = server.get("/object_info/MaskAttnVisualize")["MaskAttnVisualize"]
    assert info["category"] == "MaskAttn" and info["output_node"]
    assert list(info["input"]["required"])[:4] == ["model", "clip", "text", "latent"]
    assert "image" in info["input"]["optional"]
    assert info["output"] == ["IMAGE", "MASK"]


def test_an_error_in_the_loader_reaches_history_with_its_message(server):
    workflow = json.loads((REPO / "example_workflows" / "maskattn_sdxl.json").read_text())
    api = tiny_prompt(to_api_format(workflow, server.get("/object_info")), size=64, steps=1)
    for node in api.values():
        if node["class_type"] == "MaskAttnLoader":
            node["inputs"]["start_percent"], node["inputs"]["end_percent"] = 0.9, 0.1
    result = server.run(api, timeout=300)
    errors = [m[1] for m in result["status"].get("messages", []) if m[0] == "execution_error"]
    assert errors and "start_percent <= end_percent" in errors[0]["exception_message"]


def sample_only(api: dict, gate_name: str) -> dict:
    """The example workflow without its Visualize branch, the Loader reading `gate_name`."""
    run = {i: n for i, n in api.items() if n["class_type"] != "MaskAttnVisualize"}
    run = {i: n for i, n in run.items()
           if not any(isinstance(v, list) and v[0] not in run for v in n["inputs"].values())}
    for node in run.values():
        if node["class_type"] == "MaskAttnLoader":
            node["inputs"]["gate_name"] = gate_name
    return run


def run_and_read(server, api):
    """(pixels of the saved image or None when it came from the cache, ids of the nodes taken from the cache)."""
    import numpy as np
    from PIL import Image

    result = server.run(api, timeout=300)
    assert result["status"]["status_str"] == "success", result["status"]
    cached = [m[1]["nodes"] for m in result["status"]["messages"] if m[0] == "execution_cached"]
    images = [img for out in result["outputs"].values() for img in out.get("images", [])]
    pixels = np.asarray(Image.open(server.output / images[0]["filename"])) if images else None
    return pixels, set(cached[0] if cached else [])


def test_a_gate_file_overwritten_while_the_server_runs_is_used_at_the_next_queue(server):
    import os

    import numpy as np

    folder = server.base / "models" / "maskattn"
    widths = require_sdxl(build_sdxl_model(seed=0))
    old, new = (GateSet.create(MaskAttnConfig(gate_hidden_dim=16), widths, seed=s) for s in (11, 12))
    workflow = json.loads((REPO / "example_workflows" / "maskattn_sdxl.json").read_text())
    api = sample_only(tiny_prompt(to_api_format(workflow, server.get("/object_info")), size=64, steps=2),
                      "swap.safetensors")
    (loader_id,) = [i for i, n in api.items() if n["class_type"] == "MaskAttnLoader"]
    path = save_gate_file(old, folder / "swap.safetensors")
    stamp = path.stat()
    old_pixels, _ = run_and_read(server, api)
    again, cached = run_and_read(server, api)
    # unchanged file: the Loader comes from ComfyUI's cache (0.33 also repeats the cached image in history)
    assert loader_id in cached and (again is None or np.array_equal(again, old_pixels))

    save_gate_file(new, path)  # as train.py --install does; then the old mtime back, as cp -p or rsync would leave it
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size
    new_pixels, cached = run_and_read(server, api)
    assert loader_id not in cached
    save_gate_file(new, folder / "fresh.safetensors")
    fresh_pixels, _ = run_and_read(server, sample_only(api, "fresh.safetensors"))
    assert np.array_equal(new_pixels, fresh_pixels)  # exactly the new gates' output
    assert not np.array_equal(new_pixels, old_pixels)
