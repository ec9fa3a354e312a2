"""MaskAttn Region's sampling overhead against plain ComfyUI: same model, seed and prompt, one process.

    .venv/bin/python benchmarks/regions_overhead.py --smoke             # seconds: the tiny model, checks it runs
    .venv/bin/python benchmarks/regions_overhead.py --size 512 --steps 1 --rounds 8 --threads 1 \
        --checkpoint sdxl_random.safetensors                            # SDXL width, 512 px, the CPU

(`sdxl_random.safetensors` from ../shared/tools/make_random_sdxl.py; without --checkpoint the tiny model.)
Variants: one region on 3 tokens, four regions on 3 tokens each (masks of the image's left half, right
half, top and bottom), random MaskAttn Loader gates alone (the default stages), and the Loader with one
region. Rounds as benchmarks/sampling.py's (U A U B U ..., the variants' order rotating); each patched run's
time is divided by the mean of its two unpatched neighbours. Prints the median and min-max of those ratios
for wall and process CPU time. Not part of the test suite; numbers and conditions go in BENCHMARKS.md,
measured on a quiet machine only.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))


def load_sampling():
    spec = importlib.util.spec_from_file_location("maskattn_bench_sampling", REPO / "benchmarks" / "sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variants(model, size: int):
    import torch

    from maskattn_comfy.model_check import require_sdxl
    from maskattn_comfy.patch import apply_maskattn
    from maskattn_comfy.regions import Region, apply_regions
    from maskattn_core import GateSet, MaskAttnConfig

    side = size
    halves = [torch.zeros(side, side) for _ in range(4)]
    halves[0][:, : side // 2] = 1
    halves[1][:, side // 2:] = 1
    halves[2][: side // 2] = 1
    halves[3][side // 2:] = 1
    one = [Region((1, 2, 3), halves[0])]
    four = [Region((1 + 3 * i, 2 + 3 * i, 3 + 3 * i), mask) for i, mask in enumerate(halves)]
    gates = GateSet.create(MaskAttnConfig(), require_sdxl(model), seed=0)
    return {"1 region": apply_regions(model, one), "4 regions": apply_regions(model, four),
            "loader": apply_maskattn(model, gates), "loader + 1 region": apply_regions(apply_maskattn(model, gates), one)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an SDXL .safetensors; without it the tiny model")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent side / 8)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared CPU)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 64 px, 1 step, 1 round: checks it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.checkpoint, args.size, args.steps, args.rounds = None, 64, 1, 1

    from maskattn_comfy import host

    host.boot(cpu=True)
    import torch

    import comfy.sample
    import comfy.sd
    from maskattn_comfy.tiny_model import build_sdxl_model, tiny_conditioning

    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=False, output_clip=False)[0]
    else:
        model = build_sdxl_model(seed=0)
    models = {"unpatched": model, **variants(model, args.size)}
    shape = (1, 4, args.size // 8, args.size // 8)
    positive = tiny_conditioning(seed=1, width=args.size, height=args.size)
    negative = tiny_conditioning(seed=2, width=args.size, height=args.size)

    def run(name, steps=args.steps):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        wall, cpu = time.perf_counter(), time.process_time()
        out = comfy.sample.sample(models[name], noise, steps, 5.0, "euler", "normal", positive, negative,
                                  torch.zeros(shape), seed=0, disable_pbar=True)
        assert torch.isfinite(out).all(), name
        return {"variant": name, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}

    for name in models:  # warm-up: one step each
        run(name, steps=1)
    sampling = load_sampling()
    patched = [name for name in models if name != "unpatched"]
    runs = [run(name) for name in sampling.schedule(patched, args.rounds)]
    print(f"{'checkpoint ' + args.checkpoint.name if args.checkpoint else 'tiny model'}, {args.size} px, "
          f"{args.steps} step(s), {args.rounds} round(s), {args.threads} thread(s), cfg 5 (cond + uncond per call)")
    print(f"{'variant':<20} {'wall / unpatched':>28} {'cpu / unpatched':>28}")
    for name in patched:
        cells = []
        for field in ("wall_s", "cpu_s"):
            ratios = [r[field] / b[field] for r, b in sampling.bracketed(runs, name, (field,))]
            cells.append(f"{statistics.median(ratios):.4f} ({min(ratios):.4f}-{max(ratios):.4f})")
        print(f"{name:<20} {cells[0]:>28} {cells[1]:>28}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
