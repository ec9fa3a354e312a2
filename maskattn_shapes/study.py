"""The Shapes study: does MaskAttn help a model that binds colours to shapes poorly? One command.

    python -m maskattn_shapes.study                       # the committed weights, EVIDENCE numbers
    python -m maskattn_shapes.study --per-kind 40 --steps 8 --out output/study_quick

Every held-out prompt is sampled once per variant with the same seed (so the variants are
paired), through ComfyUI's own sampler, decoded by the Shapes codec and read by the
evaluator. Variants: the base alone, the base with each gate file at strength 1 (a file trained
with the soft gate is applied soft: its config says so), with --control the base with the
control's update (maskattn_shapes/control.py: the same extra training, no gates), and with
--half-strength the first gate file at strength 0.5 (closed connections keep half their weight).
Each row gives the share of prompts right with a Wilson 95 % interval and, against the base,
McNemar's exact paired p.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

KINDS = ("single_seen", "single", "pair", "relation", "triple")
METRICS = ("exact", "present", "binding", "spatial", "no_extra", "parseable", "colour", "shape")


def read_and_score(prompt, picture) -> dict:
    """The evaluator's score, plus for one-object prompts whether its colour and its shape were drawn at all."""
    from maskattn_shapes.evaluate import read_image, score

    found = read_image(picture)
    result = score(prompt, found)
    single = len(prompt.objects) == 1
    (colour, shape), = prompt.objects if single else ((None, None),)
    result["colour"] = any(f.color == colour for f in found) if single else None
    result["shape"] = any(f.shape == shape for f in found) if single else None
    return result


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_p(a: list[bool], b: list[bool]) -> float:
    """Exact two-sided McNemar p on paired outcomes (binomial test on the discordant pairs)."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def encode_prompts(clip, prompts, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts and pooled vectors of every prompt and, last, of the empty negative prompt."""
    from maskattn_shapes.model import encode_captions

    texts = [p.text for p in prompts] + [""]
    parts = [encode_captions(clip, texts[i:i + batch]) for i in range(0, len(texts), batch)]
    return torch.cat([c for c, _ in parts]), torch.cat([p for _, p in parts])


def sample(model, vae, encoded, seeds, steps: int, cfg: float, batch: int) -> np.ndarray:
    """uint8 pictures [N,128,128,3], one per prompt, each from its own seed's noise."""
    import comfy.sample

    from maskattn_shapes.model import IMAGE_SIZE

    contexts, pooled = encoded
    pictures = []
    for start in range(0, len(seeds), batch):
        n = min(batch, len(seeds) - start)
        size = {"width": IMAGE_SIZE, "height": IMAGE_SIZE}
        positive = [[contexts[start:start + n], {"pooled_output": pooled[start:start + n], **size}]]
        negative = [[contexts[-1:].expand(n, -1, -1), {"pooled_output": pooled[-1:].expand(n, -1), **size}]]
        noise = torch.cat([torch.randn((1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8), generator=torch.Generator().manual_seed(s))
                           for s in seeds[start:start + batch]])
        latent = torch.zeros_like(noise)
        samples = comfy.sample.sample(model, noise, steps, cfg, "dpmpp_2m", "karras", positive, negative, latent,
                                      disable_pbar=True, seed=0)
        pictures.append((vae.decode(samples).clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    return np.concatenate(pictures)


def variants(model, gate_files: list[Path], controls: list[Path], half_strength: bool):
    """(name, MODEL) pairs: the base, each gate file at strength 1, each control, with --half-strength the
    first gate file at strength 0.5."""
    from maskattn_comfy.patch import PatchOptions, apply_maskattn
    from maskattn_core.gate_file import load_gate_file
    from maskattn_shapes.control import ControlSet, apply_control

    yield "base", model
    for path in gate_files:
        yield f"gates {path.stem}", apply_maskattn(model, load_gate_file(path), PatchOptions(strength=1.0))
    for path in controls:
        yield f"control {path.stem}", apply_control(model, ControlSet.load(path))
    if gate_files and half_strength:
        yield f"gates {gate_files[0].stem}, strength 0.5", apply_maskattn(model, load_gate_file(gate_files[0]),
                                                                          PatchOptions(strength=0.5))


def check_variant_files(parser, gate_files: list[Path], controls: list[Path]) -> None:
    """Read every gate and control file once before any sampling: a bad one is one line, not a
    traceback after the base variant has sampled for minutes."""
    from safetensors import SafetensorError

    from maskattn_core.gate_file import load_gate_file
    from maskattn_shapes.control import ControlSet

    for flag, paths, load in (("--gates", gate_files, load_gate_file), ("--control", controls, ControlSet.load)):
        for path in paths:
            if not path.is_file():
                parser.error(f"{flag} {path}: no such file")
            try:
                load(path)
            except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as error:  # RuntimeError: load_state_dict
                parser.error(f"{flag} {path}: {error}")


def main(argv=None):
    from maskattn_shapes import model as shapes
    from maskattn_shapes.cli import non_negative, positive, writable_folder

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--per-kind", type=positive(int), default=160, help="prompts per kind (5 kinds)")
    p.add_argument("--steps", type=positive(int), default=8, help="sampler steps (dpmpp_2m, karras)")
    p.add_argument("--cfg", type=non_negative(float), default=5.0)
    p.add_argument("--batch", type=positive(int), default=100)
    p.add_argument("--seed", type=non_negative(int), default=0, help="prompt draw; prompt i is sampled with seed + i")
    p.add_argument("--gates", nargs="*", type=Path,
                   default=[shapes.GATES / f"shapes_gates{suffix}.safetensors"
                            for suffix in ("", "_high", "_high_mask", "_output", "_output_mask", "_soft")])
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--control", nargs="*", type=Path, default=[shapes.CONTROL],
                   help="control files (python -m maskattn_shapes.control): the base with the same extra training, no gates")
    p.add_argument("--half-strength", action="store_true", help="also the first gate file at strength 0.5")
    p.add_argument("--threads", type=non_negative(int), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("output/study"))
    args = p.parse_args(argv)
    writable_folder(p, args.out, "--out")
    check_variant_files(p, args.gates, args.control)

    from maskattn_comfy import host

    host.boot(cpu=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    from maskattn_shapes.world import heldout_prompts

    started = time.time()
    model, clip, vae = shapes.load_shapes_checkpoint()
    prompts = [q for kind in args.kinds for q in heldout_prompts(args.per_kind, args.seed, kind)]
    kinds = [kind for kind in args.kinds for _ in range(args.per_kind)]
    seeds = [args.seed + i for i in range(len(prompts))]
    args.out.mkdir(parents=True, exist_ok=True)
    encoded = encode_prompts(clip, prompts)
    print(f"[study] {len(prompts)} prompts encoded, {time.time() - started:.0f} s", flush=True)
    results = {}
    for name, variant in variants(model, args.gates, args.control, args.half_strength):
        tick = time.time()
        pictures = sample(variant, vae, encoded, seeds, args.steps, args.cfg, args.batch)
        scores = [read_and_score(q, img) for q, img in zip(prompts, pictures)]
        results[name] = scores
        np.save(args.out / f"{name.replace(' ', '_').replace(',', '')}.npy", pictures[:: max(1, len(pictures) // 40)])
        print(f"[study] {name}: {time.time() - tick:.0f} s, exact {np.mean([s['exact'] for s in scores]):.3f}", flush=True)

    table = summarise(results, kinds, args.kinds)
    (args.out / "study.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "minutes": round((time.time() - started) / 60, 1),
                                                     "table": table,
                                                     "prompts": [{"kind": k, "text": q.text, "seed": sd} for k, q, sd in zip(kinds, prompts, seeds)],
                                                     "exact": {name: [bool(x["exact"]) for x in sc] for name, sc in results.items()}},
                                                    indent=1))
    print(markdown(table))
    print(f"[study] {len(prompts)} prompts x {len(results)} variants in {(time.time() - started) / 60:.1f} min; "
          f"{args.out / 'study.json'}")


def summarise(results: dict, kinds: list[str], kind_names) -> list[dict]:
    rows = []
    base = results.get("base")
    for name, scores in results.items():
        for kind in ("all", *kind_names):
            picked = [i for i, k in enumerate(kinds) if kind in ("all", k)]
            row = {"variant": name, "kind": kind, "n": len(picked)}
            for metric in METRICS:
                values = [bool(scores[i][metric]) for i in picked if scores[i][metric] is not None]
                if not values:
                    continue
                low, high = wilson(sum(values), len(values))
                row[metric] = {"rate": sum(values) / len(values), "wilson": [low, high], "n": len(values)}
                if base is not None and name != "base":
                    paired = [i for i in picked if scores[i][metric] is not None and base[i][metric] is not None]
                    row[metric]["mcnemar_p"] = mcnemar_p([bool(scores[i][metric]) for i in paired],
                                                         [bool(base[i][metric]) for i in paired])
            for count in ("own_colour_errors", "other_colour_errors", "shape_errors", "missing"):
                row[count] = int(sum(scores[i][count] for i in picked))
            rows.append(row)
    return rows


def markdown(table: list[dict]) -> str:
    lines = ["| variant | prompts | n | exact [95% CI] | binding | spatial | present | own-colour / other-colour errors | p (exact vs base) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        def cell(metric):
            m = row.get(metric)
            return "–" if m is None else f"{m['rate']:.1%} [{m['wilson'][0]:.1%}, {m['wilson'][1]:.1%}]"
        p = row.get("exact", {}).get("mcnemar_p")
        lines.append(f"| {row['variant']} | {row['kind']} | {row['n']} | {cell('exact')} | {cell('binding')} | "
                     f"{cell('spatial')} | {cell('present')} | {row['own_colour_errors']} / {row['other_colour_errors']} | "
                     f"{'–' if p is None else f'{p:.2g}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
