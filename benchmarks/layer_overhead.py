"""What one gated SDXL layer costs: ComfyUI's own transformer block, unpatched and patched.

    .venv/bin/python benchmarks/layer_overhead.py                 # SDXL's 1280-wide mid layer at 512x512, seconds
    .venv/bin/python benchmarks/layer_overhead.py --size 1024 --device cuda --dtype float16

A whole SDXL model call takes tens of seconds on a CPU, and a shared machine's speed drifts by
several percent over that time; one transformer block takes a fraction of a second, so
hundreds of unpatched/patched pairs fit in the time the sampling benchmark needs for a few,
and each pair sees the same machine. The block is `comfy.ldm.modules.attention.
BasicTransformerBlock` at the width of the layers the authors' default gates cover (1280
channels, 20 heads of 64, 2048-wide context, the latent at 1/4 of its side: N = (size/32)^2
locations), batch 2 (cond and uncond), 77 tokens, random weights; the patched call goes
through the same attn2 patch and replace as a sampled model (`MaskAttnPatch`).

Prints the median ratio of patched to unpatched block time over pairs (each patched call
compared with the mean of the unpatched calls before and after it), its quartiles, and the
extra milliseconds per gated layer, which times the 50 gated layers and the model calls gives
the expected cost of a sample. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--pairs", type=int, default=60, help="unpatched/patched pairs (default 60)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)

    sys.path.append(str(REPO))  # appended, never prepended: the pack's nodes/ must not shadow ComfyUI's nodes.py
    from maskattn_comfy import host

    host.boot(cpu=args.device == "cpu")
    import torch

    import comfy.ops
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from maskattn_comfy.patch import MaskAttnPatch, PatchOptions
    from maskattn_core import GateSet, LayerKey, MaskAttnConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)

    block = BasicTransformerBlock(1280, 20, 64, context_dim=2048, operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    block = block.to(device, dtype).requires_grad_(False)

    gates = GateSet.create(MaskAttnConfig(), {LayerKey("input", 7, i): 1280 for i in range(10)}, seed=0)
    gates.heads.to(device)
    key = gates.layers[0]
    patch = MaskAttnPatch(gates, PatchOptions(), None)
    locations = (args.size // 32) ** 2
    x = torch.randn(2, locations, 1280, generator=generator).to(device, dtype)
    context = torch.randn(2, 77, 2048, generator=generator).to(device, dtype)
    plain = {"block": (key[0], key[1]), "block_index": key[2]}
    gated = dict(plain, patches={"attn2_patch": [patch]}, patches_replace={"attn2": {tuple(key): patch.attention}})

    def call(options) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        block(x, context, transformer_options=options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    with torch.inference_mode():
        for _ in range(3):
            call(plain), call(gated)
        before, ratios, plain_s, gated_s = call(plain), [], [], []
        for _ in range(args.pairs):
            patched, after = call(gated), call(plain)
            ratios.append(patched / ((before + after) / 2))
            plain_s.append(before)
            gated_s.append(patched)
            before = after

    quartiles = statistics.quantiles(ratios, n=4)
    plain_ms, gated_ms = 1e3 * statistics.median(plain_s), 1e3 * statistics.median(gated_s)
    print(f"SDXL mid layer (1280 channels, N={locations}, batch 2, 77 tokens), {device.type} {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.pairs} pairs")
    print(f"block: unpatched {plain_ms:.2f} ms, patched {gated_ms:.2f} ms (medians)")
    print(f"patched/unpatched: median {statistics.median(ratios):.4f}, quartiles {quartiles[0]:.4f}-{quartiles[2]:.4f}")
    print(f"extra per gated layer: {plain_ms * (statistics.median(ratios) - 1):+.2f} ms")


if __name__ == "__main__":
    main()
