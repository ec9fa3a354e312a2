"""Visualize Mask's cost against the same number of plain UNet forward passes, same model and latent.

    .venv/bin/python benchmarks/visualize_speed.py                    # SDXL's widths, shallower, tiny CLIP
    .venv/bin/python benchmarks/visualize_speed.py --checkpoint /work/bench/sdxl_random.safetensors

"Plain" is the unpatched MODEL called once per noise level through the same ComfyUI
sampling path the node uses (CFGGuider, cfg 1, batch 1). "Node" is the whole node
(prompt encoding, the gated model calls with recording, rendering the grid and the mask).
Rounds interleave [plain, node with each map]; each node time is divided by the mean of
the two plain runs around it, and the median ratio is printed with its spread.

Memory on the CPU: the process's resident high-water mark, reset before each run, with
glibc serving large allocations by mmap so that freed tensors leave the resident set (the
method and probe of benchmarks/sampling.py). Extra peak = node peak - plain peak, as a
share of the plain run's peak (whole process, weights included).

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from sampling import MMAP_THRESHOLD, CudaPeak, ResidentPeak, machine  # noqa: E402

# SDXL's channel widths (320/640/1280, 64 channels per head: 10 and 20 heads, 2048-wide context)
# with one transformer per block at the high stage and two at mid and low, so a CPU run takes seconds.
SDXL_WIDTH_UNET = {
    "model_channels": 320, "in_channels": 4, "out_channels": 4, "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 1, 1, 2, 2], "transformer_depth_middle": 2,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "context_dim": 2048, "adm_in_channels": 2816,
    "use_linear_in_transformer": True, "num_head_channels": 64, "use_spatial_transformer": True,
    "num_classes": "sequential", "legacy": False, "use_temporal_attention": False, "use_temporal_resblock": False,
    "image_size": 32,
}
MAPS = ("gate probability", "attention difference")
PROMPT = "a red cube on top of a blue sphere, a green cat beside a yellow dog"


def run(args) -> None:
    from maskattn_comfy import host

    host.boot(cpu=not args.cuda)
    import comfy.sd
    from maskattn_comfy.tiny_model import build_sdxl_clip, build_sdxl_model

    if args.checkpoint:
        model, clip = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=False,
                                                            output_clipvision=False)[:2]
        what = f"SDXL checkpoint {args.checkpoint.name}"
    else:
        model, clip = build_sdxl_model(SDXL_WIDTH_UNET), build_sdxl_clip()
        what = "SDXL widths (320/640/1280), depths 1/2/2, tiny CLIP"
    result = measure(model, clip, args.size, args.size * 3 // 4, args.levels, args.rounds)  # 3:4, not square

    print(f"machine: {machine()}\nmodel: {what}, {result['dtype']}, {result['device']}; "
          f"latent {tuple(result['latent_shape'])}; {args.levels} noise levels; {result['gated_layers']} gated layers")
    print(f"plain: {result['plain_s']:.2f} s for {args.levels} forward passes, peak {result['plain_peak'] / 2**20:.0f} MiB")
    for choice, m in result["maps"].items():
        ratios, cpu_ratios, extra = m["ratios"], m["cpu_ratios"], m["extra_peak_shares"]
        print(f"node ({choice}): {statistics.median(ratios):.3f}x the plain passes' wall time "
              f"({min(ratios):.3f}-{max(ratios):.3f}), {statistics.median(cpu_ratios):.3f}x their CPU time "
              f"({min(cpu_ratios):.3f}-{max(cpu_ratios):.3f}); extra peak memory {100 * statistics.median(extra):+.2f}% "
              f"({100 * min(extra):+.2f}% to {100 * max(extra):+.2f}%)")


def measure(model, clip, height: int, width: int, levels: int, rounds: int, maps=MAPS) -> dict:
    """The Visualize Mask node on `model` (a ComfyUI MODEL, unpatched) with the authors' default gates,
    against the same number of plain forward passes, in interleaved rounds; ratios per map choice."""
    import torch

    import comfy.model_management as mm
    from maskattn_comfy.model_check import require_sdxl
    from maskattn_comfy.patch import apply_maskattn
    from maskattn_comfy.visualize import noise_sigmas, run_noise_levels
    from maskattn_core import GateSet, MaskAttnConfig
    MaskAttnVisualize = _node_class()

    gates = GateSet.create(MaskAttnConfig(), require_sdxl(model), seed=0)  # the authors' defaults: mid stage, 50 layers on SDXL
    patched = apply_maskattn(model, gates)
    latent = {"samples": torch.zeros(1, 4, height // 8, width // 8)}
    device = mm.get_torch_device()
    probe = CudaPeak(torch, device) if device.type == "cuda" else ResidentPeak()
    sigmas = noise_sigmas(model.get_model_object("model_sampling"), levels, 0.2, 0.8)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))

    def plain():
        run_noise_levels(model, positive, latent, 0, 0, sigmas)

    def node(choice):
        MaskAttnVisualize.execute(patched, clip, PROMPT, latent, seed=0, noise_levels=levels, start_percent=0.2,
                                  end_percent=0.8, map=choice, grouping="block", words="cat", batch_index=0,
                                  show_special_tokens=False)

    def timed(fn, *a):
        probe.start()
        t0, c0 = time.perf_counter(), time.process_time()
        fn(*a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        return seconds, probe.stop()[0], cpu_seconds

    import folder_paths
    import tempfile
    folder_paths.set_temp_directory(tempfile.mkdtemp(prefix="maskattn-bench-"))  # the node's preview PNGs
    timed(plain)
    for choice in maps:
        timed(node, choice)
    plains, nodes_ = [timed(plain)], {choice: [] for choice in maps}
    for r in range(rounds):
        for choice in maps:
            nodes_[choice].append(timed(node, choice))
        plains.append(timed(plain))
        print(f"  round {r}: plain {plains[-1][0]:.2f} s, " + ", ".join(
            f"{c} {nodes_[c][-1][0]:.2f} s" for c in maps), file=sys.stderr, flush=True)

    result = {"device": str(device), "dtype": str(model.model.get_dtype()), "latent_shape": list(latent["samples"].shape),
              "levels": levels, "rounds": rounds, "gated_layers": len(gates.layers),
              "plain_s": statistics.median(s for s, _, _ in plains),
              "plain_peak": statistics.median(p for _, p, _ in plains), "maps": {}}
    for choice in maps:
        ratios, cpu_ratios, extra = [], [], []
        for r, (seconds, peak, cpu_seconds) in enumerate(nodes_[choice]):
            around = [plains[r], plains[r + 1]]
            ratios.append(seconds / statistics.mean(p[0] for p in around))
            cpu_ratios.append(cpu_seconds / statistics.mean(p[2] for p in around))
            base_peak = statistics.mean(p[1] for p in around)
            extra.append((peak - base_peak) / base_peak)
        result["maps"][choice] = {"ratios": ratios, "cpu_ratios": cpu_ratios, "extra_peak_shares": extra}
    return result


def _node_class():
    """The node class from nodes/visualize.py (`import nodes` would find ComfyUI's nodes.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("maskattn_visualize_node", REPO / "nodes" / "visualize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MaskAttnVisualize


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an SDXL .safetensors (e.g. from make_random_sdxl.py)")
    parser.add_argument("--size", type=int, default=512, help="image height in pixels (width is 3/4 of it)")
    parser.add_argument("--levels", type=int, default=4, help="noise levels (model calls) per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cuda", action="store_true", help="run on the GPU")
    args = parser.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(MMAP_THRESHOLD):  # must be set before the process starts
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
        sys.exit(subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env).returncode)
    run(args)


if __name__ == "__main__":
    main()
