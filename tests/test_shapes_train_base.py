"""maskattn_shapes.train_base end to end on a handful of scenes: the grounding loss (on the nouns) and colour-word
dropout run through ComfyUI's UNet, the EMA is written as a Shapes base file that reads back, and the provenance
says how it was trained."""

import json

import pytest
import torch

from maskattn_shapes import train_base
from maskattn_shapes.model import read_base

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_a_short_run_with_grounding_and_colour_dropout_writes_a_base_that_reads_back(tmp_path):
    from maskattn_comfy import host

    host.boot(cpu=True)
    init = tmp_path / "init.safetensors"
    train_base.main(["--out", str(tmp_path / "first"), "--weights", str(init), "--scenes", "24", "--steps", "1",
                     "--batch", "4", "--warmup", "1", "--threads", "1"])
    train_base.main(["--out", str(tmp_path / "run"), "--init", str(init), "--scenes", "24", "--steps", "3",
                     "--batch", "8", "--warmup", "1", "--grounding", "0.5", "--drop-colours", "0.5", "--ground-nouns",
                     "--max-weight", "0.85", "--threads", "1"])
    state, meta = read_base(tmp_path / "run" / "shapes_base.safetensors")
    provenance = json.loads(meta["provenance"])
    assert provenance["steps"] == 3 and provenance["drop_colours"] == 0.5 and provenance["grounding"] == 0.5
    assert provenance["ground_nouns"] is True and provenance["max_weight"] == 0.85
    assert provenance["init"] == "init.safetensors" and meta["text_encoder"] == "words"
    first, _ = read_base(init)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any(not torch.equal(state[k], first[k]) for k in state)  # three steps moved the EMA from the init
    log = (tmp_path / "run" / "train_log.jsonl").read_text()
    assert log == ""  # rows every 50 steps: none in 3


@pytest.mark.parametrize("value", ["1", "-0.1", "nan", "x"])
def test_drop_colours_must_be_a_fraction(value, capsys):
    with pytest.raises(SystemExit) as stop:
        train_base.parse_args(["--drop-colours", value])
    assert stop.value.code == 2 and "--drop-colours" in capsys.readouterr().err
