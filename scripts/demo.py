"""The main job on an embedded default: the example workflow, end to end, on a real ComfyUI server.

    .venv/bin/python scripts/demo.py [--out maskattn-demo]

It trains demo gates on the tiny built-in SDXL-topology model (trainer/train.py --demo),
starts ComfyUI on 127.0.0.1 with this pack installed, queues example_workflows/maskattn_sdxl.json
over HTTP with the tiny model in place of the SDXL checkpoint, and
writes the images (with gates and, for comparison, at strength 0) to --out.
The tiny model has random weights: the images show the pipeline runs, not what SDXL draws.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(PACK_ROOT))  # appended: the pack's nodes/ must not shadow ComfyUI's nodes.py
sys.path.append(str(PACK_ROOT / "scripts"))

from headless import TINY_NODES, ComfyServer, to_api_format  # noqa: E402
from maskattn_comfy.host import find_comfyui  # noqa: E402

WORKFLOW = PACK_ROOT / "example_workflows" / "maskattn_sdxl.json"
GATES = "maskattn_sdxl.safetensors"


def tiny_prompt(api: dict, size: int, steps: int) -> dict:
    """Swap the SDXL checkpoint for the tiny test node (same MODEL, CLIP, VAE outputs); shrink size and steps."""
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node.update(class_type="MaskAttnTinySDXL", inputs={"seed": 0})
        elif kind == "EmptyLatentImage":
            inputs.update(width=size, height=size)
        elif kind == "KSampler":
            inputs.update(steps=steps)
        elif kind == "MaskAttnVisualize":
            inputs.update(noise_levels=min(inputs["noise_levels"], 2))
    return api


def gated(api: dict, strength: float, prefix: str) -> dict:
    """The workflow at one Loader strength; at 0 there are no gates to visualize, so that branch is dropped."""
    run = json.loads(json.dumps(api))
    if strength == 0.0:
        dropped = {i for i, n in run.items() if n["class_type"] == "MaskAttnVisualize"}
        dropped |= {i for i, n in run.items()
                    if any(isinstance(v, list) and v[0] in dropped for v in n["inputs"].values())}
        run = {i: n for i, n in run.items() if i not in dropped}
    for node in run.values():
        if node["class_type"] == "MaskAttnLoader":
            node["inputs"].update(gate_name=GATES, strength=strength)
        if node["class_type"] == "SaveImage" and node["inputs"]["filename_prefix"] == "MaskAttn":
            node["inputs"]["filename_prefix"] = prefix
    return run


def train_demo_gates(target: Path, run: Path, comfyui: Path) -> None:
    command = [sys.executable, str(PACK_ROOT / "trainer" / "train.py"), "--demo", "--comfyui", str(comfyui),
               "--output", str(run), "--name", target.stem]
    print("[demo] training demo gates:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    shutil.copy(run / f"{target.stem}.safetensors", target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACK_ROOT / "maskattn-demo", help="where the images go")
    parser.add_argument("--comfyui", help="a ComfyUI folder (default: COMFYUI_PATH or the one setup.sh made)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    comfyui = find_comfyui(args.comfyui)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="maskattn-demo-") as base:
        base = Path(base)
        server = ComfyServer(comfyui, base, extra_nodes=[TINY_NODES])
        train_demo_gates(base / "models" / "maskattn" / GATES, base / "training", comfyui)
        print(f"[demo] starting ComfyUI at {server.url}", flush=True)
        with server:
            api = to_api_format(json.loads(WORKFLOW.read_text()), server.get("/object_info"))
            api = tiny_prompt(api, args.size, args.steps)
            for prefix, strength in (("MaskAttn", 1.0), ("Plain", 0.0)):
                run = gated(api, strength, prefix)
                result = server.run(run)
                status = result.get("status", {})
                if status.get("status_str") != "success":
                    print(f"[demo] the workflow failed: {status}", file=sys.stderr)
                    return 1
                print(f"[demo] {prefix}: done ({status.get('status_str')})", flush=True)
        for image in sorted(server.output.glob("*.png")):
            shutil.copy(image, args.out / image.name)
        shutil.copy(base / "models" / "maskattn" / GATES, args.out / GATES)
    print(f"[demo] wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
