"""The GPU check: one command, under 9 minutes on one H100, one table for BENCHMARKS.md.

    python benchmarks/gpu_check.py                 # on a CUDA machine (see "On the lent GPU machine")
    python benchmarks/gpu_check.py --smoke         # the same code on the CPU at tiny size, seconds

It builds a random full-size SDXL in memory (ComfyUI's own SDXL UNet config, 2.6 B parameters,
both SDXL text encoders and the SDXL VAE, seeded random weights filled on the GPU: nothing to
download or carry), then measures, in this order:

1. sampling at 1024x1024 in fp16 (euler, normal, cfg 5, `benchmarks/sampling.py`'s `measure`):
   unpatched ComfyUI against MaskAttn's default gates, strength 0 and an empty step range,
   interleaved (every patched run between two unpatched ones, rounds as many as the part's
   budget allows), then peak memory;
2. Visualize Mask at 1024x1024 in fp16 against the same number of plain model calls
   (`benchmarks/visualize_speed.py`'s `measure`);
3. sampling again in bf16 (the UNet rebuilt in bf16 from the same seed);
4. the trainer (`trainer/train.py`'s own `train()`, data preparation, caches, GateTrainer,
   --gradient-checkpointing, metrics.jsonl) at 1024 px, batch 1 and 2, without and with gradient
   checkpointing: steps/s (median of the timed steps in metrics.jsonl) and peak GPU memory. Only
   the checkpoint loader is replaced, by one that hands over the random SDXL built here.

Each part runs on its own and a failure is a row of the table, not the end of the run; the
rows are printed as each part ends, and the table again at the end with the device, torch and
ComfyUI versions. `--json FILE` keeps every number.

Budget (seconds on one H100; the sampling and Visualize parts choose their rounds from a timed
run so that they fit, the trainer runs 2 warm-up and 6 timed steps per configuration):
start and build 60, sampling fp16 120, Visualize Mask 50, sampling bf16 120, trainer 120:
about 470 s, so 8 minutes with the start of the Python process; `--budget-s` scales the parts.
As a guard, nothing starts after `--deadline-s` (520 s: the device tool stops a command at 600 s)
and the JSON is rewritten after every part, so a run cut short keeps what it measured.

On the lent GPU machine (what an earlier session found; the image may have changed):
- torch 2.11 (cu130), Python 3.12, and none of ComfyUI's own requirements beyond what torch
  brings: carry a ComfyUI (`.comfyui`, 25 MB, made by scripts/setup.sh) and the pure-Python
  wheels of torchsde and trampoline (`.venv/bin/pip download --no-deps -d .device/whl torchsde
  trampoline`); `--wheels .device/whl` puts them on sys.path, no install needed.
- PyAV (`av`) is missing; ComfyUI's comfy_api imports it for video types SDXL never uses, so a
  stand-in module is put in its place when it cannot be imported (said in the output).
- The trainer's backward pass through torch's fused SDPA with MaskAttn's additive mask failed
  there with "LSE is not correctly aligned (strideH)". The trainer part therefore runs with
  ComfyUI's split attention by default (`--trainer-attention split`; `basic` and `sub-quad` are
  the other fused-kernel-free choices, `comfyui` keeps ComfyUI's own choice to test the fix).
  Sampling and Visualize Mask always use ComfyUI's own choice, as users do.
- The command, with the device tool: carry [".comfyui", ".device/whl"], run
  `python3 benchmarks/gpu_check.py --comfyui .comfyui --wheels .device/whl --json $OUT/gpu_check.json`
  with a timeout of 600 s.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# ComfyUI's SDXL base UNet (what comfy.model_detection finds in sd_xl_base_1.0.safetensors).
SDXL_UNET_CONFIG = {
    "model_channels": 320, "in_channels": 4, "out_channels": 4, "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "context_dim": 2048, "adm_in_channels": 2816,
    "use_linear_in_transformer": True, "num_head_channels": 64, "use_spatial_transformer": True,
    "num_classes": "sequential", "legacy": False, "use_temporal_attention": False, "use_temporal_resblock": False,
    "image_size": 32,
}
# SDXL's VAE (AutoencoderKL, 4 latent channels, 8x).
SDXL_VAE_CONFIG = {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
GOALS = {"default gates": 1.01, "strength 0": 1.001, "outside step range": 1.001}
# Modules of ComfyUI's requirements.txt its model code imports (the server's own are left out).
COMFYUI_IMPORTS = ("torchsde", "trampoline", "einops", "transformers", "tokenizers", "sentencepiece", "safetensors",
                   "yaml", "PIL", "scipy", "tqdm", "psutil", "numpy")
TRAINER_ATTENTION = {"split": "attention_split", "basic": "attention_basic", "sub-quad": "attention_sub_quad",
                     "comfyui": None}


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one run: the full check or its CPU smoke version."""
    smoke: bool
    size: int                      # image side, pixels, for sampling and Visualize Mask
    sampling_steps: int
    dtypes: tuple[str, ...]        # sampling runs once per dtype; Visualize Mask in the first
    visualize_levels: int
    trainer_resolution: int
    trainer_steps: tuple[int, int]  # (warm-up, timed) per configuration
    budget_s: dict                 # seconds per part
    min_rounds: int
    max_rounds: int


FULL = Plan(smoke=False, size=1024, sampling_steps=10, dtypes=("fp16", "bf16"), visualize_levels=4,
            trainer_resolution=1024, trainer_steps=(2, 6),
            budget_s={"build": 60, "sampling": 120, "visualize": 50, "trainer": 120}, min_rounds=3, max_rounds=40)
SMOKE = Plan(smoke=True, size=64, sampling_steps=1, dtypes=("fp32", "bf16"), visualize_levels=1,
             trainer_resolution=64, trainer_steps=(1, 1),
             budget_s={"build": 5, "sampling": 2, "visualize": 2, "trainer": 10}, min_rounds=1, max_rounds=1)


# -- the GPU machine's missing pieces ------------------------------------------------------------
def prepare_imports(wheels: Path | None) -> list[str]:
    """Put pure-Python wheels on sys.path and stand in for PyAV when it is missing; what was done."""
    import importlib.util

    notes = []
    if wheels:
        for wheel in sorted(Path(wheels).glob("*.whl")):
            sys.path.append(str(wheel))  # a py3-none-any wheel is a zip archive Python imports from
            notes.append(f"on sys.path: {wheel.name}")
    if importlib.util.find_spec("av") is None:
        sys.meta_path.append(StandIn("av"))
        notes.append("PyAV (av) is not installed: a stand-in module took its place (video types, unused here)")
    missing = [name for name in COMFYUI_IMPORTS if importlib.util.find_spec(name) is None]
    if missing:
        notes.append(f"not importable here (ComfyUI may need them): {', '.join(missing)}")
    return notes


class StandIn:
    """An import finder that answers for one missing package and its submodules with empty modules whose
    every attribute is an empty class (enough for annotations and isinstance checks that never match)."""

    def __init__(self, package: str):
        self.package = package

    def find_spec(self, name, path=None, target=None):
        import importlib.machinery

        if name == self.package or name.startswith(self.package + "."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        import types

        class Anything(types.ModuleType):
            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return type(name, (), {})

        return Anything(spec.name)

    def exec_module(self, module):
        module.__path__ = []


# -- the random SDXL ----------------------------------------------------------------------------
def fill_random_(module, seed: int, device, scale: float = 0.02):
    """Seeded random weights, drawn on `device` (fast on a GPU) and copied into the module where it
    lives; norms' weights 1 and biases 0, so activations stay finite through 70 transformer blocks."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            elif device.type == "cpu" and p.numel() > 2**20:  # the CPU draws slowly: rows repeat from a table
                rows = p.view(p.shape[0], -1)
                table = torch.randn((97, rows.shape[1]), generator=generator).mul_(scale)
                rows.copy_(table[torch.arange(rows.shape[0]) % 97])
            else:
                p.copy_(torch.randn(p.shape, generator=generator, device=device).mul_(scale))
    return module


def random_unet(unet_config: dict, dtype, seed: int, fill_device):
    """A ComfyUI MODEL (ModelPatcher around model_base.SDXL) with random weights, as a loaded checkpoint is."""
    import torch

    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SDXL(dict(unet_config))
    model_config.set_inference_dtype(dtype, None)
    model = comfy.model_base.SDXL(model_config, device=torch.device("cpu"))
    fill_random_(model.diffusion_model, seed, fill_device)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def random_clip(smoke: bool, dtype, seed: int, fill_device):
    """SDXL's CLIP-L + CLIP-G with the real tokenizers (3 small layers each in the smoke run)."""
    import comfy.sd
    import comfy.supported_models
    from maskattn_comfy.tiny_model import TINY_CLIP_CONFIG

    options = {"dtype": dtype}
    if smoke:
        options.update(clip_l_model_config=dict(TINY_CLIP_CONFIG), clip_g_model_config=dict(TINY_CLIP_CONFIG))
    clip = comfy.sd.CLIP(comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG)).clip_target(), model_options=options)
    fill_random_(clip.cond_stage_model, seed, fill_device)
    return clip


def random_vae(smoke: bool, seed: int, fill_device):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from maskattn_comfy.tiny_model import TINY_VAE_CONFIG

    config = TINY_VAE_CONFIG if smoke else SDXL_VAE_CONFIG
    module = fill_random_(AutoencoderKL(**config), seed, fill_device, scale=0.01)
    return comfy.sd.VAE(sd=module.state_dict(), config={"params": config})


def free_memory():
    import torch

    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()
    if torch.cuda.is_available():  # GPU memory back before the next part; on the CPU a collection costs seconds
        gc.collect()
        torch.cuda.empty_cache()


# -- the parts ----------------------------------------------------------------------------------
def rounds_for(budget_s: float, seconds_per_round: float, plan: Plan) -> int:
    if plan.smoke or seconds_per_round <= 0:
        return plan.min_rounds
    return max(plan.min_rounds, min(plan.max_rounds, int(budget_s / seconds_per_round)))


def sampling_part(model, dtype_name: str, plan: Plan, budget_s: float) -> list[dict]:
    """Rows for unpatched vs each variant, sampled by benchmarks/sampling.py's `measure`."""
    import torch

    import comfy.model_management as mm
    import comfy.sample
    import sampling
    from maskattn_comfy.tiny_model import tiny_conditioning

    variants = ["unpatched", "default gates", "strength 0", "outside step range"]
    # One timed unpatched run (after a warm-up) sizes the rounds to the budget.
    size, device = plan.size, mm.get_torch_device()
    positive = tiny_conditioning(seed=1, width=size, height=size)
    negative = tiny_conditioning(seed=2, width=size, height=size)
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    seconds = []
    for steps in (1, plan.sampling_steps):
        started = time.perf_counter()
        comfy.sample.sample(model, noise, steps, sampling.CFG, "euler", "normal", positive, negative, latent,
                            disable_pbar=True, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    patched = len(variants) - 1
    fixed = seconds[1] * (2 * patched + 1) + seconds[0] * len(variants)  # one memory round, the warm-ups
    rounds = rounds_for(budget_s - fixed, seconds[1] * 2 * patched, plan)
    result = sampling.measure(f"sampling {dtype_name}", model, size, plan.sampling_steps, rounds, variants,
                              memory_rounds=1)
    where = (f"{dtype_name}, {size}x{size}, {plan.sampling_steps} steps euler cfg {sampling.CFG:g}, "
             f"{rounds} rounds, unpatched {result['unpatched_s']:.2f} s/run")
    rows = []
    for variant, v in result["variants"].items():
        goal = GOALS[variant]
        rows.append({
            "part": f"sampling, {variant}", "configuration": where, "ratio": v["ratio_median"],
            "ratio_min": v["ratio_min"], "ratio_max": v["ratio_max"], "peak_extra_mib": v["peak_extra_mib"],
            "peak_extra_share": v["peak_extra_share"], "same_output": v["same_output_as_unpatched"],
            "unpatched_s": result["unpatched_s"], "goal": goal,
            "result": (f"{v['ratio_median']:.4f}x ({v['ratio_min']:.4f}-{v['ratio_max']:.4f}); peak "
                       f"{v['peak_extra_mib']:+.1f} MiB ({100 * v['peak_extra_share']:+.2f}%); output = unpatched: "
                       f"{'yes' if v['same_output_as_unpatched'] else 'no'}"),
            "met": v["ratio_median"] <= goal})
    return rows


def visualize_part(model, clip, dtype_name: str, plan: Plan, budget_s: float) -> list[dict]:
    import visualize_speed

    rounds = plan.min_rounds
    if not plan.smoke:  # one round first, to size the rounds to the budget
        probe = visualize_speed.measure(model, clip, plan.size, plan.size, plan.visualize_levels, 1)
        per_round = probe["plain_s"] * (1 + sum(statistics.median(m["ratios"]) for m in probe["maps"].values()))
        rounds = rounds_for(budget_s - 3 * per_round, per_round, plan)
    result = visualize_speed.measure(model, clip, plan.size, plan.size, plan.visualize_levels, rounds)
    rows = []
    for choice, m in result["maps"].items():
        ratio = statistics.median(m["ratios"])
        extra = statistics.median(m["extra_peak_shares"])
        rows.append({
            "part": f"Visualize Mask, {choice}",
            "configuration": (f"{dtype_name}, {plan.size}x{plan.size}, {plan.visualize_levels} noise levels, "
                              f"{rounds} rounds, plain {result['plain_s']:.2f} s"),
            "ratio": ratio, "ratio_min": min(m["ratios"]), "ratio_max": max(m["ratios"]), "peak_extra_share": extra,
            "plain_s": result["plain_s"], "goal": None,
            "result": (f"{ratio:.3f}x the plain model calls ({min(m['ratios']):.3f}-{max(m['ratios']):.3f}); "
                       f"peak {100 * extra:+.2f}%"),
            "met": None})
    return rows


def trainer_part(unet, clip, vae, dtype_name: str, plan: Plan, attention: str, work: Path,
                 deadline: float = math.inf) -> list[dict]:
    """trainer/train.py's train() at batch 1 and 2, without and with gradient checkpointing."""

    import comfy.ldm.modules.attention as comfy_attention
    import comfy.model_management as mm
    import trainer.base_model
    from maskattn_comfy.model_check import require_sdxl
    from trainer.config import build_config
    from trainer.demo import write_demo_dataset
    from trainer.distributed import World
    from trainer.train import prepare_data, train

    def random_sdxl(name, precision, cache_dir):  # stands in for trainer.base_model.load_checkpoint
        return trainer.base_model.BaseModel(
            unet.clone(), require_sdxl(unet), lambda: trainer.base_model.ComfyEncoders(vae, clip),
            ("vae:gpu-check-random-seed-0", "text:gpu-check-random-seed-0"),
            {"base_model": name, "base_model_sha256": "none (random weights)",
             "prediction": trainer.base_model.prediction_type(unet)})

    data = write_demo_dataset(work / "data", 4)
    warm, timed = plan.trainer_steps
    device = mm.get_torch_device()

    def config_for(batch, checkpointing):
        return build_config(dict(
            checkpoint="gpu-check-random-sdxl", data=str(data), output=str(work / f"b{batch}-gc{int(checkpointing)}"),
            cache_dir=str(work / "cache"), resolution=plan.trainer_resolution, batch_size=batch, grad_accum=1,
            steps=warm + timed, warmup_steps=0, save_every=warm + timed, keep_last=1, progress=False,
            tensorboard=False, gradient_checkpointing=checkpointing, cpu=device.type == "cpu",
            precision=dtype_name))

    saved = (trainer.base_model.load_checkpoint, comfy_attention.optimized_attention,
             comfy_attention.optimized_attention_masked)
    chosen = TRAINER_ATTENTION[attention]
    rows, longest = [], 0.0
    try:
        trainer.base_model.load_checkpoint = random_sdxl
        if chosen:
            comfy_attention.optimized_attention = comfy_attention.optimized_attention_masked = \
                getattr(comfy_attention, chosen)
        # Encode the images and captions once, so no configuration's peak holds the VAE's.
        first = config_for(1, False)
        prepare_data(first, random_sdxl(first.checkpoint, first.precision, first.cache_path), World(),
                     Path(first.output))
        free_memory()
        # Without checkpointing first: enabling it rewrites the UNet's blocks in place, for good.
        for checkpointing in (False, True):
            for batch in (1, 2):
                config = config_for(batch, checkpointing)
                what = f"batch {batch}, {'with' if checkpointing else 'no'} gradient checkpointing"
                where = (f"{dtype_name}, {plan.trainer_resolution} px, accumulation 1, {attention} attention, "
                         f"{warm}+{timed} steps")
                if time.perf_counter() + longest > deadline:
                    rows.append({"part": f"trainer, {what}", "configuration": where, "goal": None, "met": None,
                                 "result": "SKIPPED: would end past --deadline-s", "skipped": True})
                    continue
                peak = PeakMemory(device)
                config_started = time.perf_counter()
                try:
                    peak.start()
                    train(config, World())
                    peak_bytes, reserved = peak.stop()
                    records = [json.loads(line) for line in
                               (Path(config.output) / "metrics.jsonl").read_text().splitlines() if line.strip()]
                    step_s = [r["step_seconds"] for r in records if "step_seconds" in r][warm:]
                    skipped = sum(1 for r in records if "skipped" in r)
                    step = statistics.median(step_s)
                    rows.append({
                        "part": f"trainer, {what}", "configuration": where, "steps_per_s": 1 / step,
                        "step_s": step, "peak_mib": peak_bytes / 2**20, "reserved_mib": reserved / 2**20,
                        "skipped_steps": skipped, "goal": None, "met": None,
                        "result": (f"{1 / step:.2f} steps/s ({step:.3f} s/step); peak {peak_bytes / 2**30:.2f} GiB"
                                   + (f" allocated, {reserved / 2**30:.2f} GiB reserved" if reserved else
                                      " (process resident)")
                                   + (f"; {skipped} steps with non-finite gradients" if skipped else ""))})
                except Exception as error:  # one configuration failing (e.g. out of memory) is a row, not the end
                    rows.append(failed_row(f"trainer, {what}", where, error))
                finally:
                    free_memory()
                    longest = max(longest, time.perf_counter() - config_started)
    finally:
        trainer.base_model.load_checkpoint, comfy_attention.optimized_attention, \
            comfy_attention.optimized_attention_masked = saved
    return rows


class PeakMemory:
    """Peak GPU memory (allocated, reserved) over a stretch of code; on the CPU, the process's resident
    high-water mark (VmHWM, reset through /proc/self/clear_refs) and no reserved figure."""

    def __init__(self, device):
        self.device = device

    def start(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")

    def stop(self) -> tuple[int, int]:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024, 0


def failed_row(part: str, where: str, error: BaseException) -> dict:
    text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    print(f"[gpu_check] {part} failed: {text}", file=sys.stderr, flush=True)
    return {"part": part, "configuration": where, "result": f"FAILED: {text}", "goal": None, "met": False,
            "failed": True}


# -- the report ---------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = ["| part | configuration | result | goal | met |", "|---|---|---|---|---|"]
    for row in rows:
        goal = f"<= {row['goal']:g}x" if row.get("goal") else ""
        met = {True: "yes", False: "no", None: ""}[row.get("met")]
        lines.append(f"| {row['part']} | {row['configuration']} | {row['result'].replace('|', '/')} | {goal} | {met} |")
    return "\n".join(lines)


def environment(comfyui: Path, notes: list[str]) -> dict:
    import torch

    import comfy.ldm.modules.attention as comfy_attention
    import comfy.model_management as mm
    from maskattn_comfy import host

    device = mm.get_torch_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        name += f", {total:.0f} GiB"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "comfyui": host.comfyui_version(comfyui), "attention": comfy_attention.optimized_attention.__name__,
            "notes": notes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny SDXL-topology model on the CPU, seconds")
    parser.add_argument("--comfyui", help="the ComfyUI folder (default: as the trainer finds it)")
    parser.add_argument("--wheels", type=Path, help="a folder of pure-Python wheels to import from (torchsde, trampoline)")
    parser.add_argument("--trainer-attention", choices=sorted(TRAINER_ATTENTION), default="split",
                        help="ComfyUI attention for the trainer part (default split: no fused SDPA kernel)")
    parser.add_argument("--budget-s", type=float, help="seconds for the whole run (default 470; scales the parts)")
    parser.add_argument("--deadline-s", type=float, default=520,
                        help="skip what would start after this many seconds (default 520: the device tool's "
                             "600 s limit less the Python start and a margin)")
    parser.add_argument("--parts", nargs="+", choices=("sampling", "visualize", "trainer"),
                        default=["sampling", "visualize", "trainer"])
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.budget_s:
        scale = args.budget_s / (sum(plan.budget_s.values()) + plan.budget_s["sampling"] * (len(plan.dtypes) - 1))
        plan = Plan(**dict(plan.__dict__, budget_s={k: v * scale for k, v in plan.budget_s.items()}))
    started = time.perf_counter()

    sys.path.append(str(REPO))
    notes = prepare_imports(args.wheels)
    from maskattn_comfy import host

    try:
        comfyui = host.boot(args.comfyui, cpu=True if args.smoke else None)
    except ModuleNotFoundError as error:  # the GPU image lacks one of ComfyUI's requirements
        print(f"[gpu_check] ComfyUI cannot start here: {error}. Carry its pure-Python wheel in the --wheels "
              "folder (pip download --no-deps -d .device/whl NAME), or install it. " + " ".join(notes), file=sys.stderr)
        return 2
    sys.path.append(str(REPO / "benchmarks"))
    import torch

    import comfy.model_management as mm

    if args.smoke:
        torch.set_num_threads(1)  # tiny kernels; two OpenMP threads on a shared CPU wait on each other
    elif mm.get_torch_device().type != "cuda":
        print("no CUDA device: run with --smoke on the CPU", file=sys.stderr)
        return 2
    env = environment(comfyui, notes)
    print(f"[gpu_check] {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}, "
          f"ComfyUI {env['comfyui']}, ComfyUI attention {env['attention']}", flush=True)
    for note in notes:
        print(f"[gpu_check] {note}", flush=True)

    from maskattn_comfy.tiny_model import TINY_UNET_CONFIG

    fill_device = mm.get_torch_device()  # random weights are drawn where they are fastest to draw
    unet_config = TINY_UNET_CONFIG if args.smoke else SDXL_UNET_CONFIG
    rows, seconds = [], {}
    work = Path(tempfile.mkdtemp(prefix="maskattn-gpu-check-"))

    deadline = started + args.deadline_s

    def save():  # after every part, so a run cut short still leaves what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"environment": env, "smoke": args.smoke, "seconds": seconds,
                                             "total_s": time.perf_counter() - started,
                                             "trainer_attention": args.trainer_attention, "rows": rows},
                                            indent=1, default=str))

    def report(new_rows):
        rows.extend(new_rows)
        print(table(new_rows), flush=True)
        save()

    def part(name, fn, *fn_args, where=""):
        t0 = time.perf_counter()
        if t0 > deadline:
            report([{"part": name, "configuration": where, "result": f"SKIPPED: past --deadline-s {args.deadline_s:g}",
                     "goal": None, "met": None, "skipped": True}])
            return
        try:
            report(fn(*fn_args))
        except Exception as error:
            report([failed_row(name, where, error)])
        finally:
            free_memory()
            seconds[name] = time.perf_counter() - t0
            print(f"[gpu_check] {name}: {seconds[name]:.0f} s (total {time.perf_counter() - started:.0f} s)", flush=True)

    t0 = time.perf_counter()
    clip = random_clip(args.smoke, getattr(torch, DTYPES[plan.dtypes[0]]), 1, fill_device)
    vae = random_vae(args.smoke, 2, fill_device)
    unets = {}

    def unet_in(dtype_name):
        if dtype_name not in unets:
            if not plan.smoke:
                unets.clear()  # one full-size UNet in memory at a time
                free_memory()
            unets[dtype_name] = random_unet(unet_config, getattr(torch, DTYPES[dtype_name]), 0, fill_device)
        return unets[dtype_name]

    unet_in(plan.dtypes[0])
    seconds["build"] = time.perf_counter() - t0
    print(f"[gpu_check] random SDXL built in {seconds['build']:.0f} s "
          f"({sum(p.numel() for p in unets[plan.dtypes[0]].model.diffusion_model.parameters()) / 1e9:.2f} B UNet "
          f"parameters)", flush=True)

    for i, dtype_name in enumerate(plan.dtypes):
        if "sampling" in args.parts:
            part(f"sampling {dtype_name}", lambda d=dtype_name: sampling_part(unet_in(d), d, plan,
                                                                                  plan.budget_s["sampling"]),
                 where=dtype_name)
        if i == 0 and "visualize" in args.parts:
            part("visualize", lambda d=dtype_name: visualize_part(unet_in(d), clip, d, plan,
                                                                  plan.budget_s["visualize"]), where=dtype_name)
    if "trainer" in args.parts:
        from trainer.base_model import unet_dtype

        chosen = unet_dtype("auto")  # the trainer's default precision on this device
        dtype_name = next((k for k, v in DTYPES.items() if chosen is not None and getattr(torch, v) == chosen), "fp32")
        part("trainer", lambda: trainer_part(unet_in(dtype_name), clip, vae, dtype_name, plan, args.trainer_attention,
                                              work / "trainer", deadline), where=dtype_name)

    total = time.perf_counter() - started
    print(f"\nGPU check: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}, "
          f"ComfyUI {env['comfyui']}; sampling and Visualize Mask with ComfyUI's {env['attention']}, the trainer "
          f"with {args.trainer_attention} attention; {total:.0f} s in all ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")\n")
    print(table(rows), flush=True)
    save()
    return 1 if any(row.get("failed") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
