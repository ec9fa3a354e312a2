"""--straight-through output: the paper's hard forward pass, the soft gate's backward pass.

On the tiny SDXL-topology model through ComfyUI's real model patcher and attention, with gates whose logits
spread far from 0 (most connections closed)."""

from __future__ import annotations

import math

import pytest
import torch

import maskattn_comfy.patch as patch_module
from maskattn_comfy.patch import PatchOptions, apply_maskattn
from maskattn_comfy.tiny_model import build_sdxl_model
from test_loader import tiny_gates
from trainer.config import ConfigError, build_config
from trainer.loop import read_hidden_states_as_constants

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x, context, y = (torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 77, 2048, generator=g),
                     torch.randn(2, 2816, generator=g))
    return x.to(dtype), torch.tensor([120.0, 700.0], dtype=dtype), context.to(dtype), y.to(dtype)


def unet_output(patched, dtype=torch.float32):
    x, t, context, y = batch(dtype)
    options = dict(patched.model_options["transformer_options"])
    return patched.model.diffusion_model(x, t, context=context, y=y, transformer_options=options)


@pytest.fixture(scope="module")
def frozen():
    models = {}
    for dtype in (torch.float32, torch.float64):
        model = build_sdxl_model(seed=0, dtype=dtype)
        for p in model.model.parameters():
            p.requires_grad_(False)
        models[dtype] = model
    return models


def keep_logits(gates, kept):
    """Each gate head's logits, kept with their gradient, in call order."""
    for head in gates.heads.values():
        def logits(*args, _original=head.logits, **kwargs):
            out = _original(*args, **kwargs)
            out.retain_grad()
            kept.append(out)
            return out
        head.logits = logits


def test_the_forward_pass_is_bit_identical_to_the_papers_estimator(frozen):
    model = frozen[torch.float32]
    outputs = {}
    for estimator in ("paper", "output"):
        gates = tiny_gates(model, gain=10, bias=-3.0)
        out = unet_output(apply_maskattn(model, gates, PatchOptions(straight_through=estimator)))
        assert out.requires_grad  # the gates are in the graph: the training path, not the inference one
        outputs[estimator] = out.detach()
    assert torch.equal(outputs["paper"], outputs["output"])


def test_a_closed_connection_gets_a_gradient_under_the_output_estimator_and_none_under_the_papers(frozen):
    model = frozen[torch.float32]
    closed_grads = {}
    for estimator in ("paper", "output"):
        gates = tiny_gates(model, gain=10, bias=-3.0)
        read_hidden_states_as_constants(gates)
        logits = []
        keep_logits(gates, logits)
        unet_output(apply_maskattn(model, gates, PatchOptions(straight_through=estimator))).square().mean().backward()
        grad = torch.cat([t.grad.flatten() for t in logits])
        closed = torch.cat([t.detach().flatten() for t in logits]) < 0  # p < 0.5, and not a row's argmax below
        opened_rows = torch.cat([(t.detach() > 0).any(-1, keepdim=True).expand_as(t).flatten() for t in logits])
        closed &= opened_rows
        assert 0.5 < float(closed.float().mean()) < 0.99
        closed_grads[estimator] = grad[closed].abs()
    assert float(closed_grads["paper"].max()) == 0.0  # the paper's: closed for good
    assert float((closed_grads["output"] > 0).float().mean()) > 0.99


def soft_attention(q, k, v, logits, heads):
    """An independent float64 attention under the soft gate: softmax(q k^T / sqrt(d) + log sigmoid(logits)) v."""
    b, n, width = q.shape
    d = width // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d) + torch.log(torch.sigmoid(logits))[:, None]
    return (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2).reshape(b, n, width)


def test_the_gradient_is_the_soft_attentions_computed_independently_in_float64(frozen, monkeypatch):
    model = frozen[torch.float64]
    gates = tiny_gates(model, gain=10, bias=-3.0)
    read_hidden_states_as_constants(gates)
    logits, calls = [], []
    keep_logits(gates, logits)
    original = patch_module.output_straight_through

    def recorded(q, k, v, heads, hard_mask, soft_mask, precision, extra_options):
        if q.requires_grad:  # the first gated layer's q depends on nothing trained
            q.retain_grad()
        out = original(q, k, v, heads, hard_mask, soft_mask, precision, extra_options)
        out.retain_grad()
        calls.append((q, k, v, heads, out))
        return out
    monkeypatch.setattr(patch_module, "output_straight_through", recorded)
    out = unet_output(apply_maskattn(model, gates, PatchOptions(straight_through="output")), torch.float64)
    assert out.dtype == torch.float64
    out.square().mean().backward()
    assert len(calls) == len(logits) == 10  # the tiny model's mid-stage layers
    checked_q = 0
    for (q, k, v, heads, y), gate_logits in zip(calls, logits):
        logits64 = gate_logits.detach().double().requires_grad_(True)
        q64 = q.detach().clone().requires_grad_(True)
        reference = soft_attention(q64, k.detach(), v.detach(), logits64, heads)
        reference.backward(y.grad)
        # The patch takes log p in float32 (the gate heads' dtype): |error| <= 2^-24 |log p| per logit, which moves
        # each softmax weight, and so each gradient, by at most 2x that relatively; the logits' gradient is then
        # rounded to float32 (2^-24), and its 1 - p factor computed in float32 (a few ulps). 8 ulps covers the sum.
        ulp = 2.0 ** -24
        worst_log_p = float(torch.nn.functional.logsigmoid(logits64.detach()).abs().max())
        tolerance = 8 * ulp * (1 + worst_log_p)
        pairs = [(gate_logits.grad.double(), logits64.grad)] + ([(q.grad, q64.grad)] if q.requires_grad else [])
        checked_q += len(pairs) - 1
        for ours, theirs in pairs:
            scale = float(theirs.abs().max())
            assert scale > 0
            assert float((ours - theirs).abs().max()) <= tolerance * scale, (float((ours - theirs).abs().max()) / scale,
                                                                             tolerance)
        # and not the hard attention's gradient: the closed connections' share is far from zero
        closed = logits64.detach() < 0
        assert float(logits64.grad[closed].abs().max()) > 1e-3 * float(logits64.grad.abs().max())
    assert checked_q == len(calls) - 1


def test_without_gradients_the_output_estimator_costs_nothing(frozen, monkeypatch):
    """The Loader's path (sampling, no autograd) never computes the soft attention, whatever the option says."""
    model = frozen[torch.float32]
    called = []
    monkeypatch.setattr(patch_module, "output_straight_through", lambda *args: called.append(1))
    outputs = []
    for estimator in ("paper", "output"):
        with torch.no_grad():
            outputs.append(unet_output(apply_maskattn(model, tiny_gates(model, gain=10, bias=-3.0),
                                                      PatchOptions(straight_through=estimator))))
    assert not called and torch.equal(*outputs)


def test_the_option_is_checked():
    with pytest.raises(ValueError, match="straight_through must be one of"):
        PatchOptions(straight_through="soft")
    with pytest.raises(ConfigError, match="estimator for the hard gate"):
        build_config(dict(demo=True, gate="soft", straight_through="output"))
    assert build_config(dict(demo=True)).straight_through == "paper"  # the paper's estimator stays the default
