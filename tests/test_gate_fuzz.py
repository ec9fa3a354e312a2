"""Gate files are untrusted input: a damaged or hostile file is a clear error that names it,
costs memory in proportion to its size, and never loads weights that are not finite float."""

from __future__ import annotations

import io
import json
import math
import random

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from maskattn_core import (GateFileError, GateSet, LayerKey, MaskAttnConfig, OfficialCheckpointError, layer_name,
                           load_gate_file, load_official_checkpoint, save_gate_file)
from maskattn_core.layers import _DIFFUSERS_BLOCKS, parse_layer_name

WIDTHS = {LayerKey("input", 4, 0): 32, LayerKey("input", 7, 0): 64, LayerKey("input", 7, 1): 64,
          LayerKey("middle", 0, 0): 64, LayerKey("output", 0, 0): 64, LayerKey("output", 3, 0): 32}
DIFFUSERS_OF_BLOCK = {block: prefix for prefix, block in _DIFFUSERS_BLOCKS.items()}


def diffusers_name(key) -> str:
    return f"{DIFFUSERS_OF_BLOCK[tuple(key[:2])]}.transformer_blocks.{key[2]}.attn2.processor"


def gates(seed=0, stage="all", **config) -> GateSet:
    return GateSet.create(MaskAttnConfig(gate_hidden_dim=8, stage=stage, **config), WIDTHS, seed=seed)


def official_checkpoint(gate_set: GateSet) -> dict:
    """The authors' layout: diffusers processor names, a shared head repeated (same tensors) under each."""
    config = gate_set.config.to_dict()
    config["share_gate_heads_by_stage"] = config.pop("share_heads_by_stage")
    state = {}
    for key in gate_set.layers:
        for param, tensor in gate_set.head_for(key).state_dict().items():
            state[f"{diffusers_name(key)}.gate_head.{param}"] = tensor
    return {"format": "maskattn-sdxl-gates-v1", "maskattn_config": config, "gate_state_dict": state,
            "selected_layers": [diffusers_name(key) for key in gate_set.layers],
            "checkpoint_kind": "trained", "global_step": 2}


def pt_bytes(checkpoint: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def split_safetensors(data: bytes) -> tuple[dict, dict]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size])["__metadata__"], load_tensors(data)


class OverBudget(AssertionError):
    """Raised by AllocationBudget; an AssertionError so that no `except ValueError` in the code hides it."""


class AllocationBudget(TorchDispatchMode):
    """Adds up the bytes of every new tensor storage torch creates, and refuses, before it happens,
    any empty/zeros/full... that would take the total past `budget`."""

    FACTORIES = {"empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "new_empty", "new_zeros"}

    def __init__(self, budget: int):
        super().__init__()
        self.budget, self.used, self.seen = budget, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in self.FACTORIES and str(kwargs.get("device", "cpu")) != "meta":
            size = args[1] if func.overloadpacket.__name__.startswith("new_") else args[0]
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            planned = math.prod(size) * dtype.itemsize
            if self.used + planned > self.budget:
                raise OverBudget(f"{func} of {list(size)} ({planned / 1e6:.1f} MB) after {self.used / 1e6:.1f} MB "
                                 f"would pass the budget of {self.budget / 1e6:.1f} MB")
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.seen:
                    self.seen.add(storage.data_ptr())
                    self.used += storage.nbytes()
        return out


def load(path):
    return load_official_checkpoint(path) if path.suffix == ".pt" else load_gate_file(path)


def assert_valid(gate_set: GateSet):
    """What anything that loads must be: float32 finite weights, sizes that match them, typed config."""
    for name, p in gate_set.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
    for head in gate_set.heads.values():
        assert head.feature_net[1].weight.shape == (head.hidden_dim, head.feature_dim)
        assert head.token_net[1].weight.shape == (head.hidden_dim, head.token_dim)
    config = gate_set.config
    assert type(config.threshold) is float and 0.0 <= config.threshold <= 1.0
    assert type(config.negative_value) is float and -math.inf < config.negative_value < 0
    assert type(config.gate_hidden_dim) is int and type(config.share_heads_by_stage) is bool
    assert set(gate_set.layer_heads.values()) <= set(gate_set.heads)
    for name in gate_set.layer_heads:
        parse_layer_name(name)


# -- the memory bomb ----------------------------------------------------------------------

def test_head_dims_claiming_a_huge_hidden_size_is_refused_before_allocating(tmp_path):
    path = save_gate_file(gates(), tmp_path / "bomb.safetensors")
    metadata, tensors = split_safetensors(path.read_bytes())
    head_dims = json.loads(metadata["head_dims"])
    head_dims["mid"][2] = 20000  # the tensors stay 8 wide: 3.3 GB of heads from a 160 KB file before the fix
    metadata["head_dims"] = json.dumps(head_dims)
    path.write_bytes(save_tensors(tensors, metadata=metadata))
    with AllocationBudget(4 * path.stat().st_size):
        with pytest.raises(GateFileError, match=r"bomb\.safetensors.*'mid'.*\[64, 2048, 20000\].*\[64, 2048, 8\]"):
            load_gate_file(path)


def test_a_stride_0_tensor_in_a_pt_cannot_claim_a_huge_head(tmp_path):
    checkpoint = official_checkpoint(gates(stage="mid"))
    hidden = 60000  # 22.8 GB before the fix, from a file of a few hundred KB
    for key in list(checkpoint["gate_state_dict"]):
        param = key.partition(".gate_head.")[2]
        shape = {"feature_net.1.weight": (hidden, 64), "token_net.1.weight": (hidden, 2048)}.get(param)
        if param.endswith((".1.bias", ".3.bias")):
            shape = (hidden,)
        elif param.endswith(".3.weight"):
            shape = (hidden, hidden)
        if shape:
            checkpoint["gate_state_dict"][key] = torch.zeros(1).expand(*shape)
    path = tmp_path / "gate_bomb.pt"
    path.write_bytes(pt_bytes(checkpoint))
    assert path.stat().st_size < 1_000_000
    with AllocationBudget(4 * path.stat().st_size):
        with pytest.raises(OfficialCheckpointError, match=r"gate_bomb\.pt.*claims more data than the file holds"):
            load_official_checkpoint(path)


def test_many_layers_sharing_one_stored_head_cannot_multiply_memory(tmp_path):
    # One dense head, repeated under 300 layer names with heads not shared by stage: 300 copies without a check.
    head = gates(stage="mid").heads["mid"]
    names = [f"down_blocks.2.attentions.0.transformer_blocks.{i}.attn2.processor" for i in range(300)]
    checkpoint = {"format": "maskattn-sdxl-gates-v1", "selected_layers": names,
                  "maskattn_config": dict(gate_hidden_dim=8, share_gate_heads_by_stage=False),
                  "gate_state_dict": {f"{n}.gate_head.{p}": t for n in names for p, t in head.state_dict().items()}}
    path = tmp_path / "gate_repeat.pt"
    path.write_bytes(pt_bytes(checkpoint))
    with AllocationBudget(4 * path.stat().st_size):
        with pytest.raises(OfficialCheckpointError, match=r"gate_repeat\.pt.*claim more data than the file stores"):
            load_official_checkpoint(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_loading_a_valid_file_allocates_at_most_three_times_its_size(tmp_path, suffix):
    gate_set = GateSet.create(MaskAttnConfig(), {LayerKey("input", 7, i): 1280 for i in range(2)}, seed=0)  # SDXL sizes
    path = tmp_path / f"gate{suffix}"
    if suffix == ".pt":
        path.write_bytes(pt_bytes(official_checkpoint(gate_set)))
    else:
        save_gate_file(gate_set, path)
    with AllocationBudget(3 * path.stat().st_size) as budget:
        loaded = load(path)
    assert budget.used > path.stat().st_size // 2  # the counter sees the heads being built
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), gate_set.state_dict().values()))


# -- single damages, each a clear error naming the file -----------------------------------

def mutate_metadata(path, field, change):
    metadata, tensors = split_safetensors(path.read_bytes())
    value = json.loads(metadata[field])
    metadata[field] = json.dumps(change(value))
    path.write_bytes(save_tensors(tensors, metadata=metadata))


@pytest.mark.parametrize("field, change, message", [
    ("config", lambda c: dict(c, threshold="0.5"), "threshold must be a number"),
    ("config", lambda c: dict(c, threshold=True), "threshold must be a number"),
    ("config", lambda c: dict(c, stage="middle"), "stage must be one of"),
    ("config", lambda c: dict(c, negative_value=float("-inf")), "negative_value must be a finite"),
    ("config", lambda c: [c], "config must be a mapping"),
    ("head_dims", lambda d: list(d.values()), "head_dims must map"),
    ("head_dims", lambda d: dict(d, mid=[64, 2048, float("inf")]), "must be three integers"),
    ("layer_heads", lambda d: list(d), "layer_heads must map"),
    ("layer_heads", lambda d: dict(d, **{"input.x.0": "mid"}), "not a layer name"),
    ("layer_heads", lambda d: dict(d, **{"input.7.0": "nowhere"}), "nowhere"),
    ("layer_heads", lambda d: {"input.04.0" if k == "input.4.0" else k: v for k, v in d.items()}, "'input.04.0' is not"),
    ("layer_heads", lambda d: dict(d, **{"input.04.0": d["input.4.0"]}), "'input.04.0' is not"),  # 7 names, 6 layers
    ("layer_heads", lambda d: {"input.\u0664.0" if k == "input.4.0" else k: v for k, v in d.items()},
     "'input.\u0664.0' is not"),  # an Arabic-Indic four: isdigit() and int() take it
    ("layer_heads", lambda d: {"output.\uff10.0" if k == "output.0.0" else k: v for k, v in d.items()},
     "'output.\uff10.0' is not"),  # a fullwidth zero
    ("layer_heads", lambda d: {"input.7.0 " if k == "input.7.0" else k: v for k, v in d.items()}, "'input.7.0 ' is not"),
    ("layer_heads", lambda d: {}, "gates no layer"),
    ("provenance", lambda d: ["trained"], "provenance must be a JSON object"),
])
def test_damaged_metadata_is_a_clear_error_naming_the_file(tmp_path, field, change, message):
    path = save_gate_file(gates(), tmp_path / "damaged.safetensors")
    mutate_metadata(path, field, change)
    with pytest.raises(GateFileError, match="damaged.safetensors") as error:
        load_gate_file(path)
    assert message in str(error.value)


def test_a_layer_named_twice_in_the_json_is_refused_not_silently_merged(tmp_path):
    path = save_gate_file(gates(), tmp_path / "twice.safetensors")
    metadata, tensors = split_safetensors(path.read_bytes())
    metadata["layer_heads"] = metadata["layer_heads"].replace('"input.7.0": "mid"', '"input.7.0": "mid", "input.7.0": "high"')
    assert metadata["layer_heads"].count("input.7.0") == 2
    path.write_bytes(save_tensors(tensors, metadata=metadata))
    with pytest.raises(GateFileError, match=r"twice\.safetensors.*\['input\.7\.0'\] appear more than once"):
        load_gate_file(path)


@pytest.mark.parametrize("name", ["input.04.0", "input.4.00", "input.\u0664.0", "input.4.\u0660", "input.\uff14.0",
                                  "input.+4.0", "input.-4.0", "input. 4.0", "input.4.0\n", "Input.4.0", "input.4",
                                  "input.4.0.0", "input.1000000.0", "", 7])
def test_layer_names_are_canonical_ascii_only(name):
    with pytest.raises(ValueError, match="is not a layer name of the form 'input.7.0'"):
        parse_layer_name(name)


def test_canonical_layer_names_round_trip():
    for key in [LayerKey("input", 4, 0), LayerKey("middle", 0, 9), LayerKey("output", 10, 123), LayerKey("input", 0, 0)]:
        assert parse_layer_name(layer_name(key)) == key


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(selected_layers=[n.replace("transformer_blocks.0.", "transformer_blocks.00.")
                                         for n in c["selected_layers"]]), "not an SDXL cross-attention"),
    (lambda c: c.update(selected_layers=[n.replace("transformer_blocks.0.", "transformer_blocks.\u0660.")
                                         for n in c["selected_layers"]]), "not an SDXL cross-attention"),
    (lambda c: c.update(selected_layers=c["selected_layers"] + c["selected_layers"][:1]), "which is listed twice"),
    (lambda c: c.update(selected_layers=[], gate_state_dict={}), "gates no layer"),
])
def test_official_layer_names_that_are_not_canonical_or_repeat_are_refused(tmp_path, change, message):
    checkpoint = official_checkpoint(gates(stage="mid"))
    change(checkpoint)
    (tmp_path / "gate_names.pt").write_bytes(pt_bytes(checkpoint))
    with pytest.raises(OfficialCheckpointError, match=r"gate_names\.pt") as error:
        load_official_checkpoint(tmp_path / "gate_names.pt")
    assert message in str(error.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("damage, message", [
    (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "NaN or infinite"),
    (lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "NaN or infinite"),
    (lambda t: t.to(torch.int8), "torch.int8; gate weights are floating point"),
    (lambda t: t > 0, "torch.bool; gate weights are floating point"),
    (lambda t: t.flatten(), "must be 2-D"),
])
def test_bad_weights_are_refused_naming_file_and_tensor(tmp_path, suffix, damage, message):
    gate_set = gates(stage="mid")
    path = tmp_path / f"gate_bad{suffix}"
    if suffix == ".pt":
        checkpoint = official_checkpoint(gate_set)
        state = checkpoint["gate_state_dict"]
        for key in [k for k in state if k.endswith(".token_net.1.weight")]:
            state[key] = damage(state[key])  # every layer of the shared head, so the head itself is damaged
        path.write_bytes(pt_bytes(checkpoint))
    else:
        path = save_gate_file(gate_set, path)
        metadata, tensors = split_safetensors(path.read_bytes())
        tensors["heads.mid.token_net.1.weight"] = damage(tensors["heads.mid.token_net.1.weight"]).contiguous()
        path.write_bytes(save_tensors(tensors, metadata=metadata))
    with pytest.raises((GateFileError, OfficialCheckpointError), match=f"gate_bad{suffix}") as error:
        load(path)
    assert message in str(error.value) and "token_net.1.weight" in str(error.value)


def nested_rows(t):
    return torch.nested.nested_tensor(list(t))


@pytest.mark.parametrize("kind, make, message", [
    ("sparse COO", lambda t: t.to_sparse(), "sparse_coo"),
    ("sparse CSR", lambda t: t.to_sparse_csr(), "sparse_csr"),
    ("meta", lambda t: torch.empty_like(t, device="meta"), "device meta"),
    ("nested", nested_rows, "a nested tensor"),
    ("complex", lambda t: t.to(torch.complex64), "torch.complex64; gate weights are floating point"),
    ("quantized", lambda t: torch.quantize_per_tensor(t, 0.01, 0, torch.qint8), "torch.qint8; gate weights are floating point"),
])
def test_a_pt_tensor_that_is_not_a_dense_cpu_float_tensor_is_a_clear_error(tmp_path, kind, make, message):
    checkpoint = official_checkpoint(gates(stage="mid"))
    state = checkpoint["gate_state_dict"]
    for key in [k for k in state if k.endswith(".token_net.1.weight")]:
        state[key] = make(state[key])
    (tmp_path / "gate_layout.pt").write_bytes(pt_bytes(checkpoint))
    with pytest.raises(OfficialCheckpointError, match=r"gate_layout\.pt") as error:
        load_official_checkpoint(tmp_path / "gate_layout.pt")
    assert message in str(error.value) and "token_net.1.weight" in str(error.value), kind
    assert "\n" not in str(error.value)


def test_half_precision_weights_load_as_float32(tmp_path):
    gate_set = gates(stage="mid")
    checkpoint = official_checkpoint(gate_set)
    checkpoint["gate_state_dict"] = {k: v.half() for k, v in checkpoint["gate_state_dict"].items()}
    (tmp_path / "gate_half.pt").write_bytes(pt_bytes(checkpoint))
    loaded = load_official_checkpoint(tmp_path / "gate_half.pt")
    assert_valid(loaded)
    expected = gate_set.heads["mid"].token_net[1].weight.half().float()
    assert torch.equal(loaded.heads["mid"].token_net[1].weight, expected)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(selected_layers=["down_blocks.9.attentions.0.transformer_blocks.0.attn2.processor"]),
     "not an SDXL cross-attention"),
    (lambda c: c["maskattn_config"].update(stage="bottom"), "stage must be one of"),
    (lambda c: c.update(gate_state_dict=list(c["gate_state_dict"])), "'gate_state_dict' is a list"),
    (lambda c: c.pop("maskattn_config"), "no 'maskattn_config'"),
    (lambda c: c.update(selected_layers=torch.ones(3)), "selected_layers must be a list"),
    (lambda c: c["gate_state_dict"].update(  # the last layer's copy of the shared head
        {k: v + 1 for k, v in list(c["gate_state_dict"].items())[-2:]}), "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor: the checkpoint says heads are shared by stage, but its token_net.3.weight differs"),
])
def test_damaged_official_checkpoint_is_a_clear_error_naming_the_file(tmp_path, change, message):
    checkpoint = official_checkpoint(gates(stage="mid"))
    change(checkpoint)
    (tmp_path / "gate_x.pt").write_bytes(pt_bytes(checkpoint))
    with pytest.raises(OfficialCheckpointError, match=r"gate_x\.pt") as error:
        load_official_checkpoint(tmp_path / "gate_x.pt")
    assert message in str(error.value)


# -- seeded fuzzing ------------------------------------------------------------------------

ODD_VALUES = [None, True, 0, -1, 7, 2 ** 70, 0.5, -0.5, float("inf"), float("-inf"), float("nan"), 1e308, "",
              "0.5", "mid", "input.7.0", [], [1, 2, 3], [64, 2048], {}, {"mid": [64, 2048, 8]}, {"a": "b"}]


def odd_value(rng):
    return rng.choice(ODD_VALUES)


def damaged_tensor(rng, tensor):
    choice = rng.randrange(9)
    if choice == 0:
        return tensor.flatten().index_fill(0, torch.tensor([rng.randrange(tensor.numel())]),
                                           rng.choice([float("nan"), float("inf"), -float("inf")])).reshape(tensor.shape)
    if choice == 1:
        return tensor.to(rng.choice([torch.int8, torch.bool, torch.int64, torch.uint8, torch.int32]))
    if choice == 2:
        return tensor.to(rng.choice([torch.float16, torch.bfloat16, torch.float64]))
    if choice == 3:
        return tensor.flatten()
    if choice == 4:
        return tensor.reshape(1, *tensor.shape) if tensor.dim() < 3 else tensor[0]
    if choice == 5:
        return tensor.t().contiguous() if tensor.dim() == 2 else tensor.repeat(2)
    if choice == 6:
        return tensor[: max(tensor.shape[0] - 1, 0)] if tensor.dim() else tensor.reshape(1)
    if choice == 7:
        return torch.zeros(())
    return tensor * rng.choice([0.0, -1.0, 1e30])


def mutate_safetensors(rng, data: bytes) -> bytes:
    if rng.random() < 0.15:  # raw bytes: flips or a cut
        data = bytearray(data)
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            return bytes(data)
        return bytes(data[: rng.randrange(len(data))])
    metadata, tensors = split_safetensors(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        field = rng.choice(["config", "layer_heads", "head_dims", "provenance", "format_version", "format"])
        if kind == 0:  # a field replaced by an odd value of any type
            metadata[field] = json.dumps(odd_value(rng)) if field != "format_version" else rng.choice(["0", "2", "x", "-1", "1.0"])
        elif kind == 1 and field in ("config", "layer_heads", "head_dims") and \
                isinstance(value := json.loads(metadata.get(field, "null")), dict):  # an entry inside a field
            key = rng.choice(sorted(value) + ["threshold", "input.7.9", "extra"])
            if field == "head_dims" and isinstance(value.get(key), list) and rng.random() < 0.6:
                value[key] = list(value[key])
                value[key][rng.randrange(3)] = odd_value(rng)
            else:
                value[key] = odd_value(rng)
            metadata[field] = json.dumps(value)
        elif kind == 2:
            metadata.pop(field, None)
        elif kind in (3, 4):  # a tensor damaged
            name = rng.choice(sorted(tensors))
            tensors[name] = damaged_tensor(rng, tensors[name]).contiguous()
        elif kind == 5:  # a tensor dropped, or one added
            if rng.random() < 0.5:
                tensors.pop(rng.choice(sorted(tensors)))
            else:
                tensors[rng.choice(["heads.mid.extra", "heads.nowhere.logit_bias", "other", "heads"])] = torch.zeros(2)
        else:  # a tensor moved to another head
            name = rng.choice(sorted(tensors))
            tensors[name.replace("heads.", f"heads.{rng.choice(['mid', 'high', 'x'])}", 1)] = tensors.pop(name)
    return save_tensors(tensors, metadata=metadata)


def mutate_checkpoint(rng, checkpoint: dict) -> bytes:
    state = checkpoint["gate_state_dict"]
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        if kind == 0:
            checkpoint[rng.choice(list(checkpoint) + ["extra"])] = rng.choice(ODD_VALUES + [torch.ones(2)])
        elif kind == 1:
            checkpoint.pop(rng.choice(list(checkpoint)), None)
        elif kind == 2 and isinstance(checkpoint.get("maskattn_config"), dict):
            checkpoint["maskattn_config"][rng.choice(["stage", "threshold", "gate_hidden_dim", "negative_value",
                                                      "share_gate_heads_by_stage", "placement", "x"])] = odd_value(rng)
        elif kind == 3 and isinstance(checkpoint.get("selected_layers"), list):
            layers = checkpoint["selected_layers"]
            layers[rng.randrange(len(layers))] = rng.choice(
                ["down_blocks.5.attentions.0.transformer_blocks.0.attn2.processor", "mid_block", 7, "",
                 "up_blocks.0.attentions.0.transformer_blocks.9.attn2.processor",
                 "down_blocks.2.attentions.0.transformer_blocks.0.attn1.processor"])
        elif kind in (4, 5):  # one tensor (so one layer's copy of a shared head) or every copy of one parameter
            key = rng.choice(sorted(state))
            param = key.partition(".gate_head.")[2]
            damaged = damaged_tensor(rng, state[key]) if rng.random() < 0.6 else \
                torch.zeros(1).expand(*(state[key].shape or (1,)))
            for k in ([key] if kind == 4 else [k for k in state if k.endswith(param)]):
                state[k] = damaged
        else:
            key = rng.choice(sorted(state))
            state[key.replace(".gate_head.", rng.choice([".", ".gate_head.x.", ".gate_head."]), 1) + "_"] = state.pop(key)
    data = pt_bytes(checkpoint)
    if rng.random() < 0.15:
        data = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
    return data


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_fuzzed_gate_files_load_validly_or_fail_with_a_clear_error(tmp_path, suffix):
    rng = random.Random(f"maskattn-fuzz{suffix}")
    base = gates(seed=1, share_heads_by_stage=suffix == ".pt")
    valid = tmp_path / f"valid{suffix}"
    if suffix == ".pt":
        valid.write_bytes(pt_bytes(official_checkpoint(base)))
    else:
        save_gate_file(base, valid)
    assert_valid(load(valid))
    raw, loaded, refused = [], 0, 0
    for i in range(300):
        path = tmp_path / f"mutant_{i}{suffix}"
        if suffix == ".pt":
            path.write_bytes(mutate_checkpoint(rng, official_checkpoint(base)))
        else:
            path.write_bytes(mutate_safetensors(rng, valid.read_bytes()))
        try:
            with AllocationBudget(4 * path.stat().st_size + 1_000_000):
                gate_set = load(path)
        except (GateFileError, OfficialCheckpointError) as error:
            refused += 1
            if path.name not in str(error):
                raw.append(f"{path.name}: message without the file's name: {error}")
        except Exception as error:  # noqa: BLE001 - what the test is looking for
            raw.append(f"{path.name}: {type(error).__name__}: {error}")
        else:
            loaded += 1
            try:
                assert_valid(gate_set)
            except AssertionError as error:
                raw.append(f"{path.name} loaded but is not valid: {error}")
    assert not raw, f"{len(raw)} of 300 mutants:\n" + "\n".join(raw[:20])
    assert refused > 150 and loaded > 5, (refused, loaded)  # the mutations reach both outcomes
