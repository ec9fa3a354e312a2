"""What the trainer writes: checkpoint folders appear whole or not at all, a full disk is a CheckpointError,
--resume passes over a damaged checkpoint, and every file gets the permissions the umask gives."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import stat
from pathlib import Path

import pytest
import torch

from maskattn_comfy.model_check import require_sdxl
from maskattn_core import GateSet, MaskAttnConfig
from trainer import checkpoints
from trainer.demo import tiny_unet
from trainer.train import main


@pytest.fixture(scope="module")
def gate_set():
    return GateSet.create(MaskAttnConfig(gate_hidden_dim=8), require_sdxl(tiny_unet(0)), seed=1)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included), by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} | {
        str(p.relative_to(folder)) + "/": b"" for p in sorted(folder.rglob("*")) if p.is_dir()}


def with_two_checkpoints(output, gate_set):
    for step in (1, 2):
        checkpoints.save_checkpoint(output, step, gate_set, {"step": step}, keep_last=3)
    return snapshot(output / "checkpoints")


def write_half_then_fail(data: bytes, path):
    Path(path).write_bytes(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- atomic checkpoint folders -------------------------------------------------------------------

@pytest.mark.parametrize("where", ["gates", "state", "marker", "rename"])
def test_a_failure_mid_write_leaves_earlier_checkpoints_byte_identical_and_no_partial_folder(tmp_path, gate_set,
                                                                                              monkeypatch, where):
    before = with_two_checkpoints(tmp_path, gate_set)
    if where == "gates":
        monkeypatch.setattr(checkpoints, "save_gate_file", lambda gates, path: write_half_then_fail(b"x" * 4096, path))
    elif where == "state":
        real_save = torch.save

        def partial_save(obj, path):
            real_save(obj, path)
            write_half_then_fail(Path(path).read_bytes(), path)
        monkeypatch.setattr(checkpoints.torch, "save", partial_save)
    elif where == "marker":
        def fail_marker(self, *args, **kwargs):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        monkeypatch.setattr(Path, "write_text", fail_marker)
    else:
        def fail_rename(*args):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        monkeypatch.setattr(checkpoints.os, "replace", fail_rename)
    with pytest.raises(checkpoints.CheckpointError, match="step-00000002 is intact"):
        checkpoints.save_checkpoint(tmp_path, 3, gate_set, {"step": 3}, keep_last=3)
    monkeypatch.undo()
    assert snapshot(tmp_path / "checkpoints") == before  # nothing new, nothing partial, nothing changed
    assert checkpoints.latest_checkpoint(tmp_path).name == "step-00000002"
    # ... and the next attempt writes it.
    assert checkpoints.save_checkpoint(tmp_path, 3, gate_set, {"step": 3}, keep_last=3).name == "step-00000003"


@contextlib.contextmanager
def files_limited_to(size: int):
    """Writes past `size` bytes fail in this process (RLIMIT_FSIZE: EFBIG, as a full disk fails with ENOSPC),
    so torch and safetensors raise what they really raise when a disk fills up."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("fails", ["gate file", "state.pt"])
def test_a_full_disk_is_a_checkpoint_error_not_a_library_traceback(tmp_path, gate_set, fails):
    before = with_two_checkpoints(tmp_path, gate_set)
    # state.pt of 400 kB: it is what fails under a 200 kB limit (torch: RuntimeError "enforce fail ..."),
    # and the 1 kB limit stops the gate file first (safetensors: SafetensorError, or OSError).
    state = {"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.zeros(100_000)}}}}
    with files_limited_to(1000 if fails == "gate file" else 200_000):
        with pytest.raises(checkpoints.CheckpointError) as raised:
            checkpoints.save_checkpoint(tmp_path, 3, gate_set, state, keep_last=3)
    message = str(raised.value)
    assert "could not write the checkpoint for step 3" in message and "step-00000002 is intact" in message
    assert "--resume" in message
    if fails == "state.pt":
        assert isinstance(raised.value.__cause__, RuntimeError)  # what torch.save raises for a failed write
    assert snapshot(tmp_path / "checkpoints") == before
    assert not list((tmp_path / "checkpoints").glob(".step-*.tmp-*"))


def test_resume_passes_over_an_unreadable_newest_checkpoint_and_says_so(tmp_path, gate_set):
    for step in (1, 2, 3):
        checkpoints.save_checkpoint(tmp_path, step, gate_set, {"step": step}, keep_last=3)
    newest = tmp_path / "checkpoints" / "step-00000003"
    state = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(state[: len(state) // 3])  # a truncated copy
    said = []
    path, _, loaded, damaged = checkpoints.load_newest_readable(tmp_path, said.append)
    assert path.name == "step-00000002" and loaded["step"] == 2 and damaged == [newest]
    assert len(said) == 2 and "step-00000003 cannot be read" in said[0] and "resuming from step-00000002" in said[1]

    gates = tmp_path / "checkpoints" / "step-00000002" / "gates.safetensors"
    gates.write_bytes(gates.read_bytes()[:100])
    path, _, loaded, damaged = checkpoints.load_newest_readable(tmp_path, said.append)
    assert path.name == "step-00000001" and loaded["step"] == 1 and len(damaged) == 2
    (tmp_path / "checkpoints" / "step-00000001" / "state.pt").write_bytes(b"")
    with pytest.raises(checkpoints.CheckpointError, match="none of the 3 checkpoints .* can be read"):
        checkpoints.load_newest_readable(tmp_path, said.append)
    assert checkpoints.load_newest_readable(tmp_path / "elsewhere", said.append) is None


def test_an_unreadable_checkpoint_set_aside_is_neither_resumed_nor_kept_in_place_of_good_ones(tmp_path, gate_set):
    for step in (1, 2, 3):
        checkpoints.save_checkpoint(tmp_path, step, gate_set, {"step": step}, keep_last=3)
    newest = tmp_path / "checkpoints" / "step-00000003"
    (newest / "state.pt").write_bytes(b"")
    *_, damaged = checkpoints.load_newest_readable(tmp_path, lambda message: None)
    checkpoints.set_aside(damaged, lambda message: None)
    assert (tmp_path / "checkpoints" / "step-00000003.damaged" / "gates.safetensors").is_file()
    # Training goes on from step 1 with --keep-last 1: step 2's checkpoint must be the one kept.
    checkpoints.save_checkpoint(tmp_path, 2, gate_set, {"step": 2}, keep_last=1)
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["step-00000002"]
    assert checkpoints.load_newest_readable(tmp_path, lambda message: None)[0].name == "step-00000002"


# -- permissions -----------------------------------------------------------------------------------

def test_every_file_the_trainer_writes_gets_the_umask_permissions(tmp_path, gate_folder):
    data = tmp_path / "data"
    from trainer.demo import write_demo_dataset
    write_demo_dataset(data, 2, seed=0)
    previous = os.umask(0o002)
    try:
        code = main(["--demo", "--resolution", "32", "--gate-hidden-dim", "8", "--batch-size", "1", "--grad-accum", "1",
                     "--steps", "2", "--save-every", "1", "--no-progress", "--no-tensorboard", "--install",
                     "--output", str(tmp_path / "run"), "--data", str(data)])
    finally:
        os.umask(previous)
    assert code == 0
    written = [p for p in (tmp_path / "run").rglob("*")] + [gate_folder / "maskattn_demo.safetensors"]
    kinds = {p.suffix for p in written if p.is_file()}
    assert {".safetensors", ".pt", ".jsonl", ".json", ".yaml", ""} <= kinds  # gates, cache, state, metrics, COMPLETE
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in written
             if stat.S_IMODE(p.stat().st_mode) != (0o775 if p.is_dir() else 0o664)}
    assert not wrong
