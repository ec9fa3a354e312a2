#!/usr/bin/env python
"""Train MaskAttn gates for a frozen SDXL checkpoint.

    python trainer/train.py --checkpoint sd_xl_base_1.0.safetensors --data my_images/
    python trainer/train.py --demo                       # a minute on the CPU, nothing to download
    torchrun --nproc_per_node=2 trainer/train.py ...     # more than one GPU (or CPU process)

Run `python trainer/train.py --help` for every option; `--config FILE` (TOML or YAML) takes
the same keys. The result is `<output>/<name>.safetensors`, a file MaskAttn Loader reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from trainer.config import ConfigError, TrainConfig, parse_config, save_resolved  # noqa: E402
from trainer.distributed import World, close_world, init_world  # noqa: E402

# Exit codes: 0 done (or stopped at --stop-at), 1 bad input, 128 + signal after an interrupt.
INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class OutputError(RuntimeError):
    pass


def check_output(output: Path, what: str = "the output folder",
                 fix: str = "pick another with --output or fix its permissions") -> None:
    """Fail before any work if the output folder cannot be written."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"{what} {output} is a file, not a folder; {fix}")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise OutputError(f"{what} {output} is not writable ({error.strerror or error}); {fix}") from None


def install_folder() -> Path:
    """ComfyUI's models/maskattn (the first folder MaskAttn Loader lists), where --install writes the gates."""
    import folder_paths
    from maskattn_comfy.folders import FOLDER, register_folder

    try:
        register_folder()  # creates models/maskattn
    except OSError as error:
        raise OutputError(f"--install: ComfyUI's models/maskattn cannot be created ({error}); fix the folder's "
                          "permissions, or leave out --install and copy the gates there yourself") from None
    return Path(folder_paths.get_folder_paths(FOLDER)[0])


def say(world: World, message: str) -> None:
    if world.is_main:
        print(message, file=sys.stderr, flush=True)


def prepare_data(config: TrainConfig, base, world: World, output: Path):
    from trainer.cache import FeatureCache, prepare
    from trainer.data import DataError, read_examples

    data = config.data
    if data is None:  # --demo without --data: generate the demo's captioned shapes
        from trainer.demo import write_demo_dataset

        data = str(output / "demo_data")
        if world.is_main:
            write_demo_dataset(Path(data), config.demo_images, seed=config.seed)
        world.barrier()
    examples, skipped = read_examples(data, config.data_format, config.coco_images, config.coco_min_noun_phrases,
                                      config.bad_captions, config.caption_extension, config.bad_images,
                                      config.coco_instances)
    cache = FeatureCache(config.cache_path)
    prepared = prepare(examples, cache, base.open_encoders, config.resolution, config.buckets, config.bad_images,
                       skipped, base.identities, shard=(world.rank, world.size))
    world.barrier()  # every rank's share of the cache is written
    counts = {k: round(world.average_scalar(v) * world.size) for k, v in prepared.counts.as_dict().items()}
    if not prepared.items:
        raise DataError(f"no usable training examples in {data}" + (f": {skipped.describe()}" if skipped.total() else ""))
    say(world, f"data: {len(prepared.items)} examples from {data}"
               + (f"; skipped {skipped.total()}: {skipped.describe()}" if skipped.total() else "")
               + (f"; kept with a change: {skipped.describe_noted()}" if skipped.noted else "")
               + "; " + describe_encoding(counts))
    return cache, prepared, counts, [example.caption for example in examples]


def describe_encoding(counts: dict) -> str:
    """What the caches did, e.g. "encoded 24 images and 19 captions, 0 and 0 from the cache; 5 captions
    repeat an earlier one word for word and share its encoding"."""
    text = (f"encoded {counts['latents_encoded']} images and {counts['texts_encoded']} captions, "
            f"{counts['latents_cached']} and {counts['texts_cached']} from the cache")
    repeats = [f"{n} {what}" for n, what in ((counts["texts_repeated"], "captions"), (counts["latents_repeated"], "images"))
               if n]
    if repeats:
        text += f"; {' and '.join(repeats)} repeat an earlier one exactly and share its encoding (each encoded once)"
    return text


def train(config: TrainConfig, world: World) -> int:
    from maskattn_core import GateSet, save_gate_file
    from trainer.base_model import freeze, load_checkpoint as load_base
    from trainer.checkpoints import load_newest_readable, save_checkpoint, set_aside, set_rng_state
    from trainer.loop import GateTrainer, enable_gradient_checkpointing, gated_model
    from trainer.report import Report, SilentReport

    output = Path(config.output)
    if world.is_main:
        check_output(output)
        if config.install:  # found out now, not after the training it would throw away
            check_output(install_folder(), "--install: MaskAttn Loader's folder",
                         "fix its permissions, or leave out --install and copy the gates there yourself")
        save_resolved(config, output / "config.yaml")
    world.barrier()
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    if config.demo and config.checkpoint is None:
        from trainer.base_model import PRECISIONS
        from trainer.demo import demo_base_model
        base = demo_base_model(seed=config.seed, dtype=PRECISIONS.get(config.precision, torch.float32))
    else:
        base = load_base(config.checkpoint, config.precision, config.cache_path)
    cache, prepared, counts, captions = prepare_data(config, base, world, output)

    provenance = dict(base.provenance, kind="trained", dataset_size=len(prepared.items),
                      dataset_sha256=prepared.dataset_hash(), config=config.to_dict(),
                      trainer="maskattn-comfyui trainer/train.py")
    found = load_newest_readable(output, lambda message: say(world, message)) if config.resume else None
    resume_from = None
    if config.resume and found is None:
        say(world, f"--resume: no complete checkpoint in {output / 'checkpoints'}; starting at step 0")
    if found is not None:
        resume_from, gate_set, state, damaged = found
        world.barrier()  # every rank has read it before rank 0 moves anything
        if damaged and world.is_main:
            set_aside(damaged, lambda message: say(world, message))
        check_resumable(config, state["config"], resume_from)
        check_same_inputs(config, state, gate_set.provenance, provenance, unet_dtype(base), resume_from,
                          lambda message: say(world, message))
        gate_set.provenance = provenance
    else:
        gate_set = GateSet.create(config.maskattn(), base.layer_channels, seed=config.seed, provenance=provenance)
        if config.gate_init_bias:
            with torch.no_grad():
                for head in gate_set.heads.values():
                    head.logit_bias.fill_(float(config.gate_init_bias))
        state = None

    freeze(base.patcher)
    patched = gated_model(base.patcher, gate_set, config)  # --straight-through, and --mask-loss's recorder
    import comfy.model_management as mm
    mm.load_models_gpu([patched], force_full_load=True)
    device = next(patched.model.diffusion_model.parameters()).device
    gate_set.to(device=device, dtype=torch.float32)  # the gates and their optimizer state stay in float32
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(patched)
    world.broadcast_parameters(list(gate_set.parameters()))

    trainer = GateTrainer(patched, gate_set, base.provenance["prediction"], cache, prepared.items, config, world,
                          unpatched=base.patcher)
    if state is not None:
        trainer.load_state_dict(state)
        set_rng_state(state["rng"])
        say(world, f"resumed from {resume_from} at step {trainer.step}")
    stop_at = min(config.stop_at or config.steps, config.steps)
    say(world, f"training {gate_set.parameter_count():,} gate parameters on {len(gate_set.layers)} layers "
               f"({base.provenance['prediction']}-prediction, {world.size} process(es), device {device}) "
               f"to step {stop_at} of {config.steps}")
    validator = None
    if config.validate_every and world.is_main:  # before the report: a CLIP or VAE that cannot load fails here
        from trainer.validation import Validator, default_prompts

        prompts = config.validate_prompts or default_prompts(captions)
        validator = Validator(base, gate_set, patched, prompts, config, output, device)
        say(world, f"validation every {config.validate_every} steps: {len(prompts)} prompt(s) {list(prompts)}, "
                   f"into {validator.folder}")
    if world.is_main:
        report = Report(output, trainer.step, stop_at, config.progress, config.tensorboard)
        (output / "run.json").write_text(json.dumps({"encode": counts, "skipped": prepared.skipped.counts,
                                                     "kept_with_a_change": prepared.skipped.noted,
                                                     "examples": len(prepared.items),
                                                     "start_step": trainer.step}, indent=1))
    else:
        report = SilentReport()

    def checkpoint():
        if world.is_main:
            gate_set.provenance["steps"] = trainer.step
            path = save_checkpoint(output, trainer.step, gate_set,
                                   dict(trainer.state_dict(), config=config.to_dict(), unet_dtype=unet_dtype(base)),
                                   config.keep_last)
            report.note(f"checkpoint: {path}")
        world.barrier()

    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in INTERRUPTED}
    try:
        while trainer.step < stop_at:
            result = trainer.train_step()
            report.step(trainer.step, result, trainer.step % config.log_every == 0 or trainer.step == stop_at
                        or result.base_loss is not None)
            interrupted = world.any(bool(received))
            if interrupted or trainer.step % config.save_every == 0 or trainer.step == stop_at:
                checkpoint()
            if validator is not None and not interrupted and trainer.step % config.validate_every == 0:
                try:
                    report.validation(trainer.step, validator.run(trainer.step))
                except Exception as error:  # a picture is not worth the run: say so, train on without it
                    validator = None
                    report.validation_failed(trainer.step, error)
            if interrupted:
                code = INTERRUPTED.get(received[0], 130) if received else 143
                report.note(f"interrupted at step {trainer.step}: the checkpoint above holds everything; "
                            "run the same command with --resume to continue")
                return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        report.close()

    if world.is_main and trainer.step >= config.steps:
        gate_set.provenance["steps"] = trainer.step
        final = save_gate_file(gate_set, output / f"{config.name}.safetensors")
        say(world, f"gates: {final}")
        if config.install:
            installed = save_gate_file(gate_set, install_folder() / final.name)
            say(world, f"installed for MaskAttn Loader: {installed}")
    elif trainer.step < config.steps:
        say(world, f"stopped at step {trainer.step} of {config.steps} (--stop-at); continue with --resume")
    return 0


RESUME_KEYS = ("stage", "placement", "threshold", "negative_value", "gate_hidden_dim", "share_heads_by_stage",
               "batch_size", "grad_accum", "seed", "resolution", "buckets", "steps", "warmup_steps", "lr",
               "weight_decay", "betas", "grad_clip", "gate", "gate_init_bias", "straight_through", "mask_loss")


def check_resumable(config: TrainConfig, saved: dict, path: Path) -> None:
    """An exact continuation needs the settings that shape the computation to be unchanged."""
    now = config.to_dict()
    # A checkpoint from before a setting existed had the setting's default.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changed = [f"{k}: {saved.get(k, defaults[k])!r} -> {now[k]!r}" for k in RESUME_KEYS
               if saved.get(k, defaults[k]) != now[k]]
    if changed:
        raise ConfigError(f"cannot resume from {path}: these settings differ from the checkpoint's ({'; '.join(changed)}); "
                          "restore them, or train into a new --output")


def unet_dtype(base) -> str:
    """The frozen UNet's weight and compute dtypes, e.g. "torch.float16 (computed in torch.float32)"."""
    stored, cast = base.patcher.model.get_dtype(), getattr(base.patcher.model, "manual_cast_dtype", None)
    return str(stored) if cast in (None, stored) else f"{stored} (computed in {cast})"


def check_same_inputs(config: TrainConfig, state: dict, trained: dict, now: dict, dtype: str, path: Path,
                      say) -> None:
    """Refuse a resume whose frozen UNet precision or dataset differ from the checkpoint's (the run would not
    continue exactly); say what changed that keeps it exact."""
    saved = state["config"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    precision = saved.get("precision", defaults["precision"])
    changed = []
    before = state.get("unet_dtype")  # checkpoints that predate it: the flag itself must be unchanged
    if (before or precision) != (dtype if before else config.precision):
        changed.append(f"the frozen UNet's precision ({before or precision} -> {dtype if before else config.precision}, "
                       f"--precision {precision!r} -> {config.precision!r})")
    if trained.get("dataset_sha256") not in (None, now["dataset_sha256"]):
        changed.append(f"the dataset ({trained.get('dataset_size')} examples, sha256 {trained['dataset_sha256'][:12]} "
                       f"-> {now['dataset_size']} examples, {now['dataset_sha256'][:12]})")
    if changed:
        raise ConfigError(f"cannot resume from {path} exactly: {' and '.join(changed)} changed since it was "
                          "written; restore them, or train into a new --output")
    if precision != config.precision:
        say(f"--resume: --precision {precision!r} -> {config.precision!r} gives the same {dtype} UNet")
    checkpointing = saved.get("gradient_checkpointing", defaults["gradient_checkpointing"])
    if checkpointing != config.gradient_checkpointing:
        say(f"--resume: gradient_checkpointing {checkpointing} -> {config.gradient_checkpointing}: it recomputes the "
            "same activations, so the run continues exactly")


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if config.demo and "OMP_NUM_THREADS" not in os.environ:
        # The tiny model's kernels gain nothing from more threads, and OpenMP threads on a busy CPU
        # can wait on each other: measured 0.3 s/step with one thread, 10-14 s with two.
        torch.set_num_threads(1)
    world = init_world(config.cpu)
    from maskattn_comfy import host

    try:
        host.boot(config.comfyui, cpu=True if config.cpu else None)
    except host.ComfyUINotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from maskattn_core import GateFileError
    from trainer.base_model import BaseModelError
    from trainer.checkpoints import CheckpointError
    from trainer.data import DataError

    try:
        return train(config, world)
    except (ConfigError, DataError, BaseModelError, CheckpointError, OutputError, GateFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        close_world(world)


if __name__ == "__main__":
    sys.exit(main())
