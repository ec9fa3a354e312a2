"""The soft gate (the ablation of the hard straight-through gate): weights scaled by p, in both passes."""

import math

import pytest
import torch

from maskattn_comfy.patch import MASK_KEY, PatchOptions, apply_maskattn
from maskattn_core import GateSet, MaskAttnConfig, load_gate_file, save_gate_file, soft_mask
from test_loader import ReferenceCheck, sample, tiny, tiny_gates  # noqa: F401  (tiny is a fixture)
from maskattn_comfy.tiny_model import build_sdxl_model
from trainer.loop import noise_prediction_loss, read_hidden_states_as_constants


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_the_soft_gate_multiplies_each_connections_weight_by_its_probability(tiny, strength):
    patched = apply_maskattn(tiny, tiny_gates(tiny, gain=10, gate="soft"), PatchOptions(strength=strength))
    check = ReferenceCheck(patched, strength)
    sample(patched, steps=2)
    check.assert_close(1e-5)


def test_soft_and_hard_gates_of_the_same_heads_give_different_samples(tiny):
    hard = sample(apply_maskattn(tiny, tiny_gates(tiny, gain=10)), steps=2)
    soft = sample(apply_maskattn(tiny, tiny_gates(tiny, gain=10, gate="soft")), steps=2)
    plain = sample(tiny, steps=2)
    assert (soft - plain).abs().max() > 1e-3 and (soft - hard).abs().max() > 1e-3


def test_uniform_soft_gates_leave_attention_unchanged(tiny):
    """Every connection at the same probability: the softmax renormalises the common factor away.

    Checked call by call, not after sampling: each gated attention output against the *unmasked*
    attention recomputed in float64 from the same q, k, v. One float32 attention is within a few
    ulps of float64 (relative ~1e-6 here); 1e-5 holds on any CPU. Comparing two samplers' outputs
    after several steps instead compounds each path's rounding through the UNet, by an amount that
    depends on the CPU's vector width (0.014 vs a fitted 0.009 on AVX-512)."""
    gates = tiny_gates(tiny, gain=0.0, bias=-2.0, gate="soft")
    for head in gates.heads.values():
        torch.nn.init.zeros_(head.feature_net[3].bias)
    patched = apply_maskattn(tiny, gates)
    check = ReferenceCheck(patched, 1.0)
    unmasked_errors, masks = [], []
    gated_attention = check.attention_hook

    def attention_hook(q, k, v, extra_options):
        mask = extra_options.get(MASK_KEY)
        out = gated_attention(q, k, v, extra_options)
        if mask is not None:
            masks.append(mask)
            plain = check.masked_attention(q, k, v, torch.ones(q.shape[0], q.shape[1], k.shape[1],
                                                               dtype=torch.float64), extra_options["n_heads"])
            unmasked_errors.append(float((out.double() - plain).abs().max() / plain.abs().max()))
        return out

    replaces = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    for key in [key for key, fn in replaces.items() if fn == gated_attention]:
        replaces[key] = attention_hook
    sample(patched, steps=2)
    # The mask is really there (log sigmoid(-2) = -2.127 on every connection), and it changes nothing.
    assert masks and all(torch.allclose(m, torch.full_like(m, math.log(1 / (1 + math.exp(2.0)))), atol=1e-6)
                         for m in masks)
    assert unmasked_errors and max(unmasked_errors) < 1e-5, max(unmasked_errors)
    check.assert_close(1e-5)


def test_soft_mask_is_log_probability_times_strength_floored_at_the_negative_value():
    logits = torch.tensor([[[-30000.0, -5.0, 0.0, 7.0]]])
    mask = soft_mask(logits, strength=0.5, negative_value=-10000.0)
    expected = (torch.nn.functional.logsigmoid(logits) * 0.5).clamp_min(-10000.0)
    assert mask.shape == (1, 1, 1, 4) and torch.equal(mask[:, 0], expected)
    assert mask[0, 0, 0, 0] == -10000.0 and abs(float(mask[0, 0, 0, 2]) - 0.5 * -0.6931472) < 1e-6


def test_a_nearly_closed_soft_connection_still_gets_a_gradient_a_hard_closed_one_does_not():
    """Why the ablation exists: under the hard gate a closed connection's softmax weight is exactly 0, so the
    straight-through gradient can never open it again; the soft gate keeps d log p / d logit = 1 - p."""
    g = torch.Generator().manual_seed(0)
    x0, noise, context, y = (torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g),
                             torch.randn(2, 77, 2048, generator=g), torch.randn(2, 2816, generator=g))
    model = build_sdxl_model(seed=0)
    for p in model.model.parameters():
        p.requires_grad_(False)
    closed_grads = {}
    for mode in ("hard", "soft"):
        gates = tiny_gates(model, gain=10, bias=-3.0, gate=mode)  # about 80 % of connections closed
        read_hidden_states_as_constants(gates)
        logits = []
        for head in gates.heads.values():
            head.logits = _keeping(head.logits, logits)
        noise_prediction_loss(apply_maskattn(model, gates), "eps", x0, noise, torch.tensor([0.5, 3.0]), context,
                              y).backward()
        grad = torch.cat([t.grad.flatten() for t in logits])
        closed = torch.cat([t.detach().flatten() for t in logits]) < 0
        assert 0.5 < float(closed.float().mean()) < 0.99
        closed_grads[mode] = grad[closed].abs()
    assert float(closed_grads["hard"].max()) == 0.0  # closed for good
    assert float((closed_grads["soft"] > 0).float().mean()) > 0.99


def _keeping(logits_fn, kept):
    def logits(*args, **kwargs):
        out = logits_fn(*args, **kwargs)
        out.retain_grad()
        kept.append(out)
        return out
    return logits


def test_the_gate_file_keeps_the_gate_and_hard_files_stay_readable_by_older_loaders(tiny, tmp_path):
    import json

    from safetensors import safe_open

    for mode in ("hard", "soft"):
        gates = tiny_gates(tiny, gain=10, gate=mode)
        path = save_gate_file(gates, tmp_path / f"{mode}.safetensors", dtype=torch.float16)
        with safe_open(str(path), "pt") as f:
            config = json.loads(f.metadata()["config"])
            assert f.get_tensor(f.keys()[0]).dtype == torch.float16
        assert ("gate" in config) == (mode == "soft")  # 0.1.0 refuses unknown keys; hard files carry none
        loaded = load_gate_file(path)
        assert loaded.config.gate == mode
        original = dict(gates.heads.state_dict())
        for name, tensor in loaded.heads.state_dict().items():
            assert torch.equal(tensor, original[name].to(torch.float16).float())
