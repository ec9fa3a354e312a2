"""The study's control: the base given the extra training the gates got, without gates.

A low-rank update of the key and value projections of the gated stage's cross-attention, with
about as many parameters as that stage's gate heads, trained by the trainer's own loop (the
same data, loss, noise, timesteps, batches, steps and learning-rate schedule; `trainer/train.py`'s
flags) and applied through the same attn2 hooks the gates use. If gated sampling beats the base
and this does not, the gain is the gates', not the extra training's.

    python -m maskattn_shapes.control --checkpoint maskattn-shapes --data WORLD --stage high \\
        --resolution 128 --batch-size 8 --grad-accum 1 --lr 3e-4 --warmup-steps 50 --steps 1200 --cpu \\
        --output output/control --name shapes_control
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

CONTROL_KEY = "maskattn_control_inputs"
FORMAT = "maskattn-shapes-control"


class LowRankUpdate(nn.Module):
    """k + B_k A_k c and v + B_v A_v c for one attn2 layer; B starts at zero (the base exactly)."""

    def __init__(self, channels: int, token_dim: int, rank: int):
        super().__init__()
        self.key_down, self.value_down = nn.Linear(token_dim, rank, bias=False), nn.Linear(token_dim, rank, bias=False)
        self.key_up, self.value_up = nn.Linear(rank, channels, bias=False), nn.Linear(rank, channels, bias=False)
        nn.init.zeros_(self.key_up.weight)
        nn.init.zeros_(self.value_up.weight)

    def forward(self, k, v, context, value):
        return (k + self.key_up(self.key_down(context.to(k.dtype))),
                v + self.value_up(self.value_down(value.to(v.dtype))))


class ControlSet(nn.Module):
    """Updates by layer, grouped the way GateTrainer groups gate heads (`heads`, `layer_heads`)."""

    def __init__(self, stage: str, updates: dict[str, LowRankUpdate], rank: int):
        super().__init__()
        self.stage, self.rank = stage, rank
        self.heads = nn.ModuleDict({stage: nn.ModuleDict({name.replace(".", "_"): u for name, u in updates.items()})})
        self.layer_heads = {name: stage for name in updates}

    def update_for(self, name: str) -> LowRankUpdate | None:
        return self.heads[self.stage][name.replace(".", "_")] if name in self.layer_heads else None

    @classmethod
    def matching(cls, maskattn_config, layer_channels, token_dim: int = 2048, seed: int = 0) -> "ControlSet":
        """Rank chosen so the update has about as many parameters as gates of `maskattn_config` would."""
        from maskattn_core import GateSet, layer_name, select_layers

        layers = select_layers(layer_channels, maskattn_config)
        gate_parameters = GateSet.create(maskattn_config, layer_channels, token_dim).parameter_count()
        per_rank = sum(2 * (token_dim + int(layer_channels[key])) for key in layers)
        rank = max(1, round(gate_parameters / per_rank))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            updates = {layer_name(key): LowRankUpdate(int(layer_channels[key]), token_dim, rank) for key in layers}
        return cls(maskattn_config.stage, updates, rank)

    def save(self, path: Path, provenance: dict) -> Path:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"format": FORMAT, "stage": self.stage, "rank": str(self.rank),
                            "layers": json.dumps(sorted(self.layer_heads)), "provenance": json.dumps(provenance)})
        return path

    @classmethod
    def load(cls, path: Path) -> "ControlSet":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a Shapes control file (format {meta.get('format')!r})")
            state = {k: f.get_tensor(k).float() for k in f.keys()}
        stage, rank = meta["stage"], int(meta["rank"])
        updates = {}
        for name in json.loads(meta["layers"]):
            up = state[f"heads.{stage}.{name.replace('.', '_')}.key_up.weight"]
            down = state[f"heads.{stage}.{name.replace('.', '_')}.key_down.weight"]
            updates[name] = LowRankUpdate(up.shape[0], down.shape[1], rank)
        control = cls(stage, updates, rank)
        control.load_state_dict(state, strict=True)
        return control


class ControlPatch:
    """The attn2 patch keeps the text inputs of a controlled layer; the attn2 replace adds the update."""

    def __init__(self, control: ControlSet):
        self.control = control

    def __deepcopy__(self, memo):  # ModelPatcher.clone() copies model_options; the update is shared
        return self

    def _update(self, extra_options):
        from maskattn_core import LayerKey, layer_name

        block = extra_options.get("block")
        if not block:
            return None
        return self.control.update_for(layer_name(LayerKey(block[0], block[1], extra_options.get("block_index", 0))))

    def __call__(self, n, context, value, extra_options):
        if self._update(extra_options) is not None:
            extra_options[CONTROL_KEY] = (context, value)
        return n, context, value

    def attention(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as comfy_attention

        context, value = extra_options.pop(CONTROL_KEY)
        k, v = self._update(extra_options)(k, v, context, value)
        return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                   attn_precision=extra_options["attn_precision"],
                                                   transformer_options=extra_options)


def apply_control(model, control: ControlSet):
    """A clone of `model` with the control's updates on its cross-attention."""
    from maskattn_core import parse_layer_name

    patched = model.clone()
    patch = ControlPatch(control)
    patched.set_model_attn2_patch(patch)
    for name in control.layer_heads:
        patched.set_model_attn2_replace(patch.attention, *parse_layer_name(name))
    return patched


def train(config) -> Path:
    """Train a control with the trainer's configuration (`trainer.config.parse_config`); returns the written file."""
    from trainer.base_model import freeze, load_checkpoint
    from trainer.config import save_resolved
    from trainer.distributed import World
    from trainer.loop import GateTrainer
    from trainer.train import check_output, prepare_data

    from maskattn_comfy import host

    host.boot(config.comfyui, cpu=True if config.cpu else None)
    output, world = Path(config.output), World()
    check_output(output)
    save_resolved(config, output / "config.yaml")
    torch.manual_seed(config.seed)
    if config.demo and config.checkpoint is None:  # as trainer/train.py: the tiny built-in model and its shapes
        from trainer.base_model import PRECISIONS
        from trainer.demo import demo_base_model

        base = demo_base_model(seed=config.seed, dtype=PRECISIONS.get(config.precision, torch.float32))
    else:
        base = load_checkpoint(config.checkpoint, config.precision, config.cache_path)
    cache, prepared, _, _ = prepare_data(config, base, world, output)
    control = ControlSet.matching(config.maskattn(), base.layer_channels, seed=config.seed)
    freeze(base.patcher)
    patched = apply_control(base.patcher, control)
    trainer = GateTrainer(patched, control, base.provenance["prediction"], cache, prepared.items, config, world)
    parameters = sum(p.numel() for p in control.parameters())
    print(f"[control] rank {control.rank}, {parameters:,} parameters on {len(control.layer_heads)} layers, "
          f"{config.steps} steps", file=sys.stderr, flush=True)
    started = time.time()
    with open(output / "metrics.jsonl", "w") as metrics:
        while trainer.step < config.steps:
            result = trainer.train_step()
            if trainer.step % config.log_every == 0 or trainer.step == config.steps:
                metrics.write(json.dumps({"step": trainer.step, "loss": result.loss, "lr": result.lr,
                                          "grad_norm": result.grad_norm, "seconds": result.seconds}) + "\n")
                metrics.flush()
    provenance = {"steps": trainer.step, "minutes": round((time.time() - started) / 60, 1), "parameters": parameters,
                  "config": config.to_dict()}
    path = control.save(output / f"{config.name}.safetensors", provenance)
    print(f"[control] {path}", file=sys.stderr, flush=True)
    return path


def main(argv=None) -> int:
    """`train` with trainer/train.py's exits: 2 for bad flags, 1 for bad inputs, each one line."""
    from trainer.config import ConfigError, parse_config

    try:
        config = parse_config(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from maskattn_core import GateFileError
    from trainer.base_model import BaseModelError
    from trainer.checkpoints import CheckpointError
    from trainer.data import DataError
    from trainer.train import OutputError

    try:
        train(config)
    except (ConfigError, DataError, BaseModelError, CheckpointError, OutputError, GateFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
