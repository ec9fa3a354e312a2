"""Soften a Shapes base's cross-attention: every attn2 key projection times FACTOR, so every cross-attention
logit is FACTOR times what it was (a softmax temperature of 1 / FACTOR); nothing else changes.

    python -m maskattn_shapes.temper IN.safetensors FACTOR OUT.safetensors

Base v2.5 is base v2.3 stage 2 at FACTOR 0.25 (`scripts/shapes_v2.sh temper`; EVIDENCE.md): its heads had put 0.97
of their weight on one token, a saturated softmax that a temperature of 4 brings to 0.83 with the shapes kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

KEY = "attn2.to_k.weight"


def temper(state: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """A copy of the UNet `state` with each cross-attention key projection scaled by `factor`."""
    return {name: value * factor if name.endswith(KEY) else value for name, value in state.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="a Shapes base file")
    p.add_argument("factor", type=float, help="the key projections' scale, in (0, 1] to soften")
    p.add_argument("out", type=Path, help="where the tempered base is written")
    args = p.parse_args(argv)
    if not 0 < args.factor <= 1:
        p.error(f"factor must lie in (0, 1], got {args.factor}")
    from maskattn_comfy import host

    host.boot(cpu=True)
    from maskattn_shapes import model as shapes

    try:
        state, meta = shapes.read_base(args.source)
    except shapes.ShapesWeightsError as error:
        p.error(str(error))
    tempered = temper(state, args.factor)
    provenance = {**json.loads(meta.get("provenance", "{}")), "tempered": {"from": args.source.parent.name or args.source.name,
                                                                          "attn2_key_scale": args.factor}}
    shapes.save_base(args.out, tempered, provenance, encoder=shapes.text_encoder_of(meta))
    layers = sum(name.endswith(KEY) for name in state)
    print(f"[temper] {layers} cross-attention key projections x {args.factor} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
