"""Bad input gets a clear message that says what was wrong and what to do."""

import errno
import logging
import os
import pickle
import stat

import pytest
import torch
from safetensors import safe_open

import comfy.model_patcher
import comfy.supported_models
from maskattn_comfy.model_check import ModelFamilyError, require_sdxl
from maskattn_comfy.patch import PatchConflictError, apply_maskattn
from maskattn_comfy.tiny_model import TINY_UNET_CONFIG, build_sdxl_model, fill_
from maskattn_core import (GateFileError, GateSetError, MaskAttnConfig, OfficialCheckpointError, GateSet,
                           load_gate_file, load_official_checkpoint, save_gate_file)
from maskattn_core.layers import LayerKey
from test_loader import loader, sample, tiny_gates


@pytest.fixture(scope="module")
def tiny():
    return build_sdxl_model(seed=0)


def other_family(config_class, **unet):
    config = dict(TINY_UNET_CONFIG, **unet)
    model_config = config_class(config)
    model = model_config.get_model({}, device=torch.device("cpu"))
    fill_(model.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


@pytest.mark.parametrize("config_class, unet, found", [
    (comfy.supported_models.SD15, dict(context_dim=768, adm_in_channels=None, num_classes=None), "768"),
    (comfy.supported_models.SDXLRefiner, dict(context_dim=1280, adm_in_channels=2560), "1280"),
])
def test_wrong_model_family_says_what_it_found_and_that_sdxl_is_needed(tiny, config_class, unet, found):
    model = other_family(config_class, **unet)
    with pytest.raises(ModelFamilyError) as error:
        apply_maskattn(model, tiny_gates(tiny))
    assert found in str(error.value) and "SDXL" in str(error.value)


def test_a_model_without_unet_cross_attention_is_refused():
    with pytest.raises(ModelFamilyError, match="no UNet cross-attention blocks"):
        require_sdxl(torch.nn.Linear(2, 2))


def test_missing_gate_file(pack, gate_folder, tiny):
    with pytest.raises(FileNotFoundError, match="'nothing.safetensors' was not found"):
        loader(pack, tiny, "nothing.safetensors")


def test_truncated_safetensors(pack, gate_folder, tiny):
    path = save_gate_file(tiny_gates(tiny), gate_folder / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GateFileError, match="truncated or corrupt"):
        loader(pack, tiny, "cut.safetensors")


def test_a_safetensors_file_that_is_not_gates(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_down.weight": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(GateFileError, match="not a MaskAttn gate file"):
        load_gate_file(tmp_path / "lora.safetensors")


class Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MASKATTN_PWNED']}",))


def test_hostile_pickle_is_refused_and_nothing_in_it_runs(pack, gate_folder, tiny, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MASKATTN_PWNED", str(marker))
    with open(gate_folder / "gate_evil.pt", "wb") as handle:
        pickle.dump({"format": "maskattn-sdxl-gates-v1", "payload": Hostile()}, handle)
    with pytest.raises(OfficialCheckpointError, match="needs code to unpickle"):
        loader(pack, tiny, "gate_evil.pt")
    assert not marker.exists()


def test_corrupt_official_checkpoint(tmp_path):
    (tmp_path / "gate.pt").write_bytes(b"\x80\x04not really a checkpoint")
    with pytest.raises(OfficialCheckpointError, match="gate.pt"):
        load_official_checkpoint(tmp_path / "gate.pt")


def test_gates_for_layers_the_model_lacks(tiny):
    full_sdxl = {LayerKey("input", 7, t): 128 for t in range(10)}
    gates = GateSet.create(MaskAttnConfig(gate_hidden_dim=8), full_sdxl)
    with pytest.raises(GateSetError, match="input.7.2: not in the model"):
        apply_maskattn(tiny, gates)


def test_gates_of_the_wrong_width(tiny):
    gates = GateSet.create(MaskAttnConfig(gate_hidden_dim=8), {LayerKey("input", 7, 0): 1280})
    with pytest.raises(GateSetError, match="model has 128 channels, gate expects 1280"):
        apply_maskattn(tiny, gates)


@pytest.mark.parametrize("key", [("input", 7, 0), ("input", 7)])
def test_an_existing_attn2_replace_on_a_gated_key_is_a_conflict(tiny, key):
    other = tiny.clone()
    other.set_model_attn2_replace(lambda q, k, v, extra_options: v, *key)
    with pytest.raises(PatchConflictError, match=r"input\.7\.0"):
        apply_maskattn(other, tiny_gates(tiny))


def test_a_later_node_overwriting_the_replace_is_warned_once_per_run(tiny, caplog):
    import comfy.ldm.modules.attention as attention

    patched = apply_maskattn(tiny, tiny_gates(tiny))
    patched.set_model_attn2_replace(
        lambda q, k, v, extra_options: attention.optimized_attention(q, k, v, extra_options["n_heads"]), "input", 7, 0)
    with caplog.at_level(logging.WARNING, logger="MaskAttn"):
        sample(patched, steps=2)
        sample(patched, steps=2)
    warnings = [r for r in caplog.records if "not applied" in r.getMessage()]
    assert len(warnings) == 2 and "input.7.0" in warnings[0].getMessage()


def test_a_second_loader_replaces_the_first(tiny):
    first = apply_maskattn(tiny, tiny_gates(tiny, seed=1))
    twice = apply_maskattn(first, tiny_gates(tiny, seed=2))
    once = apply_maskattn(tiny, tiny_gates(tiny, seed=2))
    assert len(twice.model_options["transformer_options"]["patches"]["attn2_patch"]) == 1
    assert torch.equal(sample(twice, steps=2), sample(once, steps=2))


def test_bad_options_name_the_value():
    from maskattn_comfy.patch import PatchOptions

    with pytest.raises(ValueError, match="strength must lie in"):
        PatchOptions(strength=1.5)
    with pytest.raises(ValueError, match="start_percent <= end_percent"):
        PatchOptions(start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="stage must be one of"):
        MaskAttnConfig(stage="middle")


FLOAT32_LOWEST = float(torch.finfo(torch.float32).min)


def with_negative_value(gates, value):
    """The same gates with `negative_value` in their config, set past MaskAttnConfig's check as a file can."""
    config = MaskAttnConfig(**dict(gates.config.to_dict(), negative_value=-10000.0))
    object.__setattr__(config, "negative_value", value)
    gates.config = config
    return gates


@pytest.mark.parametrize("gate", ["hard", "soft"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_negative_value_beyond_float32_is_refused_when_the_file_loads(tiny, tmp_path, gate, suffix):
    from test_gate_fuzz import official_checkpoint, pt_bytes

    gates = with_negative_value(tiny_gates(tiny, gate=gate), -1e39)  # sampled, it failed in closed_mask / soft_mask
    path = tmp_path / f"gate_far{suffix}"
    if suffix == ".pt":
        path.write_bytes(pt_bytes(official_checkpoint(gates)))
    else:
        save_gate_file(gates, path)
    with pytest.raises((GateFileError, OfficialCheckpointError), match=rf"gate_far\{suffix}.*negative_value must be "
                                                                        r"a finite negative number no lower than "
                                                                        r"float32's -3.4028235e\+38.*got -1e\+39"):
        load_official_checkpoint(path) if suffix == ".pt" else load_gate_file(path)
    with pytest.raises(ValueError, match="no lower than float32's"):
        MaskAttnConfig(negative_value=-1e39, gate=gate)


@pytest.mark.parametrize("gate", ["hard", "soft"])
def test_the_lowest_float32_negative_value_loads_and_samples(tiny, tmp_path, gate):
    gates = tiny_gates(tiny, gate=gate, negative_value=FLOAT32_LOWEST, gain=30.0)
    loaded = load_gate_file(save_gate_file(gates, tmp_path / "lowest.safetensors"))
    assert loaded.config.negative_value == FLOAT32_LOWEST
    assert torch.isfinite(sample(apply_maskattn(tiny, loaded), steps=2)).all()


def test_gate_file_round_trip_keeps_tensors_and_metadata(tiny, tmp_path):
    gates = tiny_gates(tiny, stage="all", share_heads_by_stage=False)
    gates.provenance = {"kind": "trained", "steps": 7, "base_model": "tiny", "base_model_hash": "abc"}
    first = save_gate_file(gates, tmp_path / "a.safetensors")
    second = save_gate_file(load_gate_file(first), tmp_path / "b.safetensors")
    with safe_open(str(first), "pt") as a, safe_open(str(second), "pt") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    loaded = load_gate_file(second)
    assert loaded.provenance["steps"] == 7 and loaded.layer_heads == gates.layer_heads
    assert loaded.config == gates.config


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_gate_files_get_the_mode_the_umask_allows_so_a_server_of_another_user_can_read_them(tiny, tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = save_gate_file(tiny_gates(tiny), tmp_path / "gates.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_a_failed_gate_file_write_leaves_the_previous_file_byte_identical(tiny, tmp_path, monkeypatch, fail_at):
    path = save_gate_file(tiny_gates(tiny, seed=1), tmp_path / "gates.safetensors")
    before = path.read_bytes()
    real, seen_during_write = getattr(os, fail_at), []

    def full_disk(*args):
        if fail_at == "write":  # half of what was asked reaches the disk, then it is full
            real(args[0], bytes(args[1][: len(args[1]) // 2]))
        seen_during_write.append(path.read_bytes())
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, fail_at, full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        save_gate_file(tiny_gates(tiny, seed=2), path)
    monkeypatch.undo()
    assert seen_during_write == [before]  # no partial file was ever visible under the name
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["gates.safetensors"]  # no temporary file left behind
    assert save_gate_file(tiny_gates(tiny, seed=2), path).read_bytes() != before


def test_a_second_loader_at_strength_zero_gives_the_unpatched_model(tiny):
    from maskattn_comfy.patch import PatchOptions, find_maskattn_patch

    first = apply_maskattn(tiny, tiny_gates(tiny, seed=1))
    off = apply_maskattn(first, tiny_gates(tiny, seed=2), PatchOptions(strength=0.0))
    assert find_maskattn_patch(off) is None and find_maskattn_patch(first) is not None
    plain = sample(tiny, steps=2)
    assert torch.equal(sample(off, steps=2), plain)
    assert not torch.equal(sample(first, steps=2), plain)


def append_four_tokens(n, context, value, extra_options):
    extra = torch.ones(context.shape[0], 4, context.shape[2], dtype=context.dtype)
    return n, torch.cat([context, extra], 1), torch.cat([value, extra], 1)


def test_an_attn2_patch_after_the_loader_that_changes_the_context_is_named_in_the_error(tiny):
    from maskattn_comfy.patch import MaskShapeError

    patched = apply_maskattn(tiny, tiny_gates(tiny))
    patched.set_model_attn2_patch(append_four_tokens)
    with pytest.raises(MaskShapeError, match=r"MaskAttn: at input\.7\.0 the gates were computed for 2 x 16 locations "
                                             r"x 77 text tokens, but cross-attention got 2 x 16 x 81: .*"
                                             r"Put MaskAttn Loader after that node"):
        sample(patched, steps=1)
    before = tiny.clone()
    before.set_model_attn2_patch(append_four_tokens)
    recorder_shapes = []

    class Shapes:
        def gate(self, key, probabilities, opened, extra_options):
            recorder_shapes.append(probabilities.shape[-1])

        def attention(self, *args):
            pass

    assert torch.isfinite(sample(apply_maskattn(before, tiny_gates(tiny), recorder=Shapes()), steps=1)).all()
    assert set(recorder_shapes) == {81}  # as advised, the Loader after it: the gates see the longer context
