"""MaskAttn stacked with what SDXL workflows put beside it, on real ComfyUI nodes and samplers: the core PAG
and SAG nodes (an extra model pass each, an attn1 replace each), a ControlNet, area and mask conditioning, a
LoRA, a second MaskAttn Loader, and a generic attention replace that MaskAttn cannot compose with."""

import pytest
import torch

import comfy.samplers
import nodes
from comfy_extras.nodes_pag import PerturbedAttentionGuidance
from comfy_extras.nodes_sag import SelfAttentionGuidance
from maskattn_comfy.patch import PatchConflictError, PatchOptions, apply_maskattn
from maskattn_comfy.tiny_model import TINY_UNET_CONFIG, build_sdxl_model, fill_, tiny_conditioning
from maskattn_core import save_gate_file
from test_loader import Recorder, ReferenceCheck, loader, sample, tiny_gates

pytestmark = pytest.mark.usefixtures("one_thread")


def run_node(cls, **inputs):
    """A core node's outputs, called as ComfyUI's executor calls it (V1 FUNCTION or V3 execute)."""
    if hasattr(cls, "FUNCTION"):
        return getattr(cls(), cls.FUNCTION)(**inputs)
    return tuple(cls.execute(**inputs).result)


@pytest.fixture(scope="module")
def tiny():
    return build_sdxl_model(seed=0)


@pytest.fixture(scope="module")
def gates(tiny):
    return tiny_gates(tiny, gain=10)


def without_maskattn(model_options):
    """The same model options with every attn2 hook removed (only MaskAttn sets attn2 hooks in these tests)."""
    transformer_options = dict(model_options["transformer_options"])
    transformer_options["patches"] = {k: v for k, v in transformer_options.get("patches", {}).items()
                                      if k != "attn2_patch"}
    transformer_options["patches_replace"] = {k: v for k, v in transformer_options.get("patches_replace", {}).items()
                                              if k != "attn2"}
    return dict(model_options, transformer_options=transformer_options)


class ModelPasses:
    """Wraps ComfyUI's calc_cond_batch (the one function every model pass goes through, PAG's and SAG's extra
    passes included) and, for each pass, runs the same pass again with MaskAttn's hooks removed."""

    def __init__(self, monkeypatch):
        self.real = comfy.samplers.calc_cond_batch
        self.passes = []
        monkeypatch.setattr(comfy.samplers, "calc_cond_batch", self)

    def __call__(self, model, conds, x_in, timestep, model_options):
        # The pass without the hooks first: SAG keeps the attention scores of the last pass it saw.
        ungated = self.real(model, conds, x_in, timestep, without_maskattn(model_options))
        out = self.real(model, conds, x_in, timestep, model_options)
        self.passes.append((len(conds), [o.clone() for o in out], ungated))
        return out

    def gate_effect(self, n_conds):
        """Per pass with `n_conds` conds: the largest change MaskAttn's hooks made to its output."""
        return [max(float((o - u).abs().max()) for o, u in zip(out, ungated))
                for n, out, ungated in self.passes if n == n_conds]


# -- PAG and SAG: extra passes --------------------------------------------------------------

def pag(model, scale=3.0):
    return run_node(PerturbedAttentionGuidance, model=model, scale=scale)[0]


def sag(model, scale=0.5, blur_sigma=2.0):
    return run_node(SelfAttentionGuidance, model=model, scale=scale, blur_sigma=blur_sigma)[0]


@pytest.mark.parametrize("guidance", [pag, sag], ids=["PAG", "SAG"])
def test_the_gates_act_in_the_extra_pass_of_pag_and_sag(tiny, gates, guidance, monkeypatch):
    passes = ModelPasses(monkeypatch)
    patched = guidance(apply_maskattn(tiny, gates))
    check = ReferenceCheck(patched)
    sample(patched, steps=2)
    # PAG's pass is the positive prompt alone, SAG's the negative alone (cond_or_uncond [0]: the index in that
    # pass's own list); both run with the sampler's model options, so MaskAttn's hooks gate them, and every
    # gated call is the masked attention computed by hand.
    assert [0] in check.layouts and [1, 0] in check.layouts
    check.assert_close(1e-5)
    extra, main = passes.gate_effect(1), passes.gate_effect(2)
    assert len(extra) == len(main) == 2  # one extra pass per step
    assert min(extra) > 1e-3 and min(main) > 1e-3


@pytest.mark.parametrize("guidance", [pag, sag], ids=["PAG", "SAG"])
def test_pag_and_sag_compose_with_the_loader_in_either_order(tiny, gates, guidance):
    loader_first = sample(guidance(apply_maskattn(tiny, gates)), steps=2)
    guidance_first = sample(apply_maskattn(guidance(tiny), gates), steps=2)
    assert torch.equal(loader_first, guidance_first)
    assert not torch.allclose(loader_first, sample(guidance(tiny), steps=2), atol=1e-3)
    assert not torch.allclose(loader_first, sample(apply_maskattn(tiny, gates), steps=2), atol=1e-3)
    # Gates that open every connection leave PAG's and SAG's own result exactly as it was.
    all_open = apply_maskattn(tiny, tiny_gates(tiny, bias=50.0))
    assert torch.equal(sample(guidance(all_open), steps=2), sample(guidance(tiny), steps=2))


# -- ControlNet ------------------------------------------------------------------------------

def tiny_controlnet_state_dict(seed=5):
    """A ControlNet of the tiny UNet's layout (ComfyUI's own cldm class), seeded, zero convs included."""
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in TINY_UNET_CONFIG.items()
              if k not in ("out_channels", "transformer_depth_output", "use_temporal_attention", "use_temporal_resblock")}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=torch.float32, device="cpu",
                                         operations=comfy.ops.disable_weight_init, **config)
    return fill_(control, seed).state_dict()


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    """Read back through ComfyUI's own ControlNet loader, which detects the layout from the file."""
    import comfy.controlnet
    import comfy.utils

    path = tmp_path_factory.mktemp("controlnet") / "tiny_controlnet.safetensors"
    comfy.utils.save_torch_file(tiny_controlnet_state_dict(), str(path))
    return comfy.controlnet.load_controlnet(str(path))


def with_controlnet(controlnet, strength=1.0, shape=(1, 4, 16, 16)):
    hint = torch.rand((1, shape[2] * 8, shape[3] * 8, 3), generator=torch.Generator().manual_seed(7))
    return run_node(nodes.ControlNetApplyAdvanced, positive=tiny_conditioning(seed=1),
                    negative=tiny_conditioning(seed=2), control_net=controlnet, image=hint, strength=strength,
                    start_percent=0.0, end_percent=1.0)


class GateCalls(Recorder):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def gate(self, key, probabilities, hard, extra_options):
        self.calls += 1


def test_controlnet_residuals_reach_the_gated_unet_and_its_own_encoder_stays_ungated(tiny, gates, controlnet):
    positive, negative = with_controlnet(controlnet)
    counted, plain_count = GateCalls(), GateCalls()
    gated = apply_maskattn(tiny, gates, recorder=counted)
    check = ReferenceCheck(gated)
    both = sample(gated, steps=2, positive=positive, negative=negative)
    check.assert_close(1e-5)
    sample(apply_maskattn(tiny, gates, recorder=plain_count), steps=2)
    # The ControlNet's copy of the encoder has cross-attention at the same keys (input 7, 8): ComfyUI calls it
    # without transformer_options, so the gates run once per gated UNet layer and model call, as without it.
    assert counted.calls == plain_count.calls == 2 * len(gates.layers)
    controlnet_alone = sample(tiny, steps=2, positive=positive, negative=negative)
    gates_alone = sample(apply_maskattn(tiny, gates), steps=2)
    assert not torch.allclose(both, controlnet_alone, atol=1e-3)
    assert not torch.allclose(both, gates_alone, atol=1e-3)
    all_open = apply_maskattn(tiny, tiny_gates(tiny, bias=50.0))
    assert torch.equal(sample(all_open, steps=2, positive=positive, negative=negative), controlnet_alone)


# -- area and mask conditioning ------------------------------------------------------------

class Shapes(Recorder):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def gate(self, key, probabilities, hard, extra_options):
        self.seen.setdefault(key[:2], set()).add(tuple(probabilities.shape))


def test_area_conditioning_gates_each_smaller_crop_at_its_own_size(tiny, gates):
    full = tiny_conditioning(seed=1, width=192, height=192)
    # 104 x 72 pixels at (64, 40): a 13 x 9 latent crop, sides that are not multiples of 64 pixels
    (area,) = run_node(nodes.ConditioningSetArea, conditioning=tiny_conditioning(seed=3), width=104, height=72,
                       x=64, y=40, strength=1.0)
    (positive,) = run_node(nodes.ConditioningCombine, conditioning_1=full, conditioning_2=area)
    negative = tiny_conditioning(seed=2, width=192, height=192)
    shapes = Shapes()
    patched = apply_maskattn(tiny, gates, recorder=shapes)
    check = ReferenceCheck(patched)
    out = sample(patched, steps=2, positive=positive, negative=negative, shape=(1, 4, 24, 24))
    check.assert_close(1e-5)
    # 24 x 24 latent -> 6 x 6 at input 7; the 9 x 13 crop -> 5 x 7 -> 3 x 4 (ComfyUI gives the negative prompt
    # the same area, so each size runs as a cond and uncond batch)
    assert shapes.seen[("input", 7)] == shapes.seen[("output", 2)] == {(2, 36, 77), (2, 12, 77)}
    plain = sample(tiny, steps=2, positive=positive, negative=negative, shape=(1, 4, 24, 24))
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-3)


@pytest.mark.parametrize("set_cond_area, crop_locations", [("default", 36), ("mask bounds", 6)])
def test_mask_conditioning_with_and_without_cropping_to_the_mask(tiny, gates, set_cond_area, crop_locations):
    mask = torch.zeros(192, 192)
    mask[40:104, 64:144] = 1.0  # latent rows 5..12, columns 8..17 -> 8 x 10 at the latent, 2 x 3 at input 7
    (masked,) = run_node(nodes.ConditioningSetMask, conditioning=tiny_conditioning(seed=3), mask=mask,
                         strength=1.0, set_cond_area=set_cond_area)
    (positive,) = run_node(nodes.ConditioningCombine, conditioning_1=tiny_conditioning(seed=1), conditioning_2=masked)
    shapes = Shapes()
    patched = apply_maskattn(tiny, gates, recorder=shapes)
    check = ReferenceCheck(patched)
    out = sample(patched, steps=2, positive=positive, shape=(1, 4, 24, 24))
    check.assert_close(1e-5)
    assert {locations for _, locations, _ in shapes.seen[("input", 7)]} == {36, crop_locations}
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, sample(tiny, steps=2, positive=positive, shape=(1, 4, 24, 24)), atol=1e-3)


# -- LoRA ------------------------------------------------------------------------------------

def tiny_lora(model, rank=4, seed=9):
    """A kohya-format LoRA (lora_up, lora_down, alpha) on every linear layer of the UNet's transformers,
    and the UNet's weights with it merged by hand: W + (alpha / rank) * up @ down."""
    generator = torch.Generator().manual_seed(seed)
    state = model.model.diffusion_model.state_dict()
    lora, merged = {}, dict(state)
    for name, weight in state.items():
        if "transformer_blocks" not in name or not name.endswith(".weight") or weight.ndim != 2:
            continue
        module = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
        up = 0.2 * torch.randn(weight.shape[0], rank, generator=generator)
        down = 0.2 * torch.randn(rank, weight.shape[1], generator=generator)
        lora.update({f"{module}.lora_up.weight": up, f"{module}.lora_down.weight": down,
                     f"{module}.alpha": torch.tensor(2.0)})
        merged[name] = weight + (2.0 / rank) * (up @ down)
    return lora, merged


@pytest.fixture
def lora_folder(tmp_path):
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    paths, exts = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)] + list(paths), exts)
    yield folder
    folder_paths.folder_names_and_paths["loras"] = (paths, exts)


def test_a_lora_loaded_before_or_after_the_loader_is_in_the_gated_output(tiny, gates, lora_folder):
    import comfy.utils

    lora, merged_weights = tiny_lora(tiny)
    comfy.utils.save_torch_file(lora, str(lora_folder / "tiny_lora.safetensors"))

    def with_lora(model):
        return run_node(nodes.LoraLoaderModelOnly, model=model, lora_name="tiny_lora.safetensors", strength_model=1.0)[0]

    lora_first = apply_maskattn(with_lora(tiny), gates)
    check = ReferenceCheck(lora_first)
    out = sample(lora_first, steps=2)
    check.assert_close(1e-5)
    assert torch.equal(sample(with_lora(apply_maskattn(tiny, gates)), steps=2), out)
    # the same gates on a model whose weights hold the LoRA merged by hand
    reference = sample(apply_maskattn(build_sdxl_model(state_dict=merged_weights), gates), steps=2)
    without_lora = sample(apply_maskattn(tiny, gates), steps=2)
    # ComfyUI's W + scale * (up @ down) and ours round differently (about 1e-7 of each weight), and two sampling
    # steps through the UNet carry that further on some CPUs than others; the LoRA itself moves the output by
    # more than 1e-2, so 1e-3 still tells "LoRA in the gated output" from "LoRA missing" with a 10x margin.
    assert (out - reference).abs().max() < 1e-3 * reference.abs().max()
    assert (without_lora - reference).abs().max() > 1e-2 * reference.abs().max()


# -- a second MaskAttn Loader ----------------------------------------------------------------

def test_a_second_loader_replaces_the_first_and_keeps_what_lies_between(pack, gate_folder, tiny):
    save_gate_file(tiny_gates(tiny, seed=1, gain=10, stage="all"), gate_folder / "all.safetensors")
    save_gate_file(tiny_gates(tiny, seed=2, gain=10), gate_folder / "mid.safetensors")
    first = loader(pack, tiny, "all.safetensors")
    second = loader(pack, pag(first), "mid.safetensors", end=0.5)
    alone = loader(pack, pag(tiny), "mid.safetensors", end=0.5)
    options = second.model_options["transformer_options"]
    assert len(options["patches"]["attn2_patch"]) == 1
    assert len(options["patches_replace"]["attn2"]) == len(tiny_gates(tiny).layers)  # mid only, not all
    out = sample(second, steps=2)
    assert torch.equal(out, sample(alone, steps=2))  # PAG kept, the first gates gone
    assert not torch.allclose(out, sample(pag(first), steps=2), atol=1e-3)


# -- what cannot compose ---------------------------------------------------------------------

def own_attention(q, k, v, extra_options):
    """Another pack's attn2 replace that computes attention its own way (not through ComfyUI's functions)."""
    batch, tokens, width = q.shape
    heads = extra_options["n_heads"]
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, tokens, width)


def test_a_generic_attn2_replace_on_a_gated_layer_stops_the_loader_with_its_name(pack, gate_folder, tiny):
    save_gate_file(tiny_gates(tiny), gate_folder / "mid.safetensors")
    other = tiny.clone()
    other.set_model_attn2_replace(own_attention, "output", 1, 0)
    with pytest.raises(PatchConflictError, match=r"output\.1\.0"):
        loader(pack, other, "mid.safetensors")
    # On a layer the gates leave alone it composes: the other replace runs there, the gates everywhere else.
    elsewhere = tiny.clone()
    elsewhere.set_model_attn2_replace(own_attention, "middle", 0, 0)
    patched = loader(pack, elsewhere, "mid.safetensors")
    check = ReferenceCheck(patched)
    sample(patched, steps=2)
    check.assert_close(1e-5)
    assert patched.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)] is own_attention


def test_strength_zero_after_a_generic_replace_is_no_conflict_and_no_change(tiny):
    other = tiny.clone()
    other.set_model_attn2_replace(own_attention, "input", 7, 0)
    off = apply_maskattn(other, tiny_gates(tiny), PatchOptions(strength=0.0))
    assert torch.equal(sample(off, steps=2), sample(other, steps=2))
