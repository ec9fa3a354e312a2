"""The trainer's gradients: where their size comes from, how they are measured, clipped, accumulated and averaged.

A small GateTrainer on the demo's tiny SDXL-topology UNet over a hand-made cache (random latents and
contexts), so every number can be recomputed another way.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from maskattn_comfy.model_check import require_sdxl
from maskattn_comfy.patch import MASK_KEY, apply_maskattn
from maskattn_core import GateSet, layer_name
from trainer.cache import FeatureCache, Item
from trainer.config import build_config
from trainer.distributed import World
from trainer.loop import GateTrainer, StepResult, gradient_norms
from trainer.demo import tiny_unet


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cached_examples(tmp_path_factory):
    """Four cached examples: latents [4,4,4] (32 px), 77-token contexts."""
    cache = FeatureCache(tmp_path_factory.mktemp("cache"))
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(4):
        cache.put("latents", f"l{i}", {"latent": torch.randn(4, 4, 4, generator=g),
                                       "size": torch.tensor([32, 32, 0, 0, 32, 32])})
        cache.put("text", f"t{i}", {"context": torch.randn(77, 2048, generator=g),
                                    "pooled": torch.randn(1280, generator=g)})
        items.append(Item(f"l{i}", f"t{i}", (4, 4)))
    return cache, items


def make_trainer(cached_examples, recorder=None, extra_patch=None, **settings):
    cache, items = cached_examples
    values = dict(demo=True, gate_hidden_dim=16, batch_size=1, grad_accum=1, warmup_steps=0, steps=10, lr=1e-3)
    values.update(settings)
    config = build_config(values)
    model = tiny_unet(0).clone()
    for p in model.model.parameters():
        p.requires_grad_(False)
    gate_set = GateSet.create(config.maskattn(), require_sdxl(model), seed=1)
    patched = apply_maskattn(model, gate_set, recorder=recorder)
    if extra_patch is not None:
        patched.set_model_attn2_patch(extra_patch)  # runs after MaskAttn's gate
    return GateTrainer(patched, gate_set, "eps", cache, items, config, World())


class MaskGradients:
    """A MaskAttnPatch recorder that keeps the gradient reaching each layer's additive mask."""

    def __init__(self):
        self.grads = {}

    def gate(self, key, probabilities, opened, extra_options):
        pass

    def attention(self, key, q, k, mask, heads, extra_options):
        mask.register_hook(lambda grad, key=layer_name(key): self.grads.__setitem__(key, grad.detach().clone()))


class LeafMasks:
    """An attn2 patch after MaskAttn's: each layer's mask becomes a leaf, so nothing upstream of it gets a gradient."""

    def __init__(self):
        self.leaves = {}

    def __call__(self, n, context, value, extra_options):
        if MASK_KEY in extra_options:
            leaf = extra_options[MASK_KEY].detach().requires_grad_(True)
            self.leaves[layer_name(extra_options["block"] + (extra_options["block_index"],))] = leaf
            extra_options[MASK_KEY] = leaf
        return n, context, value


# -- where the size comes from ------------------------------------------------------------------

def test_each_layers_mask_gradient_is_its_own_attention_path_not_compounded_through_later_gates(cached_examples):
    # The straight-through mask has slope 1e4 in the gate probability. Were it to carry the gradient
    # on into the hidden states that feed the gates, every gated layer would add a 1e4-scaled path to
    # all earlier layers' gradients: measured 1e13 over the demo UNet's 10 gated layers.
    recorder = MaskGradients()
    trainer = make_trainer(cached_examples, recorder=recorder, stage="all")
    loss, _ = trainer.micro_step_loss(0)
    loss.backward()

    leaves = LeafMasks()
    reference = make_trainer(cached_examples, extra_patch=leaves, stage="all")
    reference_loss, _ = reference.micro_step_loss(0)
    assert float(reference_loss.detach()) == float(loss.detach())  # the same forward pass
    reference_loss.backward()

    assert sorted(recorder.grads) == sorted(leaves.leaves) and len(recorder.grads) == 17  # SDXL's layout, tiny
    scale = max(float(leaf.grad.abs().max()) for leaf in leaves.leaves.values())
    assert 1e-4 < scale < 10.0
    for name, leaf in leaves.leaves.items():
        assert torch.allclose(recorder.grads[name], leaf.grad, rtol=1e-4, atol=1e-5 * scale), name
    # And so the gate parameters' gradient stays within a few orders of magnitude of the loss's.
    total, _ = gradient_norms({"all": trainer.params})
    assert 1e-3 < total < 1e5


# -- measuring and clipping --------------------------------------------------------------------

def test_norms_are_exact_in_float64_where_float32_squares_overflow():
    big = torch.full((1000,), 2.0 ** 68)  # 3e20: finite in float32, its square is not
    p = torch.nn.Parameter(torch.zeros(1000))
    p.grad = big.clone()
    assert not math.isfinite(float(torch.nn.utils.get_total_norm([p.grad])))  # what clip_grad_norm_ sees
    total, by_group = gradient_norms({"mid": [p]})
    assert total == pytest.approx(2.0 ** 68 * math.sqrt(1000), rel=1e-6) and by_group == {"mid": total}
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.tensor([3.0, 4.0, 0.0])
    total, by_group = gradient_norms({"mid": [p], "low": [q]})
    assert by_group["low"] == 5.0 and total == pytest.approx(math.hypot(2.0 ** 68 * math.sqrt(1000), 5.0), rel=1e-12)


def scale_gradients(trainer, factor, poison=False):
    """Hooks that multiply each gate gradient by `factor` (and put one inf in the first, with `poison`)."""
    raw = {}

    def hook(grad, index):
        grad = grad * factor
        if poison and index == 0:
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
        raw[index] = grad.detach().clone()
        return grad
    handles = [p.register_hook(lambda g, i=i: hook(g, i)) for i, p in enumerate(trainer.params)]
    return raw, handles


def test_a_finite_gradient_too_large_for_float32_squares_still_updates_clipped_in_its_direction(cached_examples):
    trainer = make_trainer(cached_examples, grad_clip=1.0)
    raw, _ = scale_gradients(trainer, 1e24)
    before = [p.detach().clone() for p in trainer.params]
    result = trainer.train_step()
    by_hand = math.sqrt(sum(float(g.double().norm()) ** 2 for g in raw.values()))
    assert by_hand > 1e20 and not result.skipped
    assert result.grad_norm == pytest.approx(by_hand, rel=1e-6)
    assert all(torch.isfinite(p).all() for p in trainer.params)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params))
    # Clipped to norm 1, each gradient in its own direction.
    clipped = [p.grad for p in trainer.params]
    assert math.sqrt(sum(float(g.double().norm()) ** 2 for g in clipped)) == pytest.approx(1.0, rel=1e-5)
    for index, g in enumerate(clipped):
        assert torch.allclose(g.double(), raw[index].double() / by_hand, rtol=1e-5, atol=1e-12)


def test_a_truly_non_finite_gradient_skips_the_update_and_keeps_the_schedule(cached_examples):
    trainer = make_trainer(cached_examples)
    scale_gradients(trainer, 1.0, poison=True)
    before = [p.detach().clone() for p in trainer.params]
    result = trainer.train_step()
    assert result.skipped and result.grad_norm == math.inf
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))
    assert trainer.step == 1 and trainer.scheduler.last_epoch == 1


def test_metrics_hold_the_gradient_norm_of_each_stage(cached_examples, tmp_path):
    from trainer.report import Report

    trainer = make_trainer(cached_examples, stage="all")
    result = trainer.train_step()
    assert sorted(result.grad_norm_by_stage) == ["high", "low", "mid"]
    by_hand = {stage: math.sqrt(sum(float(p.grad.double().norm()) ** 2 for p in trainer.gate_set.heads[stage].parameters()))
               for stage in ("high", "mid", "low")}
    # (grad holds the clipped gradient now: compare directions through the shares of the total)
    total = math.sqrt(sum(v * v for v in by_hand.values()))
    for stage, norm in result.grad_norm_by_stage.items():
        assert norm / result.grad_norm == pytest.approx(by_hand[stage] / total, rel=1e-5)
    assert math.sqrt(sum(v * v for v in result.grad_norm_by_stage.values())) == pytest.approx(result.grad_norm, rel=1e-12)

    report = Report(tmp_path, 0, 1, progress=False, tensorboard=False)
    report.step(1, result, True)
    report.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["grad_norm_by_stage"] == result.grad_norm_by_stage and record["grad_norm"] == result.grad_norm


# -- accumulation and the noise schedule -------------------------------------------------------

def test_accumulated_gradient_is_the_mean_of_the_micro_batches_by_its_norm(cached_examples):
    # AdamW and clipping hide a constant factor in the gradient; its norm does not.
    accumulated = make_trainer(cached_examples, grad_accum=2, stage="all").train_step()
    single = make_trainer(cached_examples, grad_accum=1, stage="all")
    micro = []
    for k in (0, 1):  # optimizer step 0 of the accumulating run consumes micro-batches 0 and 1
        single.optimizer.zero_grad(set_to_none=True)
        loss, _ = single.micro_step_loss(k)
        loss.backward()
        micro.append({name: p.grad.detach().double().clone() for name, p in single.gate_set.named_parameters()})
    mean = {name: (micro[0][name] + micro[1][name]) / 2 for name in micro[0]}
    by_hand = math.sqrt(sum(float(g.norm()) ** 2 for g in mean.values()))
    by_stage = {stage: math.sqrt(sum(float(g.norm()) ** 2 for name, g in mean.items() if name.startswith(f"heads.{stage}.")))
                for stage in ("high", "mid", "low")}
    assert accumulated.grad_norm == pytest.approx(by_hand, rel=1e-5)
    assert accumulated.grad_norm_by_stage == pytest.approx(by_stage, rel=1e-5)
    # Not the sum, not either micro-batch alone.
    one = [math.sqrt(sum(float(g.norm()) ** 2 for g in m.values())) for m in micro]
    assert all(abs(n / by_hand - 1) > 1e-2 for n in one) and by_hand < 0.99 * (one[0] + one[1])


def test_the_timestep_draw_covers_both_ends_of_the_schedule_uniformly(cached_examples):
    trainer = make_trainer(cached_examples)
    sigmas = trainer.patched.model.model_sampling.sigmas.float()
    draws = 20_000
    indices = []
    for micro_step in range(draws):
        _, sigma = trainer.sample_noise(micro_step, (1,), 1)
        indices.append(int(torch.argmin((sigmas - sigma[0]).abs())))
    indices = torch.tensor(indices)
    assert len(sigmas) == 1000
    assert int(indices.min()) == 0 and int(indices.max()) == 999  # P(missing an end) = (1 - 1/1000)^20000 = 2e-9
    # Uniform: the mean within 5 standard errors of 499.5, each tenth of the schedule within 5 sigma of 2000.
    assert abs(float(indices.double().mean()) - 499.5) < 5 * 288.7 / math.sqrt(draws)
    counts = torch.bincount(indices // 100, minlength=10)
    assert int((counts - draws / 10).abs().max()) < 5 * math.sqrt(draws * 0.1 * 0.9)
