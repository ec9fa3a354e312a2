"""Does the Shapes base read its caption through the words' tokens? One command, three measurements.

    python -m maskattn_shapes.diagnose                          # the committed base
    python -m maskattn_shapes.diagnose --weights old.safetensors --per-kind 40 --json out.json

1. **Routing.** Per attn2 layer, over every sampling step, the conditional rows' cross-attention
   split by token role: the start token, the prompted objects' words (their colour and shape
   tokens), the caption's other words, the end token, the padding; and the heads' mean maximum
   weight (1.0: each location puts all its weight on one token: a saturated softmax).
2. **The token/pooled swap.** Single-object prompts sampled with their own tokens and the empty
   prompt's pooled vector, and with the empty prompt's tokens and their own pooled vector: which
   of the two carries the colour?
3. **The region oracle.** Relation and pair prompts, each object's colour and shape tokens given
   -10000 on the attention logits outside the half of the picture the prompt gives that object
   (left/right/above/below; "and": the first named object left), on every cross-attention layer,
   through MaskAttn Region's own code (`maskattn_comfy.regions.apply_regions`, the node's path):
   the share of objects whose colour is drawn in its own half, and the study's scores, with and
   without. A base whose objects follow their words moves; one that reads the caption from the
   pooled vector or from padding cannot.

What it cannot see: whether SDXL itself routes this way (nothing here has SDXL weights), and
anything the evaluator cannot read (EVIDENCE.md).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROLES = ("start", "object words", "other words", "end", "padding")
START, OBJECT, OTHER, END, PADDING = range(len(ROLES))
BOS, EOS = 49406, 49407  # CLIP's start and end tokens; ComfyUI's SDXL clip_l pads with the end token


@dataclass(frozen=True)
class TokenLayout:
    """Where a prompt's words sit in its 77-token context: a role per position, and per object
    (caption-spec order) the positions of its colour and shape tokens."""

    roles: tuple[int, ...]
    objects: tuple[tuple[int, ...], ...]


def token_layout(clip, prompt) -> TokenLayout:
    """Found with MaskAttn Region's own word lookup (a word may be several tokens: "cyan" is two)."""
    from maskattn_comfy.regions import word_positions

    ids = [token for token, _ in clip.tokenize(prompt.text)["l"][0]]
    objects = tuple(tuple(word_positions(clip, prompt.text, f"{color}, {shape}")[0]) for color, shape in prompt.objects)
    end = ids.index(EOS)
    object_positions = {p for positions in objects for p in positions}
    roles = [START if i == 0 else OBJECT if i in object_positions else OTHER if i < end else END if i == end
             else PADDING for i in range(len(ids))]
    return TokenLayout(tuple(roles), objects)


# ---- 1. routing --------------------------------------------------------------------------

class AttentionProbe:
    """An attn2 replace on every layer: plain softmax attention (no mask), recording for the
    conditional rows the weight each role receives and each head's maximum weight."""

    def __init__(self, roles: torch.Tensor):
        self.roles = roles  # [P, T] role ids of the prompts being sampled now, in batch order
        self.share: dict[tuple, torch.Tensor] = {}  # layer -> summed [len(ROLES)] weight
        self.peak: dict[tuple, float] = {}
        self.rows: dict[tuple, int] = {}
        self.resolution: dict[tuple, int] = {}

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        batch, locations, width = q.shape
        qh, kh, vh = (t.reshape(t.shape[0], -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(qh.float() @ kh.float().transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        chunks = extra_options["cond_or_uncond"]
        per_chunk = batch // len(chunks)
        key = (*extra_options["block"], extra_options["block_index"])
        for c, kind in enumerate(chunks):
            if kind != 0:
                continue
            w = weights[c * per_chunk:(c + 1) * per_chunk]  # [P, H, N, T]
            roles = self.roles[:, :w.shape[-1]]
            by_token = w.mean(dim=(1, 2))  # [P, T]
            share = torch.zeros(len(ROLES), dtype=torch.float64)
            share.index_add_(0, roles.flatten(), by_token.flatten().double())
            self.share[key] = self.share.get(key, 0) + share
            self.peak[key] = self.peak.get(key, 0.0) + float(w.amax(-1).mean()) * w.shape[0]
            self.rows[key] = self.rows.get(key, 0) + w.shape[0]
            self.resolution[key] = locations
        return (weights.to(vh.dtype) @ vh).transpose(1, 2).reshape(batch, locations, width)

    def table(self) -> list[dict]:
        rows = []
        for key in sorted(self.share, key=_layer_order):
            share = self.share[key] / self.rows[key]
            rows.append({"layer": f"{key[0]}.{key[1]}.{key[2]}", "locations": self.resolution[key],
                         **{role: float(share[i]) for i, role in enumerate(ROLES)},
                         "max_weight": self.peak[key] / self.rows[key]})
        return rows


def finest_layers(rows: list[dict]) -> dict:
    """Over the finest attn2 layers (8x8 in the Shapes UNet): the mean share of attention on the
    prompted objects' words, and the heads' mean maximum weight."""
    fine = [r for r in rows if r["locations"] == max(x["locations"] for x in rows)]
    return {"layers": len(fine), "object_words": float(np.mean([r["object words"] for r in fine])),
            "max_weight": float(np.mean([r["max_weight"] for r in fine]))}


def _layer_order(key):
    return ({"input": 0, "middle": 1, "output": 2}[key[0]], key[1], key[2])


def with_replace(model, replace):
    patched = model.clone()
    for block, number, index in _attn2_layers(model):
        patched.set_model_attn2_replace(replace, block, number, index)
    return patched


def _attn2_layers(model):
    from maskattn_comfy.model_check import attn2_layers

    return [tuple(key) for key in attn2_layers(model.model.diffusion_model)]


def routing(model, vae, clip, prompts, layouts, steps, cfg, batch) -> list[dict]:
    from maskattn_shapes.study import encode_prompts, sample

    roles = torch.tensor([layout.roles for layout in layouts])
    probe = AttentionProbe(roles)
    patched = with_replace(model, probe)
    encoded = encode_prompts(clip, prompts)
    for start in range(0, len(prompts), batch):
        n = min(batch, len(prompts) - start)
        probe.roles = roles[start:start + n]
        sample(patched, vae, _rows(encoded, start, n), list(range(start, start + n)), steps, cfg, n)
    return probe.table()


def _rows(encoded, start, n):
    """The prompts start..start+n of an encode_prompts result, with its empty prompt kept last."""
    contexts, pooled = encoded
    return (torch.cat([contexts[start:start + n], contexts[-1:]]), torch.cat([pooled[start:start + n], pooled[-1:]]))


# ---- 2. the token/pooled swap ------------------------------------------------------------

def swap(model, vae, clip, prompts, steps, cfg, batch, kinds=None) -> dict:
    """Single-object colour, shape and exact for each case; per kind of prompt too when `kinds` names
    each prompt's (single_seen: a combination seen in training; single: a held-out one)."""
    from maskattn_shapes.study import encode_prompts, read_and_score, sample

    contexts, pooled = encode_prompts(clip, prompts)
    n = len(prompts)
    empty_context, empty_pooled = contexts[-1:].expand(n, -1, -1), pooled[-1:].expand(n, -1)
    cases = {"own tokens, own pooled": (contexts[:n], pooled[:n]),
             "own tokens, empty pooled": (contexts[:n], empty_pooled),
             "empty tokens, own pooled": (empty_context, pooled[:n])}
    result = {}
    for name, (c, p) in cases.items():
        encoded = (torch.cat([c, contexts[-1:]]), torch.cat([p, pooled[-1:]]))
        pictures = sample(model, vae, encoded, list(range(n)), steps, cfg, batch)
        scores = [read_and_score(q, img) for q, img in zip(prompts, pictures)]
        groups = {"all": scores}
        for kind in dict.fromkeys(kinds or ()):
            groups[kind] = [s for s, k in zip(scores, kinds) if k == kind]
        result[name] = {group: {metric: float(np.mean([s[metric] for s in rows])) for metric in ("colour", "shape", "exact")}
                        | {"n": len(rows)} for group, rows in groups.items()}
    return result


# ---- 3. the region oracle ----------------------------------------------------------------

def halves(prompt) -> tuple[str, ...]:
    """The half of the picture each object (caption-spec order) is given: the relation's, and
    for "and" the first named object on the left."""
    first = {"left of": "left", "right of": "right", "above": "top", "below": "bottom", "and": "left"}[prompt.relation]
    return first, {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[first]


def half_mask(half: str, height: int, width: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return {"left": xs < width / 2, "right": xs > width / 2, "top": ys < height / 2, "bottom": ys > height / 2}[half]


def oracle_regions(layout: TokenLayout, prompt, size: int) -> list:
    """The oracle as MaskAttn Region regions: each object's colour and shape tokens confined, at
    strength 1, to the half of the `size` x `size` picture the prompt gives it."""
    from maskattn_comfy.regions import Region

    return [Region(positions, half_mask(half, size, size).float(), 1.0)
            for positions, half in zip(layout.objects, halves(prompt))]


def _oracle_groups(layouts, prompts) -> list[list[int]]:
    """Prompt indices grouped by (token positions, halves): one Region set, so one sampling batch, per group."""
    groups: dict[tuple, list[int]] = {}
    for i, (layout, prompt) in enumerate(zip(layouts, prompts)):
        groups.setdefault((layout.objects, halves(prompt)), []).append(i)
    return list(groups.values())


def in_own_half(prompt, found, size: int) -> list[bool]:
    """Per object: is its colour drawn (its largest object of that colour, any shape) with its
    centre inside the half the prompt gives it?"""
    result = []
    for (color, _), half in zip(prompt.objects, halves(prompt)):
        mine = [f for f in found if f.color == color]
        if not mine:
            result.append(False)
            continue
        f = max(mine, key=lambda f: f.area)
        result.append(bool({"left": f.cx < size / 2, "right": f.cx > size / 2,
                            "top": f.cy < size / 2, "bottom": f.cy > size / 2}[half]))
    return result


def oracle(model, vae, clip, prompts, layouts, kinds, steps, cfg, batch, gated: dict | None = None) -> dict:
    """The region oracle's scores: variants "base" and "oracle" (the base with the regions), and for
    each `gated` name -> MODEL, that model alone and with the regions; p against the base (McNemar)."""
    from maskattn_comfy.regions import apply_regions
    from maskattn_shapes.evaluate import read_image, score
    from maskattn_shapes.model import IMAGE_SIZE
    from maskattn_shapes.study import encode_prompts, mcnemar_p, sample, wilson

    contexts, pooled = encode_prompts(clip, prompts)
    variants = [("base", model, False), ("oracle", model, True)]
    for name, patched in (gated or {}).items():
        variants += [(name, patched, False), (f"{name} + oracle", patched, True)]
    outcome = {}
    for variant, variant_model, confined in variants:
        rows = [None] * len(prompts)
        for group in _oracle_groups(layouts, prompts):
            for start in range(0, len(group), batch):
                chunk = group[start:start + batch]
                index = torch.tensor(chunk)
                encoded = (torch.cat([contexts[index], contexts[-1:]]), torch.cat([pooled[index], pooled[-1:]]))
                patched = apply_regions(variant_model, oracle_regions(layouts[chunk[0]], prompts[chunk[0]], IMAGE_SIZE)) \
                    if confined else variant_model
                pictures = sample(patched, vae, encoded, chunk, steps, cfg, len(chunk))
                for i, picture in zip(chunk, pictures):
                    found = read_image(picture)
                    rows[i] = {**score(prompts[i], found), "in_half": in_own_half(prompts[i], found, IMAGE_SIZE)}
        outcome[variant] = rows
    summary = {}
    for kind in sorted(set(kinds)) + ["all"]:
        pick = [i for i, k in enumerate(kinds) if kind in ("all", k)]
        for variant, rows in outcome.items():
            mine = [rows[i] for i in pick]
            halves_hit = [h for r in mine for h in r["in_half"]]
            exact = [bool(r["exact"]) for r in mine]
            row = {"n": len(mine), "in_half": float(np.mean(halves_hit)), "in_half_ci": wilson(sum(halves_hit), len(halves_hit)),
                   "exact": float(np.mean(exact)), "exact_ci": wilson(sum(exact), len(exact)),
                   "binding": float(np.mean([bool(r["binding"]) for r in mine])),
                   "own_colour_errors": int(sum(r["own_colour_errors"] for r in mine)),
                   "shape_errors": int(sum(r["shape_errors"] for r in mine)),
                   "extra": int(sum(r["extra"] for r in mine)),
                   "errors": int(sum(r["own_colour_errors"] + r["other_colour_errors"] + r["shape_errors"] + r["missing"]
                                     for r in mine))}
            if variant != "base":
                base = outcome["base"]
                row["p_exact"] = mcnemar_p([bool(base[i]["exact"]) for i in pick], exact)
                row["p_in_half"] = mcnemar_p([h for i in pick for h in base[i]["in_half"]], halves_hit)
            summary[f"{variant} {kind}"] = row
    return summary


# ---- the command -------------------------------------------------------------------------

def diagnose(weights: Path, per_kind: int, steps: int, cfg: float, batch: int, seed: int,
             gate_files: tuple[Path, ...] = (), parts: tuple[str, ...] = ("routing", "swap", "oracle")) -> dict:
    from maskattn_shapes import model as shapes
    from maskattn_shapes.world import heldout_prompts

    model, clip, vae = shapes.load_shapes_checkpoint(weights)
    report = {"weights": str(weights), "text_encoder": shapes.text_encoder_of(shapes.read_base(weights)[1]),
              "per_kind": per_kind, "steps": steps, "cfg": cfg}
    two = [q for kind in ("relation", "pair") for q in heldout_prompts(per_kind, seed, kind)]
    two_kinds = [kind for kind in ("relation", "pair") for _ in range(per_kind)]
    layouts = [token_layout(clip, q) for q in two]
    tick = time.time()
    if "routing" in parts:
        report["routing"] = routing(model, vae, clip, two, layouts, steps, cfg, batch)
    if "swap" in parts:
        single_kinds = [kind for kind in ("single_seen", "single") for _ in range(per_kind // 2 or 1)]
        singles = [q for kind in ("single_seen", "single") for q in heldout_prompts(per_kind // 2 or 1, seed, kind)]
        report["swap"] = swap(model, vae, clip, singles, steps, cfg, batch, single_kinds)
    if "oracle" in parts:
        from maskattn_comfy.patch import PatchOptions, apply_maskattn
        from maskattn_core.gate_file import load_gate_file

        gated = {f"gates {path.stem}": apply_maskattn(model, load_gate_file(path), PatchOptions(strength=1.0))
                 for path in gate_files}
        report["oracle"] = oracle(model, vae, clip, two, layouts, two_kinds, steps, cfg, batch, gated)
    report["seconds"] = round(time.time() - tick, 1)
    return report


def summary_lines(report: dict) -> list[str]:
    lines = []
    if "routing" in report:
        lines += routing_lines(report)
    if "swap" in report:
        lines += swap_lines(report)
    if "oracle" in report:
        lines += oracle_lines(report)
    return lines


def routing_lines(report: dict) -> list[str]:
    lines = ["| layer | locations | " + " | ".join(ROLES) + " | max weight |",
             "|---|---|" + "---|" * (len(ROLES) + 1)]
    for row in report["routing"]:
        lines.append(f"| {row['layer']} | {row['locations']} | "
                     + " | ".join(f"{100 * row[r]:.1f} %" for r in ROLES) + f" | {row['max_weight']:.2f} |")
    fine = finest_layers(report["routing"])
    lines.append(f"\nobject words on the finest layers ({fine['layers']}): {100 * fine['object_words']:.1f} %; "
                 f"mean max weight there {fine['max_weight']:.2f}, "
                 f"over all layers {np.mean([r['max_weight'] for r in report['routing']]):.2f}")
    return lines


def swap_lines(report: dict) -> list[str]:
    lines = []
    lines.append("\n| single objects | prompts | colour | shape | exact | n |\n|---|---|---|---|---|---|")
    names = {"all": "all", "single_seen": "seen combinations", "single": "held-out combinations"}
    for name, groups in report["swap"].items():
        for group, row in groups.items():
            lines.append(f"| {name} | {names.get(group, group)} | {100 * row['colour']:.1f} % | "
                         f"{100 * row['shape']:.1f} % | {100 * row['exact']:.1f} % | {row['n']} |")
    return lines


def oracle_lines(report: dict) -> list[str]:
    lines = []
    lines.append("\n| region oracle | n | objects in own half [95% CI] | exact [95% CI] | binding | own-colour / all errors | "
                 "shape errors | extra objects | p exact | p half |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in report["oracle"].items():
        ci, eci = row["in_half_ci"], row["exact_ci"]
        lines.append(f"| {name} | {row['n']} | {100 * row['in_half']:.1f} % [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] | "
                     f"{100 * row['exact']:.1f} % [{100 * eci[0]:.1f}, {100 * eci[1]:.1f}] | {100 * row['binding']:.1f} % | "
                     f"{row['own_colour_errors']} / {row['errors']} | {row['shape_errors']} | {row['extra']} | "
                     f"{row.get('p_exact', float('nan')):.2g} | "
                     f"{row.get('p_in_half', float('nan')):.2g} |")
    return lines


def main(argv=None):
    from maskattn_shapes.model import WEIGHTS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", type=Path, default=WEIGHTS, help="a Shapes base file")
    p.add_argument("--per-kind", type=int, default=40, help="relation and pair prompts each (and as many single objects)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the whole report here")
    p.add_argument("--gates", nargs="*", type=Path, default=[],
                   help="gate files: the oracle also runs each alone and with the regions (the region study)")
    p.add_argument("--parts", nargs="+", choices=("routing", "swap", "oracle"), default=["routing", "swap", "oracle"])
    args = p.parse_args(argv)
    for name in ("per_kind", "steps", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for path in [args.weights, *args.gates]:
        if not path.is_file():
            p.error(f"{path}: no such file")
    if not math.isfinite(args.cfg) or args.threads < 0:
        p.error("--cfg must be finite and --threads >= 0")

    from maskattn_comfy import host

    host.boot(cpu=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = diagnose(args.weights, args.per_kind, args.steps, args.cfg, args.batch, args.seed, tuple(args.gates),
                      tuple(args.parts))
    print("\n".join(summary_lines(report)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(f"[diagnose] {report['seconds']} s")


if __name__ == "__main__":
    main()
