"""What MaskAttn adds on top of IPAdapter: the composed path against IPAdapter alone, same model, seed and prompt.

    .venv/bin/python benchmarks/ipadapter_overhead.py                 # tiny model, about 1.5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/ipadapter_overhead.py --rounds 12 --size 512 --threads 2

IPAdapter is cubiq's ComfyUI_IPAdapter_plus from the host snapshot ($MASKATTN_HOSTS, else
../shared/hosts), unpacked into a temporary folder and loaded by ComfyUI's loader, applied
through its own IPAdapterEmbeds node with random weights (tests/ipadapter_kit.py). Each round
samples IPAdapter alone, then a composed model, then IPAdapter alone again, and the other
composed order, then alone again (A B A C A, the order of B and C alternating by round); each
composed run is divided by the mean of its two neighbours, which cancels a slow drift of the
machine's speed. Prints, per order, the median and min-max of those ratios for wall time and
process CPU time, then one line for both orders together. Not part of the test suite; the
numbers and the conditions they were measured under go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))
sys.path.append(str(REPO / "tests"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent side / 8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared CPU)")
    parser.add_argument("--context", action="store_true",
                        help="also MaskAttn alone against the unpatched model, in rounds of their own (doubles the time)")
    args = parser.parse_args(argv)

    from maskattn_comfy import host

    host.boot(cpu=True)
    import torch

    import comfy.sample
    from ipadapter_kit import SNAPSHOT, as_ipadapter_model, image_embeds, load_pack, tiny_ipadapter_weights
    from maskattn_comfy.patch import apply_maskattn
    from maskattn_comfy.model_check import require_sdxl
    from maskattn_comfy.tiny_model import build_sdxl_model, tiny_conditioning
    from maskattn_core import GateSet, MaskAttnConfig

    if not SNAPSHOT.is_file():
        print(f"IPAdapter_plus snapshot not found at {SNAPSHOT}; set MASKATTN_HOSTS", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        ipadapter_plus = load_pack(Path(folder) / "custom_nodes")
    model = build_sdxl_model(seed=0)
    gates = GateSet.create(MaskAttnConfig(), require_sdxl(model), seed=1)  # the paper's gate head (hidden 128)
    ipadapter = as_ipadapter_model(tiny_ipadapter_weights(model, seed=1))

    def with_ipadapter(m):
        node = ipadapter_plus.IPAdapterEmbeds()
        return node.apply_ipadapter(m, ipadapter, image_embeds(101), 1.0, "linear", 0.0, 1.0,
                                    neg_embed=image_embeds(201))[0]

    variants = {"IPAdapter alone": with_ipadapter(model),
                "IPAdapter -> MaskAttn": apply_maskattn(with_ipadapter(model), gates),
                "MaskAttn -> IPAdapter": with_ipadapter(apply_maskattn(model, gates)),
                "unpatched": model, "MaskAttn alone": apply_maskattn(model, gates)}
    side = args.size // 8
    positive, negative = tiny_conditioning(seed=1), tiny_conditioning(seed=2)
    noise = torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(0))

    def run(name, steps=args.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        out = comfy.sample.sample(variants[name], noise, steps, 5.0, "euler", "normal", positive, negative,
                                  torch.zeros_like(noise), seed=0, disable_pbar=True)
        return time.perf_counter() - wall, time.process_time() - cpu, out

    outputs = {name: run(name, 1)[2] for name in variants if args.context or name not in ("unpatched", "MaskAttn alone")}
    assert torch.equal(outputs["IPAdapter -> MaskAttn"], outputs["MaskAttn -> IPAdapter"]), "the two orders differ"
    assert not torch.equal(outputs["IPAdapter -> MaskAttn"], outputs["IPAdapter alone"]), "the gates did nothing"

    composed = ["IPAdapter -> MaskAttn", "MaskAttn -> IPAdapter"]
    ratios, alone_s = interleaved(run, "IPAdapter alone", composed, args.rounds)

    print(f"tiny SDXL-topology model, {args.size}x{args.size}, {args.steps} euler steps, cfg 5, "
          f"{args.threads} thread(s), {args.rounds} rounds; IPAdapter alone: {statistics.median(alone_s):.3f} s a run")
    for name in composed:
        print(f"  {name:24s} " + summary([w for w, _ in ratios[name]], "wall") + "   "
              + summary([c for _, c in ratios[name]], "cpu"))
    both = [ratio for name in composed for ratio in ratios[name]]
    print("composed / IPAdapter alone: " + summary([w for w, _ in both], "wall") + ", "
          + summary([c for _, c in both], "cpu") + f" ({len(both)} runs)")
    if args.context:
        context, _ = interleaved(run, "unpatched", ["MaskAttn alone"], args.rounds)
        print("context, MaskAttn alone / unpatched: " + summary([w for w, _ in context["MaskAttn alone"]], "wall")
              + ", " + summary([c for _, c in context["MaskAttn alone"]], "cpu"))
    return 0


def interleaved(run, baseline, names, rounds):
    """({name: [(wall ratio, cpu ratio)]}, baseline wall seconds): each run of `names` between two baseline runs."""
    ratios, baseline_s = {name: [] for name in names}, []
    for r in range(rounds):
        before = run(baseline)
        for name in (names if r % 2 == 0 else names[::-1]):
            timed = run(name)
            after = run(baseline)
            baseline_s.append(after[0])
            ratios[name].append(tuple(t / ((b + a) / 2) for t, b, a in zip(timed[:2], before[:2], after[:2])))
            before = after
    return ratios, baseline_s


def summary(values, label):
    return f"{label} {statistics.median(values):.4f}x ({min(values):.4f}-{max(values):.4f})"


if __name__ == "__main__":
    raise SystemExit(main())
