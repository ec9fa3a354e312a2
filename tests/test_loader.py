"""MaskAttn Loader on a real ComfyUI: parity with the authors, identity when off, the sampler's corners."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import comfy.sample
import comfy.samplers
from comfy_kit import fixture_inputs, fixture_unet, run_unet
from maskattn_comfy.patch import (MASK_KEY, MaskAttnPatch, PatchOptions, apply_maskattn, find_maskattn_patch,
                                  is_maskattn_patch)
from maskattn_comfy.model_check import require_sdxl
from maskattn_comfy.tiny_model import build_sdxl_model, tiny_conditioning
from maskattn_core import GateSet, MaskAttnConfig
from test_core_parity import CASES, load_case

BACKENDS = ["pytorch", "split", "sub_quad", "basic"]


class Recorder:
    def __init__(self):
        self.hard, self.probabilities = {}, {}

    def gate(self, key, probabilities, hard, extra_options):
        self.probabilities[key], self.hard[key] = probabilities, hard

    def attention(self, key, q, k, mask, heads, extra_options):
        pass


def loader(pack, model, name, strength=1.0, start=0.0, end=1.0):
    return pack["MaskAttnLoader"].execute(model, name, strength, start, end).result[0]


def sample(model, seed=0, steps=3, cfg=5.0, positive=None, negative=None, shape=(1, 4, 16, 16)):
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    positive = positive or tiny_conditioning(shape[0], seed=1)
    negative = negative or tiny_conditioning(shape[0], seed=2)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative,
                               torch.zeros(shape), seed=seed, disable_pbar=True)


@pytest.fixture(scope="module")
def tiny():
    return build_sdxl_model(seed=0)


def tiny_gates(model, seed=1, bias=None, gain=1.0, **config):
    """Seeded gates for `model`; `gain` scales the MLPs' last layers, so gate logits spread away from 0."""
    gates = GateSet.create(MaskAttnConfig(gate_hidden_dim=16, **config), require_sdxl(model), seed=seed)
    with torch.no_grad():
        for head in gates.heads.values():
            if bias is not None:
                head.logit_bias.fill_(bias)
            head.feature_net[3].weight.mul_(gain)
            head.token_net[3].weight.mul_(gain)
    return gates


class ReferenceCheck:
    """Wraps a patched model's MaskAttn hooks and, at every gated call, recomputes by hand, in float64,
    from the hooks' own inputs and the gate heads' weights, the hard gate and the masked attention:
    closed connections keep (1 - strength) of their softmax weight (none at strength 1), rows with no
    open token keep their most probable one. Records each call's relative difference from the model's
    attention output, the mask's dtype straight after the gate hook, and the batch layouts seen."""

    def __init__(self, patched, strength=1.0):
        self.patch, self.strength = find_maskattn_patch(patched), strength
        options = patched.model_options["transformer_options"]
        hooks = options["patches"]["attn2_patch"]
        hooks[[i for i, hook in enumerate(hooks) if hook is self.patch][0]] = self.gate_hook
        replaces = options["patches_replace"]["attn2"]
        for key in [key for key, fn in replaces.items() if is_maskattn_patch(fn)]:
            replaces[key] = self.attention_hook
        self.errors, self.mask_dtypes, self.layouts, self.ambiguous, self.entries = [], set(), [], 0, 0

    def __deepcopy__(self, memo):  # ComfyUI copies model_options; the records must stay here
        return self

    def gate_hook(self, n, context, value, extra_options):
        out = self.patch(n, context, value, extra_options)
        if MASK_KEY in extra_options:
            self.mask_dtypes.add((extra_options[MASK_KEY].dtype, n.dtype))
            extra_options["reference_inputs"] = (n, context)
        return out

    def attention_hook(self, q, k, v, extra_options):
        mask = extra_options.get(MASK_KEY)
        out = self.patch.attention(q, k, v, extra_options)
        if mask is not None:
            n, context = extra_options.pop("reference_inputs")
            self.layouts.append(list(extra_options["cond_or_uncond"]))
            key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
            head = self.patch.gate_set.head_for(key)
            if self.patch.gate_set.config.gate == "soft":  # the ablation: each weight scaled by p ** strength
                scale = self.probabilities(head, n, context) ** self.strength
            else:
                opened = self.hard_gate(head, n, context, mask[:, 0] == 0)
                closed_weight = 1.0 - self.strength if self.strength < 1 else math.exp(self.patch.gate_set.config.negative_value)
                scale = torch.where(opened, 1.0, closed_weight)
            expected = self.masked_attention(q, k, v, scale, extra_options["n_heads"])
            self.errors.append(float((out.double() - expected).abs().max() / expected.abs().max()))
        return out

    @staticmethod
    def probabilities(head, n, context):
        def mlp(net, x):
            x = F.layer_norm(x.double(), net[0].normalized_shape, net[0].weight.double(), net[0].bias.double(), net[0].eps)
            return F.linear(F.silu(F.linear(x, net[1].weight.double(), net[1].bias.double())),
                            net[3].weight.double(), net[3].bias.double())

        with torch.no_grad():
            logits = mlp(head.feature_net, n) @ mlp(head.token_net, context).transpose(1, 2) / math.sqrt(head.hidden_dim)
            return torch.sigmoid(logits + head.logit_bias.double())

    def hard_gate(self, head, n, context, model_opened):
        probabilities = self.probabilities(head, n, context)
        threshold = self.patch.gate_set.config.threshold
        # Within 1e-5 of the threshold float32 and float64 may disagree: take the model's decision there.
        ambiguous = (probabilities - threshold).abs() < 1e-5
        self.ambiguous, self.entries = self.ambiguous + int(ambiguous.sum()), self.entries + ambiguous.numel()
        opened = torch.where(ambiguous, model_opened, probabilities > threshold)
        none_open = ~opened.any(-1, keepdim=True)
        return opened | (none_open & (probabilities == probabilities.amax(-1, keepdim=True)))

    def masked_attention(self, q, k, v, scale, heads):
        """Softmax attention with each connection's weight multiplied by `scale` [B,N,T], then renormalised."""
        (batch, locations, width), tokens = q.shape, k.shape[1]
        q, k, v = (t.double().reshape(batch, -1, heads, width // heads) for t in (q, k, v))
        scores = torch.einsum("bnhd,bthd->bhnt", q, k) / math.sqrt(width // heads)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * scale[:, None]
        weights = weights / weights.sum(-1, keepdim=True)
        return torch.einsum("bhnt,bthd->bnhd", weights, v).reshape(batch, locations, width)

    def assert_close(self, tolerance):
        assert self.errors, "no gated attention ran"
        assert max(self.errors) < tolerance, (max(self.errors), len(self.errors))
        assert self.ambiguous <= 1e-3 * self.entries, (self.ambiguous, self.entries)


# -- parity with the authors' implementation ----------------------------------------------

@pytest.mark.parametrize("attention_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", CASES)
def test_layer_cases_through_comfyui_attention(fixtures_dir, case, attention_backend):
    from comfy.ldm.modules.attention import CrossAttention

    tensors, meta, head = load_case(fixtures_dir, case)
    heads, dim_head = int(meta["heads"]), int(meta["dim_head"])
    channels = tensors["input.hidden_states"].shape[-1]
    layer = CrossAttention(channels, 2048, heads=heads, dim_head=dim_head)
    layer.load_state_dict({k[len("attn."):].replace("to_out.0", "to_out.0"): v
                           for k, v in tensors.items() if k.startswith("attn.")})
    gates = GateSet(MaskAttnConfig(gate_hidden_dim=head.hidden_dim), {"mid": head}, {"input.7.0": "mid"})
    recorder = Recorder()
    patch = MaskAttnPatch(gates, PatchOptions(), None, recorder)
    x, context = tensors["input.hidden_states"], tensors["input.encoder_hidden_states"]
    extra_options = {"block": ("input", 7), "block_index": 0, "n_heads": heads, "dim_head": dim_head,
                     "attn_precision": None}
    with torch.no_grad():
        n, context, value = patch(x, context, context, extra_options)
        out = layer.to_out(patch.attention(layer.to_q(n), layer.to_k(context), layer.to_v(value), extra_options))
    assert torch.equal(recorder.hard[("input", 7, 0)], tensors["expected.hard_gate"])
    assert (out - tensors["expected.output"]).abs().max() < 1e-5


def test_tiny_unet_with_official_checkpoint_through_the_loader_node(fixtures_dir, pack, gate_folder):
    tensors, y = fixture_inputs(fixtures_dir)
    model = fixture_unet(fixtures_dir)
    shutil.copy(fixtures_dir / "official_tiny_mid.pt", gate_folder / "official_tiny_mid.pt")
    patched = loader(pack, model, "official_tiny_mid.pt")
    args = (tensors["input.sample"], torch.tensor([500.0]), tensors["input.encoder_hidden_states"], y)
    plain_error = (run_unet(model, *args) - tensors["expected.sample_without_gates"]).abs().max()
    gated_error = (run_unet(patched, *args) - tensors["expected.sample"]).abs().max()
    assert plain_error < 1e-5, plain_error
    assert gated_error < 1e-4, gated_error
    assert (tensors["expected.sample"] - tensors["expected.sample_without_gates"]).abs().max() > 1e-2


def test_converted_checkpoint_gives_the_same_output(fixtures_dir, pack, gate_folder, tmp_path):
    from maskattn_core.convert import main as convert

    tensors, y = fixture_inputs(fixtures_dir)
    model = fixture_unet(fixtures_dir)
    assert convert([str(fixtures_dir / "official_tiny_mid.pt"), str(gate_folder / "converted.safetensors")]) == 0
    shutil.copy(fixtures_dir / "official_tiny_mid.pt", gate_folder / "official.pt")
    args = (tensors["input.sample"], torch.tensor([500.0]), tensors["input.encoder_hidden_states"], y)
    converted = run_unet(loader(pack, model, "converted.safetensors"), *args)
    official = run_unet(loader(pack, model, "official.pt"), *args)
    assert torch.equal(converted, official)


# -- off means off -------------------------------------------------------------------------

def test_all_open_gates_sample_exactly_like_the_unpatched_model(tiny):
    gates = tiny_gates(tiny, bias=50.0)
    assert torch.equal(sample(apply_maskattn(tiny, gates)), sample(tiny))


def test_strength_zero_is_the_unpatched_model_with_no_hooks(tiny):
    patched = apply_maskattn(tiny, tiny_gates(tiny), PatchOptions(strength=0.0))
    assert find_maskattn_patch(patched) is None
    assert torch.equal(sample(patched), sample(tiny))


def test_a_step_range_that_excludes_every_step_is_the_unpatched_model(tiny):
    patched = apply_maskattn(tiny, tiny_gates(tiny), PatchOptions(start_percent=1.0, end_percent=1.0))
    assert torch.equal(sample(patched), sample(tiny))


def test_gates_change_the_sample_and_strength_scales_the_change(tiny):
    gates = tiny_gates(tiny)
    plain = sample(tiny)
    full = sample(apply_maskattn(tiny, gates))
    half = sample(apply_maskattn(tiny, gates, PatchOptions(strength=0.5)))
    assert torch.isfinite(full).all()
    assert 0 < (half - plain).abs().mean() < (full - plain).abs().mean()


def test_step_range_gates_only_the_steps_inside_it(tiny):
    gates = tiny_gates(tiny)
    calls = []

    class Count(Recorder):
        def gate(self, key, probabilities, hard, extra_options):
            calls.append(float(extra_options["sigmas"].max()))

    sampling = tiny.get_model_object("model_sampling")
    patched = apply_maskattn(tiny, gates, PatchOptions(start_percent=0.5, end_percent=1.0), recorder=Count())
    sample(patched, steps=4, cfg=1.0)
    sigma_start = sampling.percent_to_sigma(0.5)
    assert calls and all(s <= sigma_start for s in calls)
    assert len(set(calls)) < 4


def test_end_percent_alone_gates_only_the_steps_before_it(tiny):
    sigmas_gated = []

    class Sigmas(Recorder):
        def gate(self, key, probabilities, hard, extra_options):
            sigmas_gated.append(float(extra_options["sigmas"].max()))

    steps = 4
    sampling = tiny.get_model_object("model_sampling")
    schedule = [float(s) for s in comfy.samplers.calculate_sigmas(sampling, "normal", steps)[:-1]]
    patched = apply_maskattn(tiny, tiny_gates(tiny), PatchOptions(end_percent=0.5), recorder=Sigmas())
    sample(patched, steps=steps, cfg=1.0)
    sigma_end = sampling.percent_to_sigma(0.5)
    assert sorted(set(sigmas_gated), reverse=True) == [s for s in schedule if s >= sigma_end]
    assert 0 < len(set(sigmas_gated)) < steps


# -- everything the sampler throws at attention ---------------------------------------------

@pytest.mark.parametrize("attention_backend", BACKENDS, indirect=True)
def test_each_backend_computes_the_masked_attention(tiny, attention_backend):
    patched = apply_maskattn(tiny, tiny_gates(tiny, gain=10))
    check = ReferenceCheck(patched)
    sample(patched, steps=2)
    check.assert_close(1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_half_precision_models(dtype, tolerance):
    model = build_sdxl_model(seed=0, dtype=dtype)
    recorder = Recorder()
    patched = apply_maskattn(model, tiny_gates(model, gain=10), recorder=recorder)
    check = ReferenceCheck(patched)
    out = sample(patched, steps=2)
    assert torch.isfinite(out).all()
    assert all(p.dtype == torch.float32 for p in recorder.probabilities.values())
    assert check.mask_dtypes == {(dtype, dtype)}  # built in the model's dtype by the gate hook itself
    check.assert_close(tolerance)


@pytest.mark.parametrize("strength", [0.3, 0.8, 1.0])
def test_strength_keeps_one_minus_strength_of_a_closed_connections_weight(tiny, strength):
    patched = apply_maskattn(tiny, tiny_gates(tiny, gain=10), PatchOptions(strength=strength))
    check = ReferenceCheck(patched, strength)
    sample(patched, steps=2)
    check.assert_close(1e-5)


def test_cond_and_uncond_run_separately_each_get_gates_from_their_own_context(tiny, monkeypatch):
    # Too little memory for both makes ComfyUI run cond and uncond as separate model calls, which share one
    # `sigmas` object.
    patched = apply_maskattn(tiny, tiny_gates(tiny, gain=10))
    check = ReferenceCheck(patched)
    monkeypatch.setattr(patched.model, "memory_required", lambda *args, **kwargs: float("inf"))
    sample(patched, steps=2)
    assert {tuple(layout) for layout in check.layouts} == {(0,), (1,)}
    check.assert_close(1e-5)


def test_the_token_cache_follows_the_context_tensor_not_only_the_step(tiny):
    gates = tiny_gates(tiny)
    patch = MaskAttnPatch(gates, PatchOptions(), sigma_range=None)
    key = gates.layers[0]
    g = torch.Generator().manual_seed(0)
    n = torch.randn(1, 16, gates.head_for(key).feature_dim, generator=g)
    sigmas = torch.ones(1)
    masks = []
    contexts = [torch.randn(1, 77, 2048, generator=g) for _ in range(2)]
    contexts.append(contexts[1].clone())
    with torch.no_grad():
        for context in contexts:
            extra_options = {"block": key[:2], "block_index": key[2], "sigmas": sigmas}
            patch(n, context, context, extra_options)
            masks.append(extra_options[MASK_KEY])
        contexts[2].mul_(-1)  # the same tensor changed in place
        extra_options = {"block": key[:2], "block_index": key[2], "sigmas": sigmas}
        patch(n, contexts[2], contexts[2], extra_options)
    expected = [torch.where(torch.sigmoid(gates.head_for(key).logits(n, c)) > 0.5, 0.0, -10000.0) for c in contexts]
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
    for mask, want in zip(masks[:2] + [extra_options[MASK_KEY]], expected):
        opened_rows = (want == 0).any(-1, keepdim=True)
        assert torch.equal(mask[:, 0].where(opened_rows.expand_as(want), want), want)


def test_batch_of_two_long_prompt_against_short_negative_non_square_latent(tiny):
    recorder = Recorder()
    patched = apply_maskattn(tiny, tiny_gates(tiny), recorder=recorder)
    positive = tiny_conditioning(2, tokens=154, seed=3)
    negative = tiny_conditioning(2, tokens=77, seed=4)
    # 72x40 pixels: 9x5 latent, sides that are not multiples of 64 pixels; the UNet rounds 5 -> 3 -> 2.
    out = sample(patched, positive=positive, negative=negative, shape=(2, 4, 9, 5))
    assert out.shape == (2, 4, 9, 5) and torch.isfinite(out).all()
    shapes = {key[:2]: tuple(p.shape) for key, p in recorder.probabilities.items()}
    assert shapes[("input", 7)] == (4, 3 * 2, 154)  # cond and uncond of two, LCM-repeated to 154 tokens
    assert shapes[("output", 2)] == (4, 3 * 2, 154)


def test_three_conds_in_one_batch(tiny):
    seen = []

    class Layout(Recorder):
        def gate(self, key, probabilities, hard, extra_options):
            seen.append(list(extra_options["cond_or_uncond"]))

    patched = apply_maskattn(tiny, tiny_gates(tiny, gain=10), recorder=Layout())
    check = ReferenceCheck(patched)
    two_positive = tiny_conditioning(1, seed=5) + tiny_conditioning(1, tokens=154, seed=6)
    sample(patched, positive=two_positive)
    assert max(len(layout) for layout in seen) == 3
    assert [1, 0, 0] in check.layouts or [0, 0, 1] in check.layouts, check.layouts[:3]
    check.assert_close(1e-5)


def test_gates_follow_the_activations_device_once_not_per_call(tiny):
    gates = tiny_gates(tiny)
    patched = apply_maskattn(tiny, gates)
    patch = find_maskattn_patch(patched)
    sample(patched, steps=2)
    heads = patch._heads_on(torch.device("cpu"))
    assert heads is gates.heads  # already on the device: used as they are
    meta = patch._heads_on(torch.device("meta"))
    assert meta is patch._heads_on(torch.device("meta")) and next(meta.parameters()).device.type == "meta"


def test_sampling_inside_inference_mode_as_the_server_runs_it(tiny):
    gates = tiny_gates(tiny)
    expected = sample(apply_maskattn(tiny, gates))
    with torch.inference_mode():
        assert torch.equal(sample(apply_maskattn(tiny, gates)), expected)


def test_v_prediction_sdxl_is_patched_like_the_base():
    model = build_sdxl_model(seed=0, v_prediction=True)
    import comfy.model_sampling

    assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    gates = tiny_gates(model)
    patched, plain = sample(apply_maskattn(model, gates), steps=2), sample(model, steps=2)
    assert torch.isfinite(patched).all() and not torch.equal(patched, plain)
    assert torch.equal(sample(apply_maskattn(model, tiny_gates(model, bias=50.0)), steps=2), plain)


# -- a gate file changed on disk -------------------------------------------------------------

def test_a_gate_file_rewritten_with_the_same_size_and_mtime_is_read_again(pack, gate_folder, tiny):
    import os

    from maskattn_comfy.folders import gate_fingerprint, load_gates
    from maskattn_core import save_gate_file

    path = save_gate_file(tiny_gates(tiny, seed=1), gate_folder / "swap.safetensors")
    stamp = path.stat()
    first, fingerprint = load_gates("swap.safetensors"), gate_fingerprint("swap.safetensors")
    assert load_gates("swap.safetensors") is first and gate_fingerprint("swap.safetensors") == fingerprint
    new = tiny_gates(tiny, seed=2)
    save_gate_file(new, path)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # as cp -p, rsync -t or unzip leave it
    assert path.stat().st_size == stamp.st_size
    assert gate_fingerprint("swap.safetensors") != fingerprint
    second = load_gates("swap.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(second.state_dict().values(), new.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), new.state_dict().values()))


def test_the_fingerprint_reads_a_file_once_while_its_stat_is_unchanged_and_old_enough(pack, gate_folder, tiny,
                                                                                      monkeypatch):
    import time
    from pathlib import Path

    from maskattn_comfy import folders
    from maskattn_core import save_gate_file

    save_gate_file(tiny_gates(tiny), gate_folder / "still.safetensors")
    reads = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real_read(self))
    fingerprints = {folders.gate_fingerprint("still.safetensors") for _ in range(3)}
    assert len(fingerprints) == 1 and len(reads) == 3  # just written: a change in the same clock tick would hide
    now = time.time_ns()
    monkeypatch.setattr(folders.time, "time_ns", lambda: now + 3_000_000_000)
    fingerprints |= {folders.gate_fingerprint("still.safetensors") for _ in range(3)}
    assert len(fingerprints) == 1 and len(reads) == 4
