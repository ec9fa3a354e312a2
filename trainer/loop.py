"""The training step: the ordinary noise-prediction loss of the frozen UNet, through the gates.

The gates run inside ComfyUI's attn2 hooks (maskattn_comfy.patch.apply_maskattn, the path the
MaskAttn Loader node uses) with straight-through gradients; only their parameters train.
Noise levels and inputs follow ComfyUI's model_sampling for the model type:
  x_t = x_0 + σ·ε,  UNet input x_t / sqrt(σ² + 1) = sqrt(ᾱ)·x_0 + sqrt(1 − ᾱ)·ε,
  target ε (epsilon models) or v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x_0 (v-prediction models).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from maskattn_core import parse_layer_name, stage_of

from .cache import FeatureCache, Item, load_batch
from .data import DataError, SizeConditioning, epoch_batches, sample_generator
from .distributed import World


def noisy_input_and_target(model_sampling, prediction: str, x0: torch.Tensor, noise: torch.Tensor,
                           sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the UNet's input, the regression target) for clean latents x0, noise ε and noise levels σ [B]."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    model_input = model_sampling.calculate_input(sigma, x0 + s * noise)
    if prediction == "eps":
        return model_input, noise
    return model_input, (noise - s * x0) / torch.sqrt(s * s + 1.0)


def sdxl_adm(model, pooled: torch.Tensor, sizes: list[SizeConditioning]) -> torch.Tensor:
    """SDXL's `y`: pooled text embedding + embeddings of original size, crop and target size, per sample."""
    rows = [model.encode_adm(pooled_output=pooled[i:i + 1], width=size.original[0], height=size.original[1],
                             crop_w=size.crop[0], crop_h=size.crop[1], target_width=size.target[0],
                             target_height=size.target[1])
            for i, size in enumerate(sizes)]
    return torch.cat(rows)


def noise_prediction_loss(patched, prediction: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                          context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE between the patched UNet's prediction and the target; gradients reach only the gates."""
    model = patched.model
    sampling = model.model_sampling
    unet = model.diffusion_model
    device = next(unet.parameters()).device
    dtype = model.manual_cast_dtype or model.get_dtype()
    x0, noise, sigma = x0.to(device), noise.to(device), sigma.to(device)
    model_input, target = noisy_input_and_target(sampling, prediction, x0, noise, sigma)
    options = dict(patched.model_options.get("transformer_options", {}))
    options["sigmas"] = sigma
    timestep = sampling.timestep(sigma).float()
    output = unet(model_input.to(dtype), timestep, context=context.to(device, dtype), y=y.to(device, dtype),
                  transformer_options=options)
    return F.mse_loss(output.float(), target.float())


def gated_model(unpatched, gate_set, config):
    """The frozen model with the gates to train, through the Loader's own patch path: the configured estimator
    (--straight-through) and, with --mask-loss, a RegionSupervision recorder on the gates."""
    from maskattn_comfy.patch import PatchOptions, apply_maskattn

    from .mask_loss import RegionSupervision

    recorder = RegionSupervision() if getattr(config, "mask_loss", 0.0) else None
    return apply_maskattn(unpatched, gate_set, PatchOptions(straight_through=getattr(config, "straight_through",
                                                                                     "paper")), recorder=recorder)


def read_hidden_states_as_constants(gate_set) -> None:
    """Each gate head takes the UNet's hidden states (its location input) as constants in the backward
    pass; its parameters still get the straight-through gradient. The forward pass is unchanged.

    The straight-through mask (1 - gate) * negative_value has slope |negative_value| = 1e4 in the
    gate probability. Left connected to the hidden states (as in the authors' code), that slope also
    carries the loss gradient from every gated layer into the hidden states that feed it, and so into
    every earlier gated layer: each such hop multiplied the gradient by 10-40 on the demo's UNet, the
    first of its 10 gated layers got 1e13 times the last one's, and SDXL's 50 overflow float32. A hard
    gate's true derivative in its input is zero; the surrogate stands in for it only at the gate's own
    parameters. Idempotent.
    """
    for head in gate_set.heads.values():
        if not hasattr(head, "feature_net"):  # not a gate head (the Shapes study's control trains through this loop)
            continue
        if not getattr(head.feature_net, "_maskattn_constant_input", False):
            head.feature_net.register_forward_pre_hook(lambda module, args: (args[0].detach(), *args[1:]))
            head.feature_net._maskattn_constant_input = True


def gradient_norms(groups: dict[str, list[torch.Tensor]]) -> tuple[float, dict[str, float]]:
    """(total, {group: norm}) L2 norms of the parameters' gradients, accumulated in float64.

    torch's float32 norm squares each value and overflows to inf above about 1.8e19, which would
    make a finite gradient look non-finite; every finite float32 gradient has a finite float64 norm.
    """
    by_group = {}
    for name, params in groups.items():
        squares = sum(float(torch.linalg.vector_norm(p.grad, dtype=torch.float64)) ** 2
                      for p in params if p.grad is not None)
        by_group[name] = math.sqrt(squares)
    return math.sqrt(sum(norm * norm for norm in by_group.values())), by_group


def clip_gradients(params, max_norm: float, total_norm: float) -> None:
    """Scale the gradients to `max_norm` when their norm exceeds it (as torch's clip_grad_norm_)."""
    coefficient = max_norm / (total_norm + 1e-6)
    if coefficient < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coefficient)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Linear warmup over `warmup_steps` optimizer steps, then cosine decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def enable_gradient_checkpointing(patched) -> None:
    """Recompute each UNet res block and spatial transformer in the backward pass instead of keeping
    its activations (less memory, about a third more compute). Idempotent."""
    from torch.utils.checkpoint import checkpoint
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepBlock

    for module in patched.model.diffusion_model.modules():
        if getattr(module, "_maskattn_checkpointed", False):
            continue
        if isinstance(module, TimestepBlock) and not isinstance(module, torch.nn.Sequential):
            module.forward = _checkpointed(module.forward, checkpoint)
        elif isinstance(module, SpatialTransformer):
            module.forward = _checkpointed_transformer(module.forward, checkpoint)
        else:
            continue
        module._maskattn_checkpointed = True


def _checkpointed(forward, checkpoint):
    return lambda *args: checkpoint(forward, *args, use_reentrant=False)


def _checkpointed_transformer(forward, checkpoint):
    def run(x, context=None, transformer_options={}, **kwargs):
        # ComfyUI sets keys like "block_index" while the block runs: the recomputation must start
        # from the dict as it was.
        snapshot = dict(transformer_options)

        def body(x, context):
            return forward(x, context, dict(snapshot), **kwargs)
        return checkpoint(body, x, context, use_reentrant=False)
    return run


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float
    data_seconds: float
    seconds: float
    skipped: bool = False  # non-finite gradients: no update was made
    grad_norm_by_stage: dict = field(default_factory=dict)  # before clipping, like grad_norm
    notes: list = field(default_factory=list)  # things to tell the user (a caption cut, once per caption)
    base_loss: float | None = None  # the frozen model's loss on the same batch without gates (--base-loss-every)
    mask_loss: float | None = None  # the region supervision's mean over the step's micro-batches (--mask-loss)


class GateTrainer:
    """AdamW on the gate parameters, fed in a deterministic order from the caches.

    Optimizer step k consumes micro-batches k·accum ... k·accum + accum − 1 of the global
    batch stream; rank r takes slots [r·b, (r+1)·b) of each. Every sample's noise and
    timestep come from (seed, micro-batch, slot), so neither resuming nor the number of
    ranks changes what is computed.
    """

    def __init__(self, patched, gate_set, prediction: str, cache: FeatureCache, items: list[Item], config,
                 world: World, unpatched=None):
        self.patched, self.gate_set, self.prediction = patched, gate_set, prediction
        self.unpatched = unpatched  # the same model without gates, for --base-loss-every
        self.cache, self.items, self.config, self.world = cache, items, config, world
        read_hidden_states_as_constants(gate_set)
        self.params = [p for p in gate_set.parameters()]
        head_stage = {head: stage_of(parse_layer_name(layer)) for layer, head in gate_set.layer_heads.items()}
        self.stage_params: dict[str, list] = {}
        for head_name, head in gate_set.heads.items():
            self.stage_params.setdefault(head_stage.get(head_name) or head_name, []).extend(head.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_cosine(config.warmup_steps, config.steps))
        self.step = 0
        self.global_batch = config.batch_size * world.size
        buckets = sorted({item.bucket for item in items})
        self.groups = [buckets.index(item.bucket) for item in items]
        self.batches_per_epoch = sum(self.groups.count(g) // self.global_batch for g in range(len(buckets)))
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(items)} usable examples cannot fill one batch of {self.global_batch} "
                             f"(batch size {config.batch_size} x {world.size} processes"
                             f"{', per aspect bucket' if len(buckets) > 1 else ''}); add images or lower --batch-size")
        self._epoch_cache: tuple[int, list] | None = None
        self._notes: list[str] = []
        self.mask_loss_weight = float(getattr(config, "mask_loss", 0.0))
        self.supervision = None
        if self.mask_loss_weight:
            from maskattn_comfy.patch import find_maskattn_patch

            from .mask_loss import RegionSupervision
            patch = find_maskattn_patch(patched)
            if patch is None or not isinstance(patch.recorder, RegionSupervision):
                raise ValueError("--mask-loss needs the gated model from trainer.loop.gated_model")
            self.supervision = patch.recorder
        self.last_mask_loss = None  # the last micro-batch's region supervision (a tensor), None when unsupervised
        self._cut_reported: set[str] = set()

    def micro_batch(self, micro_step: int) -> list[int]:
        """This rank's example indices for one micro-batch."""
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, epoch_batches(self.groups, self.global_batch, self.config.seed, epoch))
        batch = self._epoch_cache[1][index]
        b = self.config.batch_size
        return batch[self.world.rank * b:(self.world.rank + 1) * b]

    def sample_noise(self, micro_step: int, shape, count: int):
        """Noise [count, *shape] and noise levels σ [count] for this rank's slots of a micro-batch."""
        sampling = self.patched.model.model_sampling
        noises, sigmas = [], []
        for i in range(count):
            generator = sample_generator(self.config.seed, micro_step, self.world.rank * self.config.batch_size + i)
            t = int(torch.randint(0, len(sampling.sigmas), (1,), generator=generator))
            noises.append(torch.randn(tuple(shape), generator=generator))
            sigmas.append(sampling.sigmas[t].float().cpu())
        return torch.stack(noises), torch.stack(sigmas)

    def micro_step_loss(self, micro_step: int, model_patcher=None) -> tuple[torch.Tensor, float]:
        """The loss of one micro-batch through `model_patcher` (default: the gated model)."""
        started = time.perf_counter()
        indices = self.micro_batch(micro_step)
        cut = []
        raw, context, pooled, sizes = load_batch(self.cache, [self.items[i] for i in indices], cut)
        for item, before, after in cut:
            if item.text not in self._cut_reported:
                self._cut_reported.add(item.text)
                self._notes.append(f"the caption of {item.image or item.text} ({before} tokens) was cut to {after} "
                                   f"tokens to share a batch with a shorter one (ComfyUI pads a batch's captions to "
                                   f"at most 4x the shortest); said once per caption")
        model = self.patched.model
        x0 = model.process_latent_in(raw)
        y = sdxl_adm(model, pooled, sizes)
        noise, sigma = self.sample_noise(micro_step, x0.shape[1:], x0.shape[0])
        supervised = self.supervision is not None and model_patcher is None
        if supervised:
            from .mask_loss import load_regions
            self.supervision.begin(load_regions(self.cache, [self.items[i] for i in indices], cut))
        data_seconds = time.perf_counter() - started
        loss = noise_prediction_loss(model_patcher or self.patched, self.prediction, x0, noise, sigma, context, y)
        self.last_mask_loss = self.supervision.take() if supervised else None
        return loss, data_seconds

    def base_loss(self, step: int) -> float:
        """The frozen model's loss without gates on optimizer step `step`'s micro-batches, with the same noise
        and timesteps: the number the gated loss must get below for the gates to be helping."""
        accum = self.config.grad_accum
        with torch.no_grad():
            total = sum(float(self.micro_step_loss(step * accum + a, self.unpatched)[0]) for a in range(accum)) / accum
        return self.world.average_scalar(total)

    def train_step(self) -> StepResult:
        started = time.perf_counter()
        accum = self.config.grad_accum
        total, data_seconds, masked = 0.0, 0.0, []
        self.optimizer.zero_grad(set_to_none=False)
        for a in range(accum):
            loss, seconds = self.micro_step_loss(self.step * accum + a)
            objective = loss
            if self.last_mask_loss is not None:
                objective = loss + self.mask_loss_weight * self.last_mask_loss
                masked.append(float(self.last_mask_loss.detach()))
            (objective / accum).backward()
            total += float(loss.detach()) / accum
            data_seconds += seconds
        self.world.average_gradients(self.params)
        total = self.world.average_scalar(total)
        mask_loss = None
        if self.supervision is not None:  # every rank takes part in the average, supervised or not
            mask_loss = self.world.average_scalar(sum(masked) / len(masked) if masked else 0.0)
        every = getattr(self.config, "base_loss_every", 0)
        base = self.base_loss(self.step) if self.unpatched is not None and every and (self.step + 1) % every == 0 else None
        grad_norm, by_stage = gradient_norms(self.stage_params)
        lr = self.scheduler.get_last_lr()[0]
        finite = math.isfinite(grad_norm)  # float64: inf or NaN only when a gradient value is
        if finite:
            if self.config.grad_clip > 0:
                clip_gradients(self.params, self.config.grad_clip, grad_norm)
            self.optimizer.step()
        else:  # e.g. float16 overflow: skip the update, keep the schedule (as AMP's GradScaler does)
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        notes, self._notes = self._notes, []
        return StepResult(total, lr, grad_norm, data_seconds, time.perf_counter() - started, skipped=not finite,
                          grad_norm_by_stage=by_stage, notes=notes, base_loss=base, mask_loss=mask_loss)

    # -- state for checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "micro_step": self.step * self.config.grad_accum,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
