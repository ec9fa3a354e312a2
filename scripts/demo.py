"""The main job on an embedded default: MaskAttn at work in the pack's Shapes world, on a real ComfyUI server.

    .venv/bin/python scripts/demo.py [--out maskattn-demo]

It starts ComfyUI on 127.0.0.1 with this pack installed and queues
example_workflows/maskattn_shapes.json over HTTP for a few two-object prompts: the shipped
Shapes model (MaskAttn Shapes Checkpoint) with the shipped soft gates (shapes_gates_soft.safetensors; EVIDENCE.md says why these),
once at strength 1 and once at strength 0 (the plain model), with the same seed. It writes
comparison.png (plain | gated, side by side, with what the evaluator read in each), maps.png
(Visualize Mask: which words each image region may attend to) and the single images to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(PACK_ROOT))  # appended: the pack's nodes/ must not shadow ComfyUI's nodes.py
sys.path.append(str(PACK_ROOT / "scripts"))

try:
    import numpy as np
    from PIL import Image, ImageDraw
except ImportError as error:  # run with a Python that has no ComfyUI environment
    sys.exit(f"[demo] {error.name} is missing: run the demo with the Python that runs ComfyUI, e.g. "
             f".venv/bin/python scripts/demo.py after `bash scripts/setup.sh`")

from headless import ComfyServer, to_api_format  # noqa: E402
from maskattn_comfy.host import ComfyUINotFound, find_comfyui  # noqa: E402

WORKFLOW = PACK_ROOT / "example_workflows" / "maskattn_shapes.json"
REGIONS_WORKFLOW = PACK_ROOT / "example_workflows" / "maskattn_regions_shapes.json"
PROMPTS = ("a red circle to the left of a blue square", "a yellow triangle above a purple circle",
           "a green square and an orange triangle", "a cyan circle below a red square")


def tiny_prompt(api: dict, size: int, steps: int) -> dict:
    """The SDXL example on the tests' tiny random model: the test node in place of the checkpoint, small sizes."""
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


def shapes_prompt(api: dict, text: str, seed: int, strength: float, prefix: str, maps: bool) -> dict:
    """The Shapes workflow for one prompt, seed and Loader strength; the Visualize branch only where asked."""
    run = json.loads(json.dumps(api))
    if not maps:
        dropped = {i for i, n in run.items() if n["class_type"] == "MaskAttnVisualize"}
        dropped |= {i for i, n in run.items() if any(isinstance(v, list) and v[0] in dropped for v in n["inputs"].values())}
        run = {i: n for i, n in run.items() if i not in dropped}
    positive = next(n["inputs"]["positive"][0] for n in run.values() if n["class_type"] == "KSampler")
    run[positive]["inputs"]["text"] = text
    for node in run.values():
        inputs = node["inputs"]
        if node["class_type"] == "MaskAttnLoader":
            inputs["strength"] = strength
        elif node["class_type"] == "KSampler":
            inputs["seed"] = seed
        elif node["class_type"] == "MaskAttnVisualize":
            inputs.update(text=text, seed=seed)
        elif node["class_type"] == "SaveImage" and inputs["filename_prefix"] == "MaskAttn":
            inputs["filename_prefix"] = prefix
    return run


def regions_prompt(api: dict, text: str, seed: int, prefix: str) -> dict:
    """The Regions workflow for one prompt: each object's colour and shape words confined to the half of
    the picture its caption gives it (left/right, or top/bottom; "and": the first named on the left)."""
    from maskattn_shapes.diagnose import halves
    from maskattn_shapes.world import parse_caption

    run = json.loads(json.dumps(api))
    prompt = parse_caption(text)
    first, _ = halves(prompt)
    words = [f"{color}, {shape}" for color, shape in prompt.objects]
    if first in ("right", "bottom"):
        words.reverse()  # the first Region's mask is the left (or top) half
    vertical = first in ("top", "bottom")
    by_id = {int(i): n for i, n in run.items()}
    regions = sorted(i for i, n in by_id.items() if n["class_type"] == "MaskAttnRegion")
    for node_id, node in by_id.items():
        inputs = node["inputs"]
        if node["class_type"] == "MaskAttnRegion":
            inputs.update(text=text, words=words[regions.index(node_id)])
        elif node["class_type"] == "SolidMask" and inputs["value"] == 1.0:
            inputs.update(width=128 if vertical else 64, height=64 if vertical else 128)
        elif node["class_type"] == "MaskComposite" and (inputs["x"] or inputs["y"]):
            inputs.update(x=0 if vertical else 64, y=64 if vertical else 0)
        elif node["class_type"] == "CLIPTextEncode" and inputs["text"]:
            inputs["text"] = text
        elif node["class_type"] == "KSampler":
            inputs["seed"] = seed
        elif node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = prefix
    return run


def verdict(text: str, picture: np.ndarray) -> str:
    from maskattn_shapes.evaluate import read_image, score
    from maskattn_shapes.world import parse_caption

    found = read_image(picture)
    s = score(parse_caption(text), found)
    drawn = ", ".join(f"{f.color or '?'} {f.shape or '?'}" for f in found) or "nothing readable"
    return f"{'right' if s['exact'] else 'wrong'}: {drawn}"


COLUMNS = (("Plain", "plain (no MaskAttn)"), ("Regions", "MaskAttn Region: words in their half"),
           ("MaskAttn", "MaskAttn gates (learned)"))


def comparison(rows: list[tuple[str, dict]], scale: int = 2) -> Image.Image:
    """Rows of (prompt, {column: picture}), each picture enlarged, with the evaluator's reading under it."""
    side, label = 128 * scale, 34
    sheet = Image.new("RGB", (len(COLUMNS) * (side + 10) + 20, 26 + len(rows) * (side + label + 22)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, (_, title) in enumerate(COLUMNS):
        draw.text((10 + column * (side + 10), 6), title, fill="black")
    y = 26
    for text, pictures in rows:
        draw.text((10, y), text, fill="black")
        for column, (key, _) in enumerate(COLUMNS):
            x = 10 + column * (side + 10)
            sheet.paste(Image.fromarray(pictures[key]).resize((side, side), Image.NEAREST), (x, y + 16))
            draw.text((x, y + 20 + side), verdict(text, pictures[key])[:40], fill="black")
        y += side + label + 22
    return sheet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACK_ROOT / "maskattn-demo", help="where the images go")
    parser.add_argument("--comfyui", help="a ComfyUI folder (default: COMFYUI_PATH or the one setup.sh made)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed + i, plain and gated alike")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args(argv)
    try:
        comfyui = find_comfyui(args.comfyui)
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except ComfyUINotFound as error:
        print(f"[demo] {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"[demo] cannot write to --out {args.out}: {error.strerror}; choose another folder", file=sys.stderr)
        return 2
    rows, maps = [], None
    with tempfile.TemporaryDirectory(prefix="maskattn-demo-") as base:
        server = ComfyServer(comfyui, Path(base))
        print(f"[demo] starting ComfyUI at {server.url}", flush=True)
        with server:
            info = server.get("/object_info")
            api = to_api_format(json.loads(WORKFLOW.read_text()), info)
            regions_api = to_api_format(json.loads(REGIONS_WORKFLOW.read_text()), info)
            for node in (*api.values(), *regions_api.values()):
                if node["class_type"] == "KSampler":
                    node["inputs"]["steps"] = args.steps
            for i, text in enumerate(PROMPTS):
                pictures = {}
                runs = (("Plain", shapes_prompt(api, text, args.seed + i, 0.0, f"Plain_{i}", maps=False)),
                        ("Regions", regions_prompt(regions_api, text, args.seed + i, f"Regions_{i}")),
                        ("MaskAttn", shapes_prompt(api, text, args.seed + i, 1.0, f"MaskAttn_{i}", maps=i == 0)))
                for prefix, run in runs:
                    result = server.run(run)
                    status = result.get("status", {})
                    if status.get("status_str") != "success":
                        print(f"[demo] the workflow failed: {status}", file=sys.stderr)
                        return 1
                    for output in result["outputs"].values():
                        for image in (i for i in output.get("images", []) if i.get("type") == "output"):
                            path = server.output / image["filename"]
                            shutil.copy(path, args.out / path.name)
                            if path.name.startswith("MaskAttn_maps"):
                                maps = path
                            elif path.name.startswith(f"{prefix}_{i}"):
                                pictures[prefix] = np.asarray(Image.open(path).convert("RGB"))
                rows.append((text, pictures))
                print(f"[demo] {text!r}: " + "; ".join(f"{key.lower()} {verdict(text, pictures[key])}" for key, _ in COLUMNS),
                      flush=True)
        comparison(rows).save(args.out / "comparison.png")
        if maps is not None:
            shutil.copy(maps, args.out / "maps.png")
    print(f"[demo] wrote comparison.png, maps.png and {len(rows) * len(COLUMNS)} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
