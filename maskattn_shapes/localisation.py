"""Do learned gates know where a word belongs? Each colour word's gate map against its own object and the other.

    python -m maskattn_shapes.localisation --gates maskattn_shapes/gates/shapes_gates_soft.safetensors ...

For two-object held-out prompts (relation and pair) the world draws the prompt's own picture (its true
geometry), the codec encodes it, and Visualize Mask's recorder runs the gated model on it at a few
noise levels (as the node does), keeping each object's colour-word gate probability per layer. Per
object and gated layer: the mean probability over the cells its object covers (at least half) and over
the cells the *other* object covers. A gate that knows where the word belongs opens its own object's
cells more than the other's: `own > other` in most cases, and a large `own - other`. An objectness map
(every word open on every object) gives own = other. Cannot see: whether the pictures the gated model
samples are better (the study says that), or layers the gates do not cover.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def colour_columns(clip, prompt) -> list[list[int]]:
    """The token columns of each object's colour word, in caption-spec order."""
    from maskattn_comfy.regions import word_positions

    return [word_positions(clip, prompt.text, color)[0] for color, _ in prompt.objects]


def localisation(model, clip, vae, gate_file: Path, prompts, noise_levels: int = 2, seed: int = 0) -> dict:
    """Over every (prompt, object, gated layer): the mean gate probability of the object's colour word on its
    own object's cells ("own") and on the other object's ("other"), their mean difference and how often own
    is the larger; "n" counts the cases."""
    from maskattn_comfy.patch import PatchOptions, apply_maskattn
    from maskattn_comfy.render import chosen_maps
    from maskattn_comfy.visualize import VisualizeOptions, record_maps
    from maskattn_core.gate_file import load_gate_file
    from maskattn_shapes.grounding import object_coverage
    from maskattn_shapes.world import render, scene_for

    gated = apply_maskattn(model, load_gate_file(gate_file), PatchOptions(strength=1.0))
    own, other = [], []
    for i, prompt in enumerate(prompts):
        scene = scene_for(prompt, seed=seed + i)
        pixels = torch.from_numpy(np.asarray(render(scene), dtype=np.float32) / 255.0)[None]
        latent = {"samples": vae.encode(pixels)}
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt.text))
        options = VisualizeOptions(seed=seed + i, noise_levels=noise_levels)
        maps = chosen_maps(record_maps(gated, positive, latent, options, colour_columns(clip, prompt)).maps(), "probability")
        # scene.objects are in layout order; the caption-spec order is prompt.objects
        by_combo = {(o.color, o.shape): j for j, o in enumerate(scene.objects)}
        for layer_map in maps.values():  # [2, h, w]
            side = layer_map.shape[-1]
            cover = object_coverage(scene, side) >= 0.5  # [3, side*side]
            for word, combo in enumerate(prompt.objects):
                mine, theirs = by_combo[combo], by_combo[prompt.objects[1 - word]]
                values = layer_map[word].reshape(-1).float().numpy()
                if cover[mine].any() and cover[theirs].any():
                    own.append(float(values[cover[mine]].mean()))
                    other.append(float(values[cover[theirs]].mean()))
    own_a, other_a = np.array(own), np.array(other)
    return {"gates": gate_file.name, "n": len(own), "own": float(own_a.mean()), "other": float(other_a.mean()),
            "own_minus_other": float((own_a - other_a).mean()), "own_above_other": float((own_a > other_a).mean())}


def main(argv=None):
    from maskattn_shapes.cli import positive

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gates", nargs="+", type=Path, required=True, help="gate files for the Shapes base")
    p.add_argument("--per-kind", type=positive(int), default=20, help="relation and pair prompts each")
    p.add_argument("--noise-levels", type=positive(int), default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    for path in args.gates:
        if not path.is_file():
            p.error(f"--gates {path}: no such file")

    from maskattn_comfy import host

    host.boot(cpu=True)
    from maskattn_shapes import model as shapes
    from maskattn_shapes.world import heldout_prompts

    model, clip, vae = shapes.load_shapes_checkpoint()
    prompts = [q for kind in ("relation", "pair") for q in heldout_prompts(args.per_kind, 0, kind)]
    rows = [localisation(model, clip, vae, path, prompts, args.noise_levels) for path in args.gates]
    print("| gates | n (object x layer) | p on own object | p on the other | own - other | own > other |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gates']} | {r['n']} | {r['own']:.3f} | {r['other']:.3f} | {r['own_minus_other']:+.3f} | "
              f"{100 * r['own_above_other']:.0f} % |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
