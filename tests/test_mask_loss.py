"""--mask-loss: region supervision of the gate probabilities of the words that name a masked object.

From a real folder (an image, its caption, an L-shaped mask in image.masks/) through the trainer's data path,
cache and gated model (the demo's tiny SDXL-topology UNet on ComfyUI's model patcher), against the loss
recomputed independently in float64 from the PNG, the recorded gate logits and block means by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from maskattn_shapes import world
from trainer.cache import FeatureCache, prepare
from trainer.config import build_config
from trainer.data import read_examples
from trainer.demo import DemoEncoders, demo_base_model
from trainer.distributed import World
from trainer.loop import GateTrainer, gated_model
from trainer.train import main

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTION = "a red circle on grey"  # the demo's encoder: column 1 + word index, so "red circle" is columns 2 and 3
COLUMNS = (2, 3)
TINY = ["--demo", "--resolution", "32", "--gate-hidden-dim", "16", "--batch-size", "1", "--grad-accum", "1",
        "--warmup-steps", "1", "--lr", "1e-3", "--no-progress", "--no-tensorboard"]


def l_shape(height=64, width=64) -> np.ndarray:
    """Asymmetric (its transpose differs), its edges off the 8-pixel latent cells: a wrong grid shows."""
    mask = np.zeros((height, width), bool)
    mask[5:45, 3:21] = True
    mask[29:45, 3:59] = True
    return mask


def write_example(folder, name="img", caption=CAPTION, masks=None, size=(64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(caption)
    for file_name, array in (masks if masks is not None else {"red_circle.png": l_shape() * np.uint8(255)}).items():
        (folder / f"{name}.masks").mkdir(exist_ok=True)
        Image.fromarray(array).save(folder / f"{name}.masks" / file_name)


def block_means(array: np.ndarray, step: int) -> np.ndarray:
    h, w = array.shape
    return array.reshape(h // step, step, w // step, step).mean(axis=(1, 3))


def test_the_mask_loss_is_the_bce_of_the_named_words_gates_against_the_mask_at_each_layers_grid(tmp_path):
    write_example(tmp_path / "data")
    examples, skipped = read_examples(str(tmp_path / "data"), "folder", None, 0, "skip")
    assert [e.masks[0].words for e in examples] == ["red circle"]  # the mask file is not a training image
    cache = FeatureCache(tmp_path / "cache")
    base = demo_base_model(seed=0)
    prepared = prepare(examples, cache, DemoEncoders, 64, False, "skip", skipped, DemoEncoders.identities)
    config = build_config(dict(demo=True, resolution=64, gate_hidden_dim=16, batch_size=1, grad_accum=1, stage="all",
                               mask_loss=1.0, warmup_steps=0))
    for p in base.patcher.model.parameters():
        p.requires_grad_(False)
    from maskattn_core import GateSet

    gates = GateSet.create(config.maskattn(), base.layer_channels, seed=1)
    with torch.no_grad():  # spread the gate logits so that where the mask lies changes the loss
        for head in gates.heads.values():
            head.feature_net[3].weight.mul_(4)
    kept = []
    for head in gates.heads.values():
        def logits(*args, _original=head.logits, **kwargs):
            out = _original(*args, **kwargs)
            kept.append(out.detach().double())
            return out
        head.logits = logits
    trainer = GateTrainer(gated_model(base.patcher, gates, config), gates, "eps", cache, prepared.items, config, World())
    trainer.micro_step_loss(0)
    ours = float(trainer.last_mask_loss.detach())
    assert trainer.last_mask_loss.requires_grad

    # By hand: the 64 px image is the training crop itself; the latent grid is 8x8 pixel blocks, a layer's
    # grid 2**level latent cells per side.
    latent = block_means(l_shape().astype(np.float64), 8)
    terms, grids, p_extreme = [], set(), 0.5
    for logits in kept:
        n = logits.shape[1]
        side = math.isqrt(n)
        grids.add(side)
        target = torch.from_numpy(block_means(latent, 8 // side).reshape(-1))
        for column in COLUMNS:
            p = torch.sigmoid(logits[0, :, column])
            p_extreme = min(p_extreme, float(p.min()), float(1 - p.max()))
            terms.append(float(-(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()))
    assert grids == {4, 2} and len(kept) == 17  # the tiny UNet's gated layers, at two resolutions
    reference = sum(terms) / len(terms)
    # float32 against float64: log p and log(1 - p) from a float32 p are off by at most 2^-24 / min(p, 1 - p)
    # each; the means and the BCE's own arithmetic add a few ulps per operation (under 100 of them).
    tolerance = 4 * 2.0 ** -24 / p_extreme + 100 * 2.0 ** -24
    assert abs(ours - reference) <= tolerance * reference, (ours, reference, tolerance)
    assert p_extreme > 1e-3  # the bound above stays meaningful


def test_bad_masks_are_left_out_and_counted_the_same_from_the_cache(tmp_path, capsys):
    data = tmp_path / "data"
    good = l_shape() * np.uint8(255)
    write_example(data, "good")
    write_example(data, "small", masks={"red_circle.png": good[:32, :32]})
    grey = good.copy()
    grey[0, 0] = 128
    write_example(data, "grey", masks={"red_circle.png": grey})
    write_example(data, "absent", masks={"blue_square.png": good})
    write_example(data, "broken", masks={})
    (data / "broken.masks").mkdir(exist_ok=True)
    (data / "broken.masks" / "red.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    counts = []
    for run in ("first", "cached"):
        code = main(TINY + ["--data", str(data), "--output", str(tmp_path / run), "--cache-dir", str(tmp_path / "cache"),
                            "--steps", "1", "--mask-loss", "1"])
        err = capsys.readouterr().err
        assert code == 0, err
        record = json.loads((tmp_path / run / "run.json").read_text())
        assert record["examples"] == 5  # every image trains; only its unusable mask is left out
        counts.append(record["skipped"])
        assert "mask left out: not the image's size" in err and "traceback" not in err.lower()
    assert counts[0] == counts[1] == {"mask left out: not the image's size": 1,
                                      "mask left out: not binary (only 0 and the maximum allowed)": 1,
                                      "mask left out: names words the caption does not hold": 1,
                                      "mask left out: unreadable": 1}
    assert "mask_loss" in json.loads((tmp_path / "first" / "metrics.jsonl").read_text().splitlines()[-1])


def test_an_edited_mask_makes_a_new_regions_entry_and_reencodes_no_image(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_example(data)
    args = TINY + ["--data", str(data), "--cache-dir", str(cache), "--steps", "1", "--mask-loss", "1"]
    assert main(args + ["--output", str(tmp_path / "a")]) == 0
    entries = sorted(cache.glob("regions/*/*.safetensors"))
    assert len(entries) == 1
    edited = l_shape()
    edited[50:60, 40:60] = True
    Image.fromarray(edited * np.uint8(255)).save(data / "img.masks" / "red_circle.png")
    capsys.readouterr()
    assert main(args + ["--output", str(tmp_path / "b")]) == 0
    assert "encoded 0 images and 0 captions, 1 and 1 from the cache" in capsys.readouterr().err
    assert len(sorted(cache.glob("regions/*/*.safetensors"))) == 2


def test_the_shapes_world_writes_each_objects_mask_for_its_colour_and_shape_words(tmp_path):
    folder = world.write_folder(tmp_path / "shapes", 6, seed=0, size=64)
    scenes = world.training_scenes(6, seed=0, size=64)
    for i, scene in enumerate(scenes):
        picture = np.asarray(Image.open(folder / f"{i:06d}.png")).astype(int)
        names = sorted(p.name for p in (folder / f"{i:06d}.masks").iterdir())
        assert names == sorted(f"{o.color}_{o.shape}.png" for o in scene.objects)
        for o in scene.objects:
            mask = np.asarray(Image.open(folder / f"{i:06d}.masks" / f"{o.color}_{o.shape}.png"))
            assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
            colour = (np.abs(picture - np.array(world.PALETTE[o.color])).sum(-1) == 0)  # fully covered pixels
            assert colour.sum() > 20 and (mask[colour] == 255).all()  # every pure pixel of the object is in
            assert not ((mask == 255) & (np.abs(picture - np.array(world.BACKGROUND)).sum(-1) == 0)).any()
    # and through the trainer's data path each mask supervises its object's colour and shape words
    examples, skipped = read_examples(str(folder), "folder", None, 0, "skip")
    cache = FeatureCache(tmp_path / "cache")
    prepared = prepare(examples, cache, DemoEncoders, 64, False, "skip", skipped, DemoEncoders.identities)
    assert len(prepared.items) == 6 and not skipped.counts
    for example, item in zip(examples, prepared.items):
        words = example.caption.lower().replace(",", " ").split()  # as the demo encoder splits it
        wanted = sorted(1 + words.index(w) for o in world.parse_caption(example.caption).objects for w in o)
        assert cache.get("regions", item.regions)["positions"].tolist() == wanted, example.caption
