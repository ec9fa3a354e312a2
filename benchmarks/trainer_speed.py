"""How fast the trainer steps, and where a step's time goes (not a test).

    .venv/bin/python benchmarks/trainer_speed.py [--steps 10] [--resolution 64] [--batch-size 2]

Prints steps/s with the latent/text cache (the trainer's normal path) and without it (every
sample's image decoded, VAE-encoded and its caption text-encoded inside the step), the share
of step time spent loading data, and the share spent in the gates: the gate hooks' own
forward time, measured directly, and the extra forward+backward time of the gated UNet over
the same UNet without gates. It uses the demo's tiny model and stand-in encoders, so the
"without cache" penalty here is a lower bound: SDXL's real VAE and CLIP cost far more.
It also times the gated forward+backward with `--straight-through output` (one more attention per
gated layer) and with `--mask-loss` (the region supervision of two words per sample) against the
paper's estimator alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from statistics import median
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def comfy_encoders():
    """A real ComfyUI VAE and SDXL CLIP at tiny widths when tiny_model offers them, else the demo's stand-ins."""
    from maskattn_comfy import tiny_model
    from trainer.base_model import ComfyEncoders
    from trainer.demo import DemoEncoders

    if hasattr(tiny_model, "build_tiny_vae") and hasattr(tiny_model, "build_sdxl_clip"):
        return ComfyEncoders(tiny_model.build_tiny_vae(), tiny_model.build_sdxl_clip()), "tiny ComfyUI VAE + SDXL CLIP"
    return DemoEncoders(), "the demo's stand-in encoders"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--comfyui")
    args = parser.parse_args()

    from maskattn_comfy import host
    host.boot(args.comfyui, cpu=True)
    import torch

    from maskattn_comfy.patch import MaskAttnPatch, PatchOptions, apply_maskattn
    from maskattn_core import GateSet
    from trainer.cache import FeatureCache, load_batch, prepare
    from trainer.config import DEMO_DEFAULTS, build_config
    from trainer.data import load_image, read_examples
    from trainer.demo import demo_base_model, write_demo_dataset
    from trainer.distributed import World
    from trainer.loop import GateTrainer, noise_prediction_loss, sdxl_adm

    work = Path(tempfile.mkdtemp(prefix="maskattn-bench-"))
    config = build_config(dict(DEMO_DEFAULTS, demo=True, resolution=args.resolution, batch_size=args.batch_size,
                               output=str(work), steps=10_000, warmup_steps=0))
    base = demo_base_model(seed=0)
    examples, skipped = read_examples(str(write_demo_dataset(work / "data", args.images)), "folder", None, 0, "skip")
    cache = FeatureCache(work / "cache")
    prepared = prepare(examples, cache, base.open_encoders, config.resolution, False, "skip", skipped, base.identities)
    for p in base.patcher.model.parameters():
        p.requires_grad_(False)
    gate_set = GateSet.create(config.maskattn(), base.layer_channels, seed=0)
    patched = apply_maskattn(base.patcher, gate_set)
    from trainer.mask_loss import RegionSupervision

    output_estimator = apply_maskattn(base.patcher, gate_set, PatchOptions(straight_through="output"))
    supervision = RegionSupervision()
    supervised = apply_maskattn(base.patcher, gate_set, recorder=supervision)

    # The gate hooks' own forward time, measured around MaskAttnPatch.__call__.
    hook_seconds = [0.0]
    original_call = MaskAttnPatch.__call__

    def timed_call(self, *a, **k):
        started = time.perf_counter()
        try:
            return original_call(self, *a, **k)
        finally:
            hook_seconds[0] += time.perf_counter() - started
    MaskAttnPatch.__call__ = timed_call

    trainer = GateTrainer(patched, gate_set, "eps", cache, prepared.items, config, World())
    encoders, encoder_kind = comfy_encoders()

    def uncached_step():
        """The same step, with every sample of the batch decoded, cropped and encoded inside it."""
        started = time.perf_counter()
        for index in trainer.micro_batch(trainer.step * config.grad_accum):
            pixels, _ = load_image(examples[index].image, config.resolution, False)
            encoders.encode_image(pixels.unsqueeze(0))
            encoders.encode_text(examples[index].caption)
        return time.perf_counter() - started + trainer.train_step().seconds

    # The same UNet forward+backward with and without the gates, on one batch.
    raw, context, pooled, sizes = load_batch(cache, [prepared.items[i] for i in trainer.micro_batch(0)])
    x0 = base.patcher.model.process_latent_in(raw)
    y = sdxl_adm(base.patcher.model, pooled, sizes)
    noise, sigma = trainer.sample_noise(0, x0.shape[1:], x0.shape[0])

    h, w = x0.shape[-2:]
    targets = [(torch.tensor([2, 3]), (torch.rand(2, h, w, generator=torch.Generator().manual_seed(i)) > 0.5).float())
               for i in range(x0.shape[0])]  # two supervised words per sample, as "a red circle"

    def fwd_bwd(model):
        started = time.perf_counter()
        x = x0.clone().requires_grad_(True)  # so the plain UNet also runs its backward pass
        if model is supervised:
            supervision.begin(targets)
        loss = noise_prediction_loss(model, "eps", x, noise, sigma, context, y)
        if model is supervised:
            loss = loss + supervision.take()
        loss.backward()
        return time.perf_counter() - started

    # Interleaved rounds, medians: the machine's load changes less between neighbours.
    cached, uncached, data, hooks, plain, gated, output, masked = [], [], [], [], [], [], [], []
    for round_ in range(args.steps + 1):
        hook_seconds[0] = 0.0
        result = trainer.train_step()
        hook = hook_seconds[0]
        rest = uncached_step(), fwd_bwd(base.patcher), fwd_bwd(patched), fwd_bwd(output_estimator), fwd_bwd(supervised)
        if round_ == 0:
            continue  # warm-up
        cached.append(result.seconds)
        data.append(result.data_seconds)
        hooks.append(hook)
        uncached.append(rest[0])
        plain.append(rest[1])
        gated.append(rest[2])
        output.append(rest[3])
        masked.append(rest[4])
    MaskAttnPatch.__call__ = original_call
    step, step_uncached, data, hooks = median(cached), median(uncached), median(data), median(hooks)
    plain, gated, output, masked = median(plain), median(gated), median(output), median(masked)

    print(f"tiny SDXL-topology UNet, {config.resolution}x{config.resolution} px, batch {config.batch_size}, "
          f"{gate_set.parameter_count():,} gate parameters on {len(gate_set.layers)} layers, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"with cache:    {1 / step:6.2f} steps/s  ({step * 1000:.1f} ms/step)")
    print(f"without cache: {1 / step_uncached:6.2f} steps/s  ({step_uncached * 1000:.1f} ms/step, {encoder_kind})")
    print(f"data loading (cached): {data * 1000:.2f} ms/step = {100 * data / step:.1f}% of step time")
    print(f"gate hooks, forward:   {hooks * 1000:.1f} ms/step = {100 * hooks / step:.1f}% of step time")
    print(f"gated vs plain UNet forward+backward: {gated * 1000:.1f} vs {plain * 1000:.1f} ms "
          f"= gates {100 * (gated - plain) / gated:.1f}% of it")
    print(f"--straight-through output: {output * 1000:.1f} ms forward+backward = {100 * (output / gated - 1):+.1f}% "
          f"over the paper's estimator ({gated * 1000:.1f} ms)")
    print(f"--mask-loss (2 words per sample): {masked * 1000:.1f} ms = {100 * (masked / gated - 1):+.1f}% over the "
          "gated forward+backward without it")


if __name__ == "__main__":
    main()
