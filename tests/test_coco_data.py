"""COCO instance masks for --mask-loss: RLE and polygons decoded without pycocotools, categories matched to caption
words, and the tiny COCO fixture (scripts/make_coco_fixture.py) training through trainer/train.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.coco_masks import (CocoMaskError, decode_counts, encode_counts, named_as, polygons_to_mask,
                                rle_to_mask, segmentation_to_mask)
from trainer.data import UNNAMED_CATEGORY, read_examples
from trainer.train import main

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "coco_tiny"
# A compressed RLE string written by pycocotools for a 50 x 70 mask (from armengot/COCOtoolsFORK's README).
PYCOCOTOOLS_RLE = ("0g05b08J4M2N2NA^O1`0OCO=0E090H080IO68DH;>@C>a0_O_O`0j0OWOF<:CM72I24NL43JM92FN;1ENKO72L0LO91J0MO92INO0"
                   "NO122OO0M031O000NO31OO11MO40N011MO41MO21L06OL021L06OL021L06OL021L060J040L060J040L060J040L060J040L060"
                   "J040L060J040L060KO31L060KO31L06OL021L06OL021L06OL021MO41MO21MO40N100NO310O00M0310O00NO1220NO92IONO91"
                   "KOMO72M0<1EO:2GN63KM34OLM73JF<;=1G_O_Ob0=AC`07EH=1IO71H090F0:1DO>1_O1b0>2N2N3L6H]O")


def test_compressed_rle_decodes_as_pycocotools_wrote_it_and_encodes_back_byte_for_byte():
    counts = decode_counts(PYCOCOTOOLS_RLE)
    assert sum(counts) == 50 * 70  # a wrong bit layout, sign or delta rule cannot land on exactly 3500 pixels
    assert encode_counts(counts) == PYCOCOTOOLS_RLE
    mask = segmentation_to_mask({"size": [50, 70], "counts": PYCOCOTOOLS_RLE}, 50, 70)
    assert mask.shape == (50, 70) and mask.sum() == sum(counts[1::2])


def test_compressed_rle_by_hand_from_pycocotools_rules():
    # rleToString: 3, 2 and 4 are one 5-bit group each ('3' '2' '4'); the 4th count is written as 1 - 2 = -1,
    # the group 0b11111 with its sign bit set and nothing after it: chr(48 + 31) = 'O'.
    assert decode_counts("324O") == [3, 2, 4, 1] and encode_counts([3, 2, 4, 1]) == "324O"
    # 40 needs two groups: 40 = 0b01000 | 0b1 << 5: chr(48 + 8 + 32) 'X', then chr(48 + 1) '1'
    assert decode_counts("X1") == [40] and encode_counts([40]) == "X1"


def test_rle_runs_go_down_the_columns_starting_with_zeros():
    # 3 rows x 2 columns, column-major: 0 0 1 | 1 1 0
    mask = rle_to_mask([2, 3, 1], 3, 2)
    assert mask.tolist() == [[False, True], [False, True], [True, False]]
    with pytest.raises(CocoMaskError, match="sum to 5 pixels"):
        rle_to_mask([2, 3], 3, 2)
    with pytest.raises(CocoMaskError, match="size"):
        segmentation_to_mask({"size": [2, 3], "counts": [6]}, 3, 2)


def test_a_polygon_fills_its_pixels_in_x_y_order():
    mask = polygons_to_mask([[2, 1, 5, 1, 5, 3, 2, 3]], 6, 8)  # x 2..5, y 1..3 (PIL fills the outline too)
    assert mask.sum() == 4 * 3 and mask[1:4, 2:6].all()
    with pytest.raises(CocoMaskError, match="at least 3"):
        polygons_to_mask([[1, 2, 3, 4]], 6, 8)


@pytest.mark.parametrize("category, caption, words", [
    ("dog", "two dogs playing", "dogs"), ("dog", "a dog", "dog"), ("teddy bear", "three teddy bears", "teddy bears"),
    ("person", "people on a bench", "people"), ("bus", "two buses", "buses"), ("sheep", "sheep grazing", "sheep"),
    ("person", "a man walking", None), ("cat", "a catalogue", None), ("hot dog", "a hot sunny dog", None)])
def test_a_category_is_named_by_its_name_or_plural_as_whole_words(category, caption, words):
    assert named_as(category, caption) == words


def test_the_fixture_is_what_the_script_writes(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, str(FIXTURE.parents[2] / "scripts" / "make_coco_fixture.py"), str(tmp_path)],
                   check=True, capture_output=True)
    for path in FIXTURE.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_coco_masks_attach_to_the_captions_that_name_their_category():
    examples, skipped = read_examples(str(FIXTURE / "captions_tiny.json"), "coco", str(FIXTURE), 0, "skip",
                                      coco_instances=str(FIXTURE / "instances_tiny.json"))
    masks = {e.caption: sorted(m.words for m in e.masks) for e in examples}
    assert masks == {"two dogs playing on the grass": ["dogs"], "a dog and another dog": ["dog"],
                     "a cat sitting next to a teddy bear": ["cat", "teddy bear"],
                     "a grey cat and a small teddy bear": ["cat", "teddy bear"],
                     "a man walking his dog": ["dog"]}
    assert skipped.noted == {UNNAMED_CATEGORY: 1}  # the person called "a man"
    dogs = next(e for e in examples if e.caption.startswith("two dogs")).masks[0]
    record = json.loads(dogs.coco)
    assert len(record["segmentations"]) == 2  # both dogs: the category's union
    instances = json.loads((FIXTURE / "instances_tiny.json").read_text())
    areas = sum(a["area"] for a in instances["annotations"] if a["image_id"] == 101)
    from trainer.region_masks import decode_mask
    assert decode_mask(dogs).sum() == areas  # the two polygons do not overlap


def test_the_coco_fixture_trains_through_train_py_with_the_mask_loss(tmp_path, capsys):
    code = main(["--demo", "--data", str(FIXTURE / "captions_tiny.json"), "--coco-images", str(FIXTURE),
                 "--coco-instances", str(FIXTURE / "instances_tiny.json"), "--coco-min-noun-phrases", "0",
                 "--mask-loss", "0.5", "--straight-through", "output", "--output", str(tmp_path / "run"),
                 "--resolution", "32", "--gate-hidden-dim", "16", "--batch-size", "1", "--grad-accum", "1",
                 "--steps", "3", "--warmup-steps", "1", "--no-progress", "--no-tensorboard"])
    err = capsys.readouterr().err
    assert code == 0, err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # every caption of the fixture names at least one object, so every step is supervised; BCE of p near 1/2 ~ log 2
    assert all(0.3 < m["mask_loss"] < 1.5 and np.isfinite(m["loss"]) for m in metrics)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["examples"] == 5 and run["kept_with_a_change"] == {UNNAMED_CATEGORY: 1}
    assert (tmp_path / "run" / "maskattn_demo.safetensors").is_file()


def test_coco_instances_need_coco_captions(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes((FIXTURE / "000000000101.png").read_bytes())
    (tmp_path / "a.txt").write_text("a dog")
    code = main(["--demo", "--data", str(tmp_path), "--coco-instances", str(FIXTURE / "instances_tiny.json"),
                 "--output", str(tmp_path / "run"), "--no-progress", "--no-tensorboard"])
    assert code == 1 and "--coco-instances goes with COCO caption JSON" in capsys.readouterr().err
