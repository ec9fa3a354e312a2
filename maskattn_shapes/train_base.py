"""Train the Shapes base UNet from scratch on the world's pictures (the text encoder and codec are fixed).

    python -m maskattn_shapes.train_base --out output/shapes_base            # CPU defaults, resumable
    python -m maskattn_shapes.train_base --out output/shapes_base --resume   # continue after a stop
    python -m maskattn_shapes.train_base --device cuda --steps 12000 --batch 128 --scenes 40000
    python -m maskattn_shapes.train_base --init old_base.safetensors ...     # fine-tune an existing base

Ordinary v-prediction diffusion training on SDXL's discrete schedule, 10 % of captions dropped
for classifier-free guidance, an EMA of the weights; the EMA is what is written, 8-bit, to
--weights (default: shapes_base.safetensors in --out; the pack's own base is only replaced when
--weights names it). The text encoder is the "words" recipe unless --text-encoder says otherwise
(maskattn_shapes.model.TEXT_ENCODERS): each token's output is its own word and position only, the padding is
the same for every prompt, and the pooled vector is 0. --grounding adds the word-grounding loss
(maskattn_shapes.grounding); base v2 was trained with 0.5 (scripts/shapes_v2.sh base). --drop-colours
recaptions a share of the pictures with some objects named by their shape alone (colour-word dropout:
EVIDENCE.md measures what it does to shapes and to binding; scripts/shapes_v2.sh shapes). --ground-nouns
grounds the shape words only (scripts/shapes_v2.sh nouns). --max-weight CAP adds the saturation loss: each
head's largest attention weight above CAP, on every cross-attention layer (scripts/shapes_v2.sh soften).
Latents and text encodings are computed once per run (each distinct caption once).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from maskattn_shapes.grounding import AttentionRecorder, GroundingTargets, grounding_loss, saturation_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="output/shapes_base", help="checkpoints and the training log")
    p.add_argument("--weights", default=None,
                   help="where the trained EMA UNet is written (default: --out/shapes_base.safetensors; "
                        "name maskattn_shapes/weights/shapes_base.safetensors to replace the pack's base)")
    p.add_argument("--text-encoder", default=None, choices=("v1", "v2", "words"),
                   help="the frozen text encoder's recipe (maskattn_shapes.model.TEXT_ENCODERS; default: the current one)")
    p.add_argument("--init", default=None, help="start from this base file's UNet (a fine-tune) instead of random weights")
    p.add_argument("--scenes", type=_positive(int), default=12000, help="training pictures drawn from the world")
    p.add_argument("--world-seed", type=_non_negative(int), default=0)
    p.add_argument("--steps", type=_positive(int), default=2500)
    p.add_argument("--batch", type=_positive(int), default=32)
    p.add_argument("--lr", type=_positive(float), default=5e-4)
    p.add_argument("--warmup", type=_non_negative(int), default=200)
    p.add_argument("--ema", type=_fraction, default=0.999)
    p.add_argument("--grounding", type=_non_negative(float), default=0.0,
                   help="weight of the word-grounding loss (maskattn_shapes.grounding): each object's colour and shape "
                        "tokens attend at its cells; base v2 was trained with 0.5 (0: the noise loss alone)")
    p.add_argument("--ground-nouns", action="store_true",
                   help="the grounding loss grounds each object's shape word only, and asks an object's cells to attend to "
                        "any object's words: nothing tells a colour word which object is its own (TokenCompose grounds nouns)")
    p.add_argument("--max-weight", type=_fraction, default=None, metavar="CAP",
                   help="with --grounding: add the saturation loss (maskattn_shapes.grounding.saturation_loss), how far "
                        "each head's largest attention weight rises above CAP at each location, on every attn2 layer "
                        "(a saturated softmax puts all of a head's weight on one token; diagnose measures it)")
    p.add_argument("--drop-colours", type=_fraction, default=0.0,
                   help="share of captioned pictures whose caption names some objects by their shape alone "
                        "(maskattn_shapes.world.without_colours), so that a shape word carries its shape by itself")
    p.add_argument("--uncond", type=_fraction, default=0.1, help="share of captions dropped for classifier-free guidance")
    p.add_argument("--seed", type=_non_negative(int), default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=_non_negative(int), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--save-every", type=_positive(int), default=250)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--minutes", type=_non_negative(float), default=0,
                   help="a time budget: the schedule runs to --steps or to this many minutes of training, "
                        "whichever comes first, then the weights are written (0: no limit)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch here; use --device cpu")
    if args.max_weight is not None and not args.grounding:
        p.error("--max-weight needs --grounding (the saturation loss uses the grounding loss's attention recorder)")
    if args.init and not Path(args.init).is_file():
        p.error(f"--init {args.init}: no such file")
    return args


def _positive(kind):
    def parse(text: str):
        value = _number(kind, text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _non_negative(kind):
    def parse(text: str):
        value = _number(kind, text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def _fraction(text: str) -> float:
    value = _number(float, text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


CHUNK = 2000


def _scene_chunk(args: tuple[int, int]):
    from maskattn_shapes.world import training_scenes

    seed, count = args
    return training_scenes(count, seed)


def draw_scenes(n: int, world_seed: int, pool) -> list:
    """`n` training scenes in chunks of 2000, chunk k drawn with seed world_seed * 1000 + k (in parallel)."""
    jobs = [(world_seed * 1000 + k, min(CHUNK, n - k * CHUNK)) for k in range(-(-n // CHUNK))]
    return [scene for chunk in pool.map(_scene_chunk, jobs) for scene in chunk]


def encode_world(scenes, clip, codec, device, pool, recaptioned=()):
    """-> latents [N,4,16,16] (scaled as the model sees them), caption ids [1 + R, N] (row 0: the scenes'
    own captions, row r: those of the r-th of the `recaptioned` scene lists, the same pictures captioned
    otherwise), contexts [U,77,2048] and pooled [U,1280] for the U distinct captions plus the empty
    caption (last row)."""
    from maskattn_shapes.model import LATENT_SCALE, encode_captions
    from maskattn_shapes.world import render

    latents = []
    pictures = list(pool.map(render, scenes, chunksize=256))
    for start in range(0, len(scenes), 256):
        pixels = torch.stack([torch.from_numpy(np.array(p, dtype=np.float32)) for p in pictures[start:start + 256]])
        latents.append(codec.encode(pixels.movedim(-1, 1) / 127.5 - 1.0) * LATENT_SCALE)
    captioned = [scenes, *recaptioned]
    captions = sorted({s.caption for group in captioned for s in group})
    index = {c: i for i, c in enumerate(captions)}
    contexts, pooled = [], []
    texts = captions + [""]
    for start in range(0, len(texts), 64):
        context, pool = encode_captions(clip, texts[start:start + 64])
        contexts.append(context.to(device, torch.float16))
        pooled.append(pool.to(device, torch.float16))
    ids = torch.tensor([[index[s.caption] for s in group] for group in captioned])
    return (torch.cat(latents).to(device), ids.to(device), torch.cat(contexts).to(device), torch.cat(pooled).to(device))


def lr_at(step: int, progress: float, args) -> float:
    """Linear warm-up over --warmup steps, then cosine to zero as `progress` goes to 1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _smoothed(average: float | None, value: float) -> float:
    """The logged running mean: the first value, then 2 % of each new one."""
    return value if average is None else 0.98 * average + 0.02 * value


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    from maskattn_comfy import host

    host.boot(cpu=args.device == "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    from maskattn_shapes import model as shapes
    from maskattn_shapes.world import without_colours
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = Path(args.weights) if args.weights else out / "shapes_base.safetensors"
    started = time.time()

    encoder = args.text_encoder or shapes.TEXT_ENCODER
    init_state = shapes.read_base(Path(args.init))[0] if args.init else None
    patcher = shapes.shapes_unet(init_state, seed=args.seed)
    model = patcher.model
    # ComfyUI 0.33.0 builds the UNet's parameters with requires_grad=False (it never trains them): turn it on,
    # or the loss has no gradient on those hosts.
    unet = model.diffusion_model.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    alphas_cumprod = (1.0 / (1.0 + model.model_sampling.sigmas.float() ** 2)).to(device)
    size_embedding = model.encode_adm(pooled_output=torch.zeros(1, 1280), width=shapes.IMAGE_SIZE,
                                      height=shapes.IMAGE_SIZE)[:, 1280:].to(device)

    print(f"[shapes] drawing {args.scenes} scenes and encoding them", flush=True)
    with ProcessPoolExecutor(max(1, min(16, (os.cpu_count() or 2) - 1))) as pool:
        scenes = draw_scenes(args.scenes, args.world_seed, pool)
        clip = shapes.shapes_clip(encoder=encoder)
        recaptioned = []
        if args.drop_colours:
            rng = np.random.Generator(np.random.PCG64([args.world_seed, 1]))
            recaptioned = [without_colours(s, rng) for s in scenes]
        latents, caption_ids, contexts, pooled = encode_world(scenes, clip, shapes.ShapesCodec(), device, pool,
                                                              [recaptioned] if recaptioned else [])
    targets = GroundingTargets(scenes + recaptioned, clip, nouns=args.ground_nouns).to(device) if args.grounding else None
    empty_id = contexts.shape[0] - 1
    print(f"[shapes] {len(scenes)} pictures, {empty_id} distinct captions, {time.time() - started:.0f} s", flush=True)

    step, log, trained_before = 0, [], 0.0
    generator = torch.Generator(device=device).manual_seed(args.seed)
    checkpoint = out / "checkpoint.pt"
    if args.resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu() if device.type == "cpu" else state["generator"])
        step = int(state["step"])
        trained_before = float(state.get("seconds", 0.0))  # so a --minutes schedule continues, not restarts
        print(f"[shapes] resumed at step {step} after {trained_before / 60:.1f} min of training", flush=True)

    stop = {"asked": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(asked=True))

    def checkpoint_now():
        save_checkpoint(checkpoint, {"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                                     "generator": generator.get_state(), "step": step,
                                     "seconds": time.time() - training_started})

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    loss_avg, grounding_avg, tick, training_started = None, None, time.time(), time.time() - trained_before
    recorder = AttentionRecorder(targets.coverage, peaks=args.max_weight is not None) if targets is not None else None
    recorded = recorder.transformer_options(unet) if recorder is not None else {}

    def progress() -> float:
        by_time = (time.time() - training_started) / (args.minutes * 60) if args.minutes else 0.0
        return max(step / args.steps, by_time)

    try:
        while progress() < 1.0:
            idx = torch.randint(0, latents.shape[0], (args.batch,), device=device, generator=generator)
            x0 = latents[idx]
            ids = caption_ids[0, idx]
            drop = torch.rand(args.batch, device=device, generator=generator) < args.uncond
            target_idx = idx
            if args.drop_colours:
                recaption = torch.rand(args.batch, device=device, generator=generator) < args.drop_colours
                ids = torch.where(recaption, caption_ids[1, idx], ids)
                target_idx = idx + recaption.long() * latents.shape[0]
            ids = torch.where(drop, torch.full_like(ids, empty_id), ids)
            context = contexts[ids].float()
            y = torch.cat([pooled[ids].float(), size_embedding.expand(args.batch, -1)], dim=1)
            t = torch.randint(0, alphas_cumprod.shape[0], (args.batch,), device=device, generator=generator)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            noise = torch.randn(x0.shape, device=device, generator=generator)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            v = a.sqrt() * noise - (1 - a).sqrt() * x0
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, progress(), args)
            if recorder is not None:
                recorder.clear()
            with autocast:
                prediction = unet(x_t, timesteps=t.float(), context=context, y=y, transformer_options=recorded)
            noise_loss = torch.nn.functional.mse_loss(prediction.float(), v)
            loss = noise_loss
            if recorder is not None:
                tokens, pixel_tokens = targets.tokens[target_idx], targets.pixel_tokens[target_idx]  # once per step
                parts = [grounding_loss(w.float(), tokens, targets.coverage[w.shape[1]][target_idx], ~drop, pixel_tokens)
                         for w in recorder.weights]
                pixel = torch.stack([p for p, _ in parts]).mean()
                token = torch.stack([t for _, t in parts]).mean()
                saturation = saturation_loss(recorder.peaks, args.max_weight) if recorder.keep_peaks else pixel * 0
                grounding_avg = [_smoothed(a, x.item()) for a, x in zip(grounding_avg or (None,) * 3, (pixel, token, saturation))]
                loss = loss + args.grounding * (pixel + token) + saturation
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), unet.parameters()):
                    e.lerp_(p, 1 - args.ema)
            step += 1
            loss_avg = _smoothed(loss_avg, noise_loss.item())
            if step % 50 == 0:
                rate = 50 / (time.time() - tick)
                tick = time.time()
                log.append({"step": step, "loss": loss_avg, "lr": optimizer.param_groups[0]["lr"], "steps_per_s": rate,
                            **({"pixel": grounding_avg[0], "token": grounding_avg[1], "saturation": grounding_avg[2]}
                               if grounding_avg else {})})
                grounded = (f" grounding pixel {grounding_avg[0]:.3f} token {grounding_avg[1]:.3f}"
                            f" saturation {grounding_avg[2]:.4f}") if grounding_avg else ""
                print(f"[shapes] step {step} ({progress():.0%}) loss {loss_avg:.4f}{grounded} {rate:.2f} steps/s", flush=True)
            if step % args.save_every == 0 or stop["asked"]:
                checkpoint_now()
            if stop["asked"]:
                print(f"[shapes] stopped at step {step} with a checkpoint; --resume continues", flush=True)
                return
    except KeyboardInterrupt:
        checkpoint_now()
        print(f"[shapes] interrupted at step {step}; checkpoint written, --resume continues", flush=True)
        return
    checkpoint_now()
    with (out / "train_log.jsonl").open("a") as handle:
        for row in log:
            handle.write(json.dumps(row) + "\n")
    provenance = {"steps": step, "grounding": args.grounding, "ground_nouns": args.ground_nouns, "max_weight": args.max_weight, "drop_colours": args.drop_colours, "init": Path(args.init).name if args.init else None, "batch": args.batch, "lr": args.lr, "ema": args.ema, "scenes": args.scenes,
                  "world_seed": args.world_seed, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "minutes": round((time.time() - started) / 60, 1), "final_loss": loss_avg}
    shapes.save_base(weights, {k: v.float().cpu() for k, v in ema.state_dict().items()}, provenance, encoder=encoder)
    print(f"[shapes] wrote {weights} ({weights.stat().st_size / 2**20:.1f} MiB): {json.dumps(provenance)}", flush=True)


if __name__ == "__main__":
    main()
