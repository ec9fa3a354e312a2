"""The trainer's configuration: the paper's defaults, a TOML or YAML file, then flags.

Every field is a flag (`--field-name`) and a config-file key (`field_name`); later sources
win: defaults < `--demo` defaults < `--config FILE` < flags. The resolved configuration is
saved as YAML beside the outputs and can be passed back with `--config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from maskattn_core import GATES, STAGES, PLACEMENTS, MaskAttnConfig
from trainer.data import IMAGE_SUFFIXES

# Picture formats never read as captions: an image's own bytes would become its caption.
PICTURE_SUFFIXES = tuple(sorted(set(IMAGE_SUFFIXES) | {".gif", ".tif", ".tiff", ".avif", ".heic", ".jxl"}))
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the gates are float32


class ConfigError(ValueError):
    """A configuration value that is wrong; the message names it and what was expected."""


@dataclass(frozen=True)
class TrainConfig:
    # What to train on.
    checkpoint: str | None = None
    data: str | None = None
    data_format: str = "auto"            # auto | folder | jsonl | coco
    caption_extension: str = ".txt"      # a folder's caption files: image.png + image.txt (kohya also uses .caption)
    coco_images: str | None = None
    coco_min_noun_phrases: int = 2       # the paper's caption filter for COCO
    coco_instances: str | None = None    # COCO instances_*.json: object masks for --mask-loss
    output: str = "output/maskattn"
    name: str = "maskattn_gates"
    comfyui: str | None = None
    install: bool = False                # also write the final gates into ComfyUI's models/maskattn
    # The gates: MaskAttnConfig's fields, with its defaults (the paper's).
    stage: str = MaskAttnConfig.stage
    placement: str = MaskAttnConfig.placement
    threshold: float = MaskAttnConfig.threshold
    negative_value: float = MaskAttnConfig.negative_value
    gate_hidden_dim: int = MaskAttnConfig.gate_hidden_dim
    share_heads_by_stage: bool = MaskAttnConfig.share_heads_by_stage
    gate: str = MaskAttnConfig.gate
    gate_init_bias: float = 0.0          # the gate heads' initial logit bias (> 0: training starts with connections open)
    straight_through: str = "paper"      # paper | output: the hard gate's gradient estimator in training
    mask_loss: float = 0.0               # weight of the region supervision from object masks (0: off)
    # Optimisation (the paper's defaults).
    steps: int = 10000
    stop_at: int = 0                     # stop with a checkpoint after this step (0: at --steps); the schedule stays --steps long
    batch_size: int = 2
    grad_accum: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    seed: int = 42
    # Images.
    resolution: int = 512
    buckets: bool = False                # aspect-ratio buckets instead of a square centre crop
    # Precision and memory.
    precision: str = "auto"              # auto | fp32 | bf16 | fp16 of the frozen UNet (gates stay fp32); fp64 for CPU exactness checks
    gradient_checkpointing: bool = False
    cpu: bool = False
    # Never lose work.
    save_every: int = 500
    keep_last: int = 3
    resume: bool = False
    # Caches and bad input.
    cache_dir: str | None = None         # default: <output>/cache
    bad_images: str = "skip"             # skip | fail
    bad_captions: str = "skip"           # skip | fail
    # Telling the user.
    log_every: int = 1
    base_loss_every: int = 10            # also log the loss without gates on the same batch (0: off)
    progress: bool = True
    tensorboard: bool = True             # when the tensorboard package is installed
    validate_every: int = 0              # render validation samples every N steps (0: off)
    validate_prompts: tuple[str, ...] = ()  # default: the dataset's first 2 captions
    validate_sampler_steps: int = 8
    # The built-in demo.
    demo: bool = False
    demo_images: int = 24

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        suffix = self.caption_extension.strip().lstrip(".")
        if not suffix or any(c in suffix for c in "/\\*?"):
            raise ConfigError(f"caption_extension must be a file extension such as .txt or .caption, "
                              f"got {self.caption_extension!r}")
        if "." + suffix.lower() in PICTURE_SUFFIXES:
            raise ConfigError(f"caption_extension {self.caption_extension!r} is a picture format: each image would be "
                              "read as its own caption; captions are text files such as .txt or .caption")
        for name in ("lr", "weight_decay", "grad_clip", "gate_init_bias"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if abs(self.gate_init_bias) > FLOAT32_MAX:
            raise ConfigError(f"gate_init_bias must lie within float32's range (|bias| <= {FLOAT32_MAX:.8g}), "
                              f"got {self.gate_init_bias!r}")
        positive = ("steps", "batch_size", "grad_accum", "resolution", "save_every", "keep_last", "log_every",
                    "gate_hidden_dim", "demo_images")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.base_loss_every < 0:
            raise ConfigError(f"base_loss_every must be 0 (off) or a positive number of steps, got {self.base_loss_every}")
        if self.validate_every < 0:
            raise ConfigError(f"validate_every must be 0 (off) or a positive number of steps, got {self.validate_every}")
        if self.validate_sampler_steps <= 0:
            raise ConfigError(f"validate_sampler_steps must be a positive integer, got {self.validate_sampler_steps!r}")
        if any(not p.strip() for p in self.validate_prompts):
            raise ConfigError(f"validate_prompts must not hold empty prompts, got {list(self.validate_prompts)!r}")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8 (the VAE's factor), got {self.resolution}")
        if self.warmup_steps < 0 or self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"need warmup_steps >= 0, lr > 0, weight_decay >= 0, grad_clip >= 0; got "
                              f"{self.warmup_steps}, {self.lr}, {self.weight_decay}, {self.grad_clip}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.demo and (self.checkpoint is None or self.data is None):
            raise ConfigError("--checkpoint and --data are required (or --demo to try the built-in tiny model)")
        if self.straight_through == "output" and self.gate != "hard":
            raise ConfigError("straight_through output is an estimator for the hard gate; the soft gate has no "
                              "hard forward pass (use --gate hard, or --straight-through paper)")
        if not 0.0 <= self.mask_loss < math.inf:
            raise ConfigError(f"mask_loss must be 0 (off) or a positive finite weight, got {self.mask_loss!r}")
        try:
            self.maskattn()  # validates stage, threshold, negative_value, ...
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def maskattn(self) -> MaskAttnConfig:
        return MaskAttnConfig(stage=self.stage, placement=self.placement, threshold=float(self.threshold),
                              negative_value=float(self.negative_value), gate_hidden_dim=int(self.gate_hidden_dim),
                              share_heads_by_stage=bool(self.share_heads_by_stage), gate=self.gate)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output) / "cache"

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["betas"] = list(self.betas)
        values["validate_prompts"] = list(self.validate_prompts)
        return values


CHOICES = {"data_format": ("auto", "folder", "jsonl", "coco"), "precision": ("auto", "fp32", "bf16", "fp16", "fp64"),
           "bad_images": ("skip", "fail"), "bad_captions": ("skip", "fail"), "stage": tuple(STAGES),
           "placement": tuple(PLACEMENTS), "gate": tuple(GATES), "straight_through": ("paper", "output")}

# What `--demo` changes, unless a config file or a flag says otherwise: about a minute on a CPU.
DEMO_DEFAULTS = dict(resolution=64, batch_size=2, grad_accum=1, steps=100, warmup_steps=10, lr=1e-3,
                     gate_hidden_dim=32, save_every=25, output="output/maskattn_demo", name="maskattn_demo", cpu=True)


def read_config_file(path: str | Path) -> dict:
    """A TOML or YAML (or JSON) file of the same keys as the flags."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib
            values = tomllib.loads(text)
        else:
            import yaml
            values = yaml.safe_load(text) or {}
    except Exception as error:  # a parse error from either library, said in the user's terms
        raise ConfigError(f"cannot parse config file {path}: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}")
    return {str(key).replace("-", "_"): value for key, value in values.items()}


HELP = {
    "checkpoint": "the SDXL checkpoint (.safetensors): a path, or a name in ComfyUI's models/checkpoints",
    "data": "a folder of images with same-name caption files (--caption-extension), a .jsonl of {image, caption}, "
            "or COCO captions JSON",
    "data_format": "what --data is (auto: a folder, a .jsonl file, else COCO JSON)",
    "caption_extension": "the caption files' extension in a --data folder (kohya datasets often use .caption)",
    "coco_images": "the COCO image folder (for --data-format coco)",
    "coco_min_noun_phrases": "keep COCO captions with at least this many noun phrases, as the paper does (needs spaCy)",
    "coco_instances": "COCO instance annotations (instances_*.json, polygons or RLE) for --mask-loss: each category "
                      "named in a caption (name or plural) supervises those words' gates with its objects' mask",
    "output": "the run folder: gates, checkpoints, caches, metrics, the resolved config",
    "name": "the gate file's name (<output>/<name>.safetensors)",
    "comfyui": "the ComfyUI folder (default: COMFYUI_PATH, the ComfyUI holding this pack, or scripts/setup.sh's)",
    "install": "also copy the final gates into ComfyUI's models/maskattn",
    "stage": "which stage's cross-attention layers get gates",
    "placement": "gate the encoder's, the decoder's or both sides' layers of the stage",
    "threshold": "a connection is open where the gate probability exceeds this",
    "negative_value": "the logit added to closed connections",
    "gate_hidden_dim": "the gate head's hidden size",
    "share_heads_by_stage": "one gate head per stage (as the paper) instead of one per layer",
    "gate": "hard: the paper's hard gate, straight-through in training; soft: the ablation, attention weights "
            "scaled by the gate probability in both passes (the gate file records which, and the Loader follows it)",
    "gate_init_bias": "the gate heads' initial logit bias; e.g. 3 starts every connection open with probability 0.95 "
                      "(the paper: 0)",
    "straight_through": "the hard gate's gradient in training. paper: the authors' (through the mask's probabilities; "
                        "a closed connection gets none and never reopens); output: the forward pass unchanged, the "
                        "backward pass the soft gate's attention (closed connections get gradients; one more "
                        "attention per gated layer in training, none at inference)",
    "mask_loss": "weight of the region supervision (0: off): where the data has object masks (a folder's "
                 "<image>.masks/<words>.png, --coco-instances, the Shapes world's masks), the gate probabilities "
                 "of the words naming an object are pulled towards its mask at every gated layer (binary "
                 "cross-entropy); other words are left free",
    "steps": "optimizer steps; the learning-rate schedule spans them",
    "stop_at": "stop with a checkpoint after this step, keeping the --steps schedule (0: run to --steps)",
    "batch_size": "images per process per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "AdamW learning rate", "weight_decay": "AdamW weight decay", "betas": "AdamW betas",
    "warmup_steps": "linear warm-up steps before the cosine decay",
    "grad_clip": "clip the gates' gradient norm to this (0: off)",
    "seed": "seeds the gates, the data order, the noise and the timesteps",
    "resolution": "training side in pixels (centre crop, or the bucket area with --buckets)",
    "buckets": "aspect-ratio buckets instead of a square centre crop",
    "precision": "the frozen UNet's dtype (fp64 for exactness checks); gates stay fp32",
    "gradient_checkpointing": "recompute the UNet's blocks in the backward pass to save memory",
    "cpu": "train on the CPU even when a GPU is present",
    "save_every": "write a checkpoint every N steps", "keep_last": "keep the last N checkpoints",
    "resume": "continue from the newest complete checkpoint in --output",
    "cache_dir": "where encoded latents and text embeddings are cached (default: <output>/cache)",
    "bad_images": "skip (and count) or fail on unreadable, corrupt or oversized images and bad image entries",
    "bad_captions": "skip (and count) or fail on missing, empty or non-text captions",
    "base_loss_every": "every N steps also compute the frozen model's loss without gates on the same batch (same "
                       "noise and timesteps) and log it as loss_base: gates that help bring loss below it (0: off; "
                       "costs one forward pass every N steps)",
    "log_every": "write metrics every N steps", "progress": "show the progress bar",
    "tensorboard": "also log to TensorBoard when it is installed",
    "validate_every": "every N steps, render fixed-seed samples without and with the current gates, side by side, "
                      "and the Visualize Mask grid, as PNGs in <output>/validation/ (0: off). Keeps a CLIP and a VAE "
                      "offloaded on the CPU during training (only when on; --demo uses tiny random ones)",
    "validate_prompts": "prompts for --validate-every (default: the dataset's first 2 captions)",
    "validate_sampler_steps": "sampler steps of each validation sample (euler, cfg 5, at --resolution)",
    "demo": "train the tiny built-in model on a generated dataset (about a minute on a CPU)",
    "demo_images": "images in the --demo dataset",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a ConfigError like any other bad value, not a SystemExit from inside parse_config
        raise ConfigError(f"{message} (python trainer/train.py --help lists every option)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python trainer/train.py",
        description="Train MaskAttn gate heads for a frozen SDXL checkpoint on captioned images.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="a TOML or YAML file with the same keys as these flags")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = HELP[f.name]
        if "(default" not in text and default not in (None, ()):  # said once, by the text or here
            text += f" (default {' '.join(map(str, default)) if isinstance(default, tuple) else default})"
        if isinstance(default, bool):
            # BooleanOptionalAction appends its own "(default: ...)" when help holds no "%(default)": it is SUPPRESS here
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text.replace("%", "%%"))
        elif f.name == "betas":
            parser.add_argument(flag, type=float, nargs=2, metavar=("BETA1", "BETA2"), help=text)
        elif f.name == "validate_prompts":
            parser.add_argument(flag, nargs="+", metavar="PROMPT", help=text)
        elif f.name in CHOICES:
            parser.add_argument(flag, choices=CHOICES[f.name], help=text)
        else:
            kind = {int: int, float: finite_float32 if f.name == "gate_init_bias" else finite_float}.get(type(default), str)
            parser.add_argument(flag, type=kind, help=text)
    return parser


def finite_float(text: str) -> float:
    """A flag's number; NaN and infinities are refused while parsing, before any work."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def finite_float32(text: str) -> float:
    """A finite number a float32 parameter can hold."""
    value = finite_float(text)
    if abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"{text} is beyond float32's range (|value| <= {FLOAT32_MAX:.8g}): "
                                         "the gates are float32")
    return value


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    flags = vars(_parser().parse_args(argv))
    config_file = flags.pop("config", None)
    from_file = read_config_file(config_file) if config_file else {}
    demo = flags.get("demo", from_file.get("demo", False))
    values = dict(DEMO_DEFAULTS) if demo else {}
    values.update(from_file)
    values.update(flags)
    return build_config(values)


def build_config(values: dict) -> TrainConfig:
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
    typed = {}
    for name, value in values.items():
        default = known[name].default
        try:
            if name == "betas":
                value = tuple(float(b) for b in value)
            elif name == "validate_prompts":
                value = (str(value),) if isinstance(value, str) else tuple(str(p) for p in value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError("expected true or false")
            elif isinstance(default, int) and value is not None:
                if isinstance(value, float) and not value.is_integer():
                    raise TypeError("expected an integer")
                value = int(value)
            elif isinstance(default, float) and value is not None:
                value = float(value)
            elif value is not None:
                value = str(value)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{name}: {value!r} is not valid ({error})") from error
        typed[name] = value
    return TrainConfig(**typed)


def save_resolved(config: TrainConfig, path: Path) -> None:
    import yaml

    path.write_text("# The resolved trainer configuration; pass it back with --config.\n"
                    + yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def config_json(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)
