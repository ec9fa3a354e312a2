"""The Shapes world's model: ComfyUI's own classes, the committed weights, and the committed gates at work."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COMFYUI, REPO
from maskattn_comfy.patch import PatchOptions, apply_maskattn
from maskattn_core import load_gate_file
from maskattn_shapes import model as shapes
from maskattn_shapes.evaluate import read_image
from maskattn_shapes.world import Prompt, render, scene_for

sys.path.append(str(REPO / "scripts"))
from headless import ComfyServer, to_api_format  # noqa: E402

PAIR = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def shapes_world():
    return shapes.load_shapes_checkpoint()


def sample(model, clip, vae, text, seed, steps=8):
    import comfy.sample

    context, pooled = shapes.encode_captions(clip, [text, ""])
    size = {"width": 128, "height": 128}
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    out = comfy.sample.sample(model, noise, steps, 5.0, "dpmpp_2m", "karras", [[context[:1], {"pooled_output": pooled[:1], **size}]],
                              [[context[1:], {"pooled_output": pooled[1:], **size}]], torch.zeros_like(noise),
                              disable_pbar=True, seed=seed)
    return (vae.decode(out)[0].numpy() * 255).round().astype(np.uint8)


def test_weights_are_small_and_8_bit():
    stored = {p.name: p.stat().st_size for folder in (shapes.WEIGHTS.parent, shapes.GATES) for p in folder.iterdir()}
    assert shapes.CONTROL.name in stored and len(stored) >= 6, stored
    assert sum(stored.values()) <= 30 * 10 ** 6, stored  # every committed weight of the world, 30 MB in all


def test_8_bit_storage_is_within_half_a_step_of_each_row():
    state = {"w": torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(0)), "b": torch.randn(64)}
    back = shapes.dequantize_state(shapes.quantize_state(state))
    step = state["w"].reshape(64, -1).abs().amax(1) / 127
    # half a step of rounding, plus the float16 scale's own rounding (2^-11 relative) over 127 steps
    error = (back["w"] - state["w"]).reshape(64, -1).abs().amax(1)
    assert (error <= step * (0.5 + 127 * 2 ** -11)).all() and (error > step * 0.3).all()
    assert torch.equal(back["b"], state["b"].half().float())


def test_the_codec_keeps_a_picture_of_flat_shapes():
    scene = scene_for(Prompt((("green", "triangle"), ("orange", "circle")), "above", "a green triangle above an orange circle"))
    pixels = torch.from_numpy(np.asarray(render(scene), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    codec = shapes.ShapesCodec()
    latent = codec.encode(pixels)
    assert latent.shape == (1, 4, 16, 16)
    background = torch.full_like(pixels, 0) + codec.background.view(1, 3, 1, 1)
    assert codec.encode(background).abs().max() < 1e-5  # the ground is the latent's zero
    decoded = ((codec.decode(latent)[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().byte().numpy()
    assert sorted((f.color, f.shape) for f in read_image(decoded)) == [("green", "triangle"), ("orange", "circle")]


def test_batched_caption_encoding_is_what_clip_text_encode_gives(shapes_world):
    _, clip, _ = shapes_world
    context, pooled = shapes.encode_captions(clip, [PAIR, ""])
    for i, text in enumerate([PAIR, ""]):
        one, one_pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        assert (one - context[i:i + 1]).abs().max() < 1e-4 and (one_pooled - pooled[i:i + 1]).abs().max() < 1e-4


def test_the_text_encoder_keeps_each_word_to_itself(shapes_world):
    """Base v2's "words" encoder: "circle" is the same token output after "red" and after "blue", and the
    colour words differ: a word-level mask on "red" removes red, not a trace of it left on "circle"."""
    _, clip, _ = shapes_world
    context, pooled = shapes.encode_captions(clip, ["a red circle", "a blue circle"])
    circle = 3  # start, "a", colour, "circle"
    assert (context[0, circle] - context[1, circle]).norm() < 1e-5 * context[0, circle].norm()
    assert (context[0, 2] - context[1, 2]).norm() > 0.5 * context[0, 2].norm()
    assert pooled.abs().max() == 0


def test_the_base_draws_the_prompted_shape(shapes_world):
    """Four seeds of three seen combinations: the committed base draws the prompted object in at least 8 of 12
    (9 here; its misses are unreadable shapes of the right colour; a base that ignores its words draws the
    prompted one of 21 combinations about 1 time in 21)."""
    model, clip, vae = shapes_world
    drawn = []
    for text, wanted in (("a green square", ("green", "square")), ("a red circle", ("red", "circle")),
                         ("a blue triangle", ("blue", "triangle"))):
        for seed in range(4):
            found = [(f.color, f.shape) for f in read_image(sample(model, clip, vae, text, seed=seed))]
            drawn.append((text, seed, wanted in found, found))
    assert sum(ok for _, _, ok, _ in drawn) >= 8, drawn


def test_the_committed_gates_change_the_sample_and_strength_0_does_not(shapes_world):
    model, clip, vae = shapes_world
    gates = load_gate_file(shapes.GATES / "shapes_gates.safetensors")
    plain = sample(model, clip, vae, PAIR, seed=3)
    gated = sample(apply_maskattn(model, gates, PatchOptions(strength=1.0)), clip, vae, PAIR, seed=3)
    off = sample(apply_maskattn(model, gates, PatchOptions(strength=0.0)), clip, vae, PAIR, seed=3)
    assert np.array_equal(off, plain)
    changed = np.abs(gated.astype(int) - plain.astype(int)).max(-1) > 24
    assert changed.mean() > 0.02, changed.mean()


def test_the_shapes_workflow_runs_on_a_real_server_with_the_shipped_gates(tmp_path):
    workflow = json.loads((REPO / "example_workflows" / "maskattn_shapes.json").read_text())
    with ComfyServer(COMFYUI, tmp_path) as server:
        info = server.get("/object_info")
        assert info["MaskAttnShapesCheckpoint"]["output"] == ["MODEL", "CLIP", "VAE"]
        assert "shapes_gates.safetensors" in info["MaskAttnLoader"]["input"]["required"]["gate_name"][1]["options"]
        api = to_api_format(workflow, info)
        for node in api.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = 6
            if node["class_type"] == "MaskAttnVisualize":
                node["inputs"]["noise_levels"] = 1
        result = server.run(api, timeout=600)
        assert result["status"]["status_str"] == "success", result["status"]
        images = [server.output / i["filename"] for out in result["outputs"].values() for i in out.get("images", [])]
        sample_png = next(p for p in images if p.name.startswith("MaskAttn_0"))
        picture = np.asarray(Image.open(sample_png).convert("RGB"))
        assert picture.shape == (128, 128, 3)
        assert read_image(picture), "the sample holds no shape the evaluator can read"


def test_temper_scales_every_cross_attention_logit_and_nothing_else(tmp_path):
    """maskattn_shapes.temper: the key projections of the 17 attn2 layers x factor, so each logit q.k is factor
    times what it was (checked on a layer's weights); every other tensor is the same; the written base reads back."""
    from maskattn_shapes import temper

    state = shapes.shapes_unet(seed=2).model.diffusion_model.state_dict()
    tempered = temper.temper(state, 0.25)
    scaled = [k for k in state if not torch.equal(state[k], tempered[k])]
    assert len(scaled) == 17 and all(k.endswith("attn2.to_k.weight") for k in scaled)
    key = scaled[0]
    q, context = torch.randn(3, state[key].shape[0]), torch.randn(5, state[key].shape[1])
    logits = q @ (context @ state[key].T).T
    assert torch.allclose(q @ (context @ tempered[key].T).T, 0.25 * logits, rtol=1e-5, atol=1e-6)
    source = tmp_path / "in.safetensors"
    shapes.save_base(source, state, {"steps": 1})
    assert temper.main([str(source), "0.25", str(tmp_path / "out.safetensors")]) == 0
    back, meta = shapes.read_base(tmp_path / "out.safetensors")
    assert json.loads(meta["provenance"])["tempered"]["attn2_key_scale"] == 0.25
    assert (back[key] - tempered[key]).abs().max() <= tempered[key].abs().max() / 100  # 8-bit storage
    with pytest.raises(SystemExit):
        temper.main([str(source), "0", str(tmp_path / "zero.safetensors")])
