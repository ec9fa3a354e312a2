"""The shapes world and its evaluator: deterministic pictures, captions that mean their scenes,
a clean split, and a reader that scores the generator's own pictures (crisp, and as an 8x latent
would leave them) and catches wrong ones."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import numpy as np
import pytest

from maskattn_shapes import evaluate, world
from maskattn_shapes.world import HELDOUT_COMBOS, KINDS, Obj, Scene


def test_same_seed_writes_identical_files_and_another_seed_differs(tmp_path):
    first = world.write_folder(tmp_path / "a", 12, seed=0)
    again = world.write_folder(tmp_path / "b", 12, seed=0)
    other = world.write_folder(tmp_path / "c", 12, seed=1)
    names = sorted(p.name for p in first.iterdir() if p.is_file())
    assert len(names) == 2 * 12 + 1 and names[:2] == ["000000.png", "000000.txt"]
    masks = sorted(str(p.relative_to(first)) for p in first.glob("*.masks/*.png"))  # tests/test_mask_loss.py reads them
    assert len(masks) >= 12
    assert all((first / n).read_bytes() == (again / n).read_bytes() for n in names + masks)
    assert sum((first / n).read_bytes() != (other / n).read_bytes() for n in names if n.endswith(".png")) >= 10
    described = json.loads((first / "world.json").read_text())
    assert (described["n"], described["seed"]) == (12, 0)
    assert [tuple(c) for c in described["heldout_combos"]] == list(HELDOUT_COMBOS)
    assert len(described["heldout_pairings"]) == len(world.HELDOUT_PAIRINGS) > 0


def test_scene_i_does_not_depend_on_how_many_are_drawn():
    assert world.training_scenes(5, seed=7) == world.training_scenes(40, seed=7)[:5]


def test_every_caption_and_prompt_parses_back_to_its_spec():
    scenes = world.training_scenes(500, seed=3)
    assert all(world.parse_caption(s.caption) == s.prompt for s in scenes)
    for phrasing in (" to the left of ", " is left of ", " on its left", ", and "):
        assert any(phrasing in s.caption for s in scenes), phrasing
    for kind in KINDS:
        for prompt in world.heldout_prompts(60, seed=0, kind=kind):
            assert world.parse_caption(prompt.text) == prompt
    spec = world.parse_caption("a blue square with an orange circle on its left")
    assert spec.objects == (("orange", "circle"), ("blue", "square")) and spec.relation == "left of"
    with pytest.raises(ValueError, match="a pink circle"):
        world.parse_caption("a pink circle")
    with pytest.raises(ValueError, match="repeat a colour or a shape"):
        world.parse_caption("a red circle and a red square")


def test_heldout_combos_and_pairings_never_occur_in_training():
    scenes = world.training_scenes(3000, seed=0)
    combos = {(o.color, o.shape) for s in scenes for o in s.objects}
    assert combos == set(world.SEEN_COMBOS) and not combos & set(HELDOUT_COMBOS)
    heldout_pairings = set(world.HELDOUT_PAIRINGS)
    spatial = [s for s in scenes if s.relation in world.SPATIAL]
    assert len(spatial) > 1000
    assert not any(world.pairing(s.prompt.objects[0], s.relation, s.prompt.objects[1]) in heldout_pairings
                   for s in spatial)

    for kind in ("single", "pair", "triple"):
        assert all(set(p.objects) & set(HELDOUT_COMBOS) for p in world.heldout_prompts(100, seed=0, kind=kind))
    for prompt in world.heldout_prompts(200, seed=0, kind="relation"):
        assert not set(prompt.objects) & set(HELDOUT_COMBOS)
        assert world.pairing(prompt.objects[0], prompt.relation, prompt.objects[1]) in heldout_pairings
    singles = [p.objects for p in world.heldout_prompts(10, seed=5, kind="single")]
    assert sorted(set(singles)) == sorted((c,) for c in HELDOUT_COMBOS) and max(map(singles.count, singles)) == 3
    assert world.heldout_prompts(30, seed=5, kind="pair") == world.heldout_prompts(30, seed=5, kind="pair")


def test_objects_fit_apart_and_relations_hold_with_a_margin():
    for scene in world.training_scenes(600, seed=2):
        colors, shapes = zip(*scene.prompt.objects)
        assert len(set(colors)) == len(colors) and len(set(shapes)) == len(shapes)
        for o in scene.objects:
            assert 36 <= o.extent <= 52
            assert o.extent / 2 <= min(o.cx, o.cy) and max(o.cx, o.cy) <= 128 - o.extent / 2
        for a, b in itertools.combinations(scene.objects, 2):
            assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - (a.extent + b.extent) / 2 >= world.MIN_GAP
        if scene.relation in world.SPATIAL:
            a, b = scene.objects
            assert world.relation_holds(a, b, scene.relation)
            assert not world.relation_holds(b, a, scene.relation)


def test_palette_colours_are_far_apart_and_from_the_background():
    colours = np.array([world.PALETTE[c] for c in world.COLORS] + [world.BACKGROUND], float)
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert gaps[~np.eye(len(colours), dtype=bool)].min() > 90


@pytest.mark.parametrize("degraded, noise_sd", [(False, 0), (True, 0), (True, 16)],
                         ids=["crisp", "through-8x-latent", "through-8x-latent-noisy"])
def test_evaluator_reads_the_generators_pictures(degraded, noise_sd):
    result = evaluate.validate(200, seed=11, degraded=degraded, noise_sd=noise_sd)
    assert result["exact"] >= 0.98, [(s.caption, r) for s, r in result["failures"][:3]]


def _scene(*objects, relation=None):
    prompt_objects = tuple((o.color, o.shape) for o in objects)
    return Scene(objects, relation, world.caption(prompt_objects, relation))


def _read(scene, degraded=True):
    pixels = np.asarray(world.render(scene))
    return evaluate.read_image(evaluate.through_latent(pixels) if degraded else pixels)


RED_CIRCLE = Obj("red", "circle", 32, 64, 44)
BLUE_SQUARE = Obj("blue", "square", 96, 64, 44)


def test_a_faithful_picture_scores_exact_and_its_objects_are_read():
    scene = _scene(RED_CIRCLE, BLUE_SQUARE, relation="left of")
    found = _read(scene)
    assert {(f.color, f.shape) for f in found} == {("red", "circle"), ("blue", "square")}
    circle = next(f for f in found if f.shape == "circle")
    assert abs(circle.cx - 32) <= 2 and abs(circle.cy - 64) <= 2 and abs(circle.area - np.pi * 22 ** 2) < 120
    result = evaluate.score(scene.prompt, found)
    assert result == {"present": True, "binding": True, "spatial": True, "no_extra": True, "extra": 0, "exact": True,
                      "parseable": True, "own_colour_errors": 0, "other_colour_errors": 0, "shape_errors": 0,
                      "missing": 0}


def test_swapped_colours_are_a_binding_error():
    prompt = _scene(RED_CIRCLE, BLUE_SQUARE, relation="left of").prompt
    swapped = _scene(dataclasses.replace(RED_CIRCLE, color="blue"), dataclasses.replace(BLUE_SQUARE, color="red"),
                     relation="left of")
    result = evaluate.score(prompt, _read(swapped))
    assert not result["binding"] and not result["present"] and not result["exact"]
    assert result["own_colour_errors"] == 2 and result["other_colour_errors"] == 0
    assert result["parseable"]


def test_a_colour_from_outside_the_prompt_is_weak_conditioning():
    prompt = _scene(RED_CIRCLE, BLUE_SQUARE, relation="and").prompt
    green_square = dataclasses.replace(BLUE_SQUARE, color="green")
    result = evaluate.score(prompt, _read(_scene(RED_CIRCLE, green_square, relation="and")))
    assert not result["binding"] and result["other_colour_errors"] == 1 and result["own_colour_errors"] == 0


def test_mirrored_relation_fails_spatial_only():
    prompt = _scene(RED_CIRCLE, BLUE_SQUARE, relation="left of").prompt
    mirrored = _scene(dataclasses.replace(RED_CIRCLE, cx=96), dataclasses.replace(BLUE_SQUARE, cx=32),
                      relation="left of")
    result = evaluate.score(prompt, _read(mirrored))
    assert result["spatial"] is False and not result["exact"]
    assert result["present"] and result["binding"] and result["no_extra"]
    above = _scene(Obj("green", "triangle", 64, 30, 40), Obj("orange", "square", 64, 96, 40), relation="above")
    assert evaluate.score(above.prompt, _read(above))["spatial"] is True
    assert evaluate.score(world.parse_caption("an orange square above a green triangle"), _read(above))["spatial"] \
        is False


def test_missing_and_extra_objects_are_caught():
    prompt = _scene(RED_CIRCLE, BLUE_SQUARE, relation="and").prompt
    missing = evaluate.score(prompt, _read(_scene(RED_CIRCLE)))
    assert not missing["present"] and missing["missing"] == 1 and missing["spatial"] is None
    extra = _scene(Obj("red", "circle", 30, 30, 40), Obj("blue", "square", 96, 30, 40),
                   Obj("yellow", "triangle", 64, 96, 40))
    result = evaluate.score(prompt, _read(extra))
    assert result["present"] and result["binding"] and not result["no_extra"] and not result["exact"]


def test_blobs_that_are_no_shape_and_colours_off_the_palette_are_unparseable():
    pixels = np.full((128, 128, 3), world.BACKGROUND, np.uint8)
    pixels[20:40, 10:110] = world.PALETTE["green"]  # a bar five times as wide as tall
    pixels[70:110, 40:80] = (120, 60, 20)  # brown
    found = evaluate.read_image(pixels)
    assert sorted((f.color, f.shape) for f in found if f.color) == [("green", None)]
    assert any(f.color is None for f in found)
    assert not evaluate.score(world.parse_caption("a green square"), found)["parseable"]


def test_empty_canvas_reads_nothing():
    assert evaluate.read_image(np.full((128, 128, 3), world.BACKGROUND, np.uint8)) == []


def test_without_colours_names_some_objects_by_their_shape_alone():
    rng = np.random.Generator(np.random.PCG64(3))
    kept = dropped = 0
    for scene in world.training_scenes(300, 5):
        recaptioned = world.without_colours(scene, rng)
        assert recaptioned.objects == scene.objects and recaptioned.relation == scene.relation
        named = [f"{o.color} {o.shape}" in recaptioned.caption for o in scene.objects]
        bare = [re.search(rf"\ba {o.shape}\b", recaptioned.caption) is not None for o in scene.objects]
        assert all(n != b for n, b in zip(named, bare)), recaptioned.caption  # each object: colour kept or dropped
        assert not all(named), recaptioned.caption  # at least one colour is left out
        assert not any(o.color in recaptioned.caption for o, n in zip(scene.objects, named) if not n)
        kept, dropped = kept + sum(named), dropped + len(named) - sum(named)
        # the rest of the caption is untouched: putting the colours back gives the original
        restored = recaptioned.caption
        for o, n in zip(scene.objects, named):
            if not n:
                restored = re.sub(rf"\ba {o.shape}\b", world._phrase((o.color, o.shape)), restored, count=1)
        assert restored == scene.caption
    assert 0.3 < kept / (kept + dropped) < 0.5  # 1/2 each, at least one dropped
