"""The Shapes base weights file: every damaged file is a ShapesWeightsError naming it, before any sampling."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskattn_shapes import model as shapes
from maskattn_shapes.model import ShapesWeightsError, read_base


def _state():
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(16, 8, 3, 3, generator=g), "out.2.bias": torch.randn(16, generator=g)}


@pytest.fixture
def base_file(tmp_path):
    path = tmp_path / "base.safetensors"
    shapes.save_base(path, _state(), {"steps": 0})
    return path


def _rewrite(path, change):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    stored = load_file(str(path))
    change(stored)
    save_file(stored, str(path), metadata=meta)


def _set(key, edit):
    def change(stored):
        stored[key] = edit(stored[key].clone())
    return change


def _poke(value, index, number):
    value.view(-1)[index] = number
    return value


DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-100]),
    "garbage": lambda p: p.write_bytes(b"\x7fELF not a safetensors file" * 40),
    "missing-scale": lambda p: _rewrite(p, lambda s: s.pop("conv.weight.q8scale")),
    "scale-without-weight": lambda p: _rewrite(p, lambda s: s.pop("conv.weight.q8")),
    "wrong-row-count": lambda p: _rewrite(p, _set("conv.weight.q8scale", lambda v: v[:15].clone())),
    "length-1-scale": lambda p: _rewrite(p, _set("conv.weight.q8scale", lambda v: v[:1].clone())),
    "nan-vector": lambda p: _rewrite(p, _set("out.2.bias", lambda v: _poke(v, 3, float("nan")))),
    "inf-scale": lambda p: _rewrite(p, _set("conv.weight.q8scale", lambda v: _poke(v, 0, float("inf")))),
    "float-weights-in-q8": lambda p: _rewrite(p, _set("conv.weight.q8", lambda v: v.float())),
}


def test_an_intact_file_reads_back_within_8_bit_rounding(base_file):
    state, meta = read_base(base_file)
    assert meta["format"] == shapes.FORMAT and sorted(state) == ["conv.weight", "out.2.bias"]
    step = _state()["conv.weight"].reshape(16, -1).abs().amax(1) / 127
    error = (state["conv.weight"] - _state()["conv.weight"]).reshape(16, -1).abs().amax(1)
    assert (error <= step * (0.5 + 127 * 2 ** -11)).all()  # half a step, and the float16 scale's rounding


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_base_file_is_refused_with_its_name(base_file, damage):
    DAMAGE[damage](base_file)
    with pytest.raises(ShapesWeightsError, match="base.safetensors"):
        read_base(base_file)


def test_a_file_of_another_format_is_named_as_such(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ShapesWeightsError, match="lora.safetensors is not a Shapes base file"):
        read_base(path)


def test_the_shipped_base_file_reads_and_is_finite():
    state, _ = read_base()
    assert len(state) > 100 and all(torch.isfinite(v).all() for v in state.values())
