"""MaskAttn Loader's fingerprint follows the gate file's content, not its size and mtime: a file rewritten in
place (train.py --install, cp -p, rsync) re-runs the Loader, which then loads the new gates."""

from __future__ import annotations

import os
import time

import pytest
import torch

from maskattn_comfy import folders
from maskattn_comfy.model_check import require_sdxl
from maskattn_comfy.tiny_model import build_sdxl_model
from maskattn_core import GateSet, MaskAttnConfig, save_gate_file


@pytest.fixture(scope="module")
def widths():
    return require_sdxl(build_sdxl_model(seed=0))


def gates(widths, seed):
    return GateSet.create(MaskAttnConfig(gate_hidden_dim=16), widths, seed=seed)


def fingerprint(pack, name):
    return pack["MaskAttnLoader"].fingerprint_inputs(gate_name=name, strength=1.0, start_percent=0.0, end_percent=1.0)


class Clock:
    """folders' view of the time: `offset` seconds after the real one."""

    def __init__(self, offset: float = 0.0):
        self.offset = offset

    def time_ns(self):
        return time.time_ns() + int(self.offset * 1e9)


def head_weight(gate_set):
    return gate_set.heads["mid"].token_net[1].weight


@pytest.mark.parametrize("rewrite", ["atomic", "in place"])
def test_a_rewrite_keeping_size_and_mtime_changes_the_fingerprint_once_the_stat_is_remembered(
        pack, gate_folder, widths, monkeypatch, rewrite):
    old, new = gates(widths, 1), gates(widths, 2)
    path = save_gate_file(old, gate_folder / "swap.safetensors")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 60_000_000_000))  # written a minute ago
    monkeypatch.setattr(folders, "time", Clock(offset=10))  # the stat is old enough to be remembered ...
    first = fingerprint(pack, "swap.safetensors")
    assert first == folders._digest(path.read_bytes())
    assert fingerprint(pack, "swap.safetensors") == first and str(path) in folders._hashes  # ... and it is
    assert torch.equal(head_weight(folders.load_gates("swap.safetensors")), head_weight(old))

    stamp = path.stat()
    if rewrite == "atomic":  # as train.py --install does: a new inode under the same name
        save_gate_file(new, path)
    else:  # the same inode, overwritten
        data = save_gate_file(new, gate_folder / "elsewhere.safetensors").read_bytes()
        with open(path, "r+b") as handle:
            handle.write(data)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # the old mtime back, as cp -p or rsync leave it
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stamp.st_size, stamp.st_mtime_ns)
    assert (path.stat().st_ino == stamp.st_ino) == (rewrite == "in place")

    second = fingerprint(pack, "swap.safetensors")
    assert second == folders._digest(path.read_bytes()) != first
    assert torch.equal(head_weight(folders.load_gates("swap.safetensors")), head_weight(new))


class FrozenStat:
    """os for folders, with a filesystem whose timestamps do not move within a tick: every stat of a file
    returns its first one (same inode, size, mtime and ctime), whatever was written since."""

    def __init__(self):
        self.first = {}

    def stat(self, path):
        return self.first.setdefault(str(path), os.stat(path))

    def __getattr__(self, name):
        return getattr(os, name)


@pytest.mark.parametrize("age, mtime_set_back", [(0.0, False), (1.9, False), (0.0, True)])
def test_a_rewrite_within_the_timestamp_tick_is_seen_though_the_stat_is_the_same(
        pack, gate_folder, widths, monkeypatch, age, mtime_set_back):
    old, new = gates(widths, 3), gates(widths, 4)
    path = save_gate_file(old, gate_folder / "racy.safetensors")
    data = save_gate_file(new, gate_folder / "other.safetensors").read_bytes()
    if mtime_set_back:  # cp -p: an old mtime, but the ctime of a file written just now
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 60_000_000_000))
    frozen = FrozenStat()
    monkeypatch.setattr(folders, "os", frozen)
    stamp = frozen.stat(path)
    monkeypatch.setattr(folders, "time", Clock(offset=(max(stamp.st_mtime_ns, stamp.st_ctime_ns) - time.time_ns()) / 1e9
                                               + age))  # `age` seconds after the write: too young to remember
    first = fingerprint(pack, "racy.safetensors")
    assert str(path) not in folders._hashes
    with open(path, "r+b") as handle:  # same inode, same size; the frozen stat hides the write
        handle.write(data)
    assert frozen.stat(path) == stamp
    second = fingerprint(pack, "racy.safetensors")
    assert second == folders._digest(data) != first
    assert torch.equal(head_weight(folders.load_gates("racy.safetensors")), head_weight(new))


def test_a_missing_gate_file_has_a_fingerprint_and_the_loader_says_what_is_missing(pack, gate_folder, widths):
    assert fingerprint(pack, "gone.safetensors") == "unreadable gone.safetensors"
    path = save_gate_file(gates(widths, 5), gate_folder / "gone.safetensors")
    assert fingerprint(pack, "gone.safetensors") == folders._digest(path.read_bytes())
    path.unlink()
    assert fingerprint(pack, "gone.safetensors") == "unreadable gone.safetensors"
    with pytest.raises(FileNotFoundError, match="'gone.safetensors' was not found"):
        folders.load_gates("gone.safetensors")
