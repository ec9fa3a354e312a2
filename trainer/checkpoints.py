"""Never lose work: atomic checkpoints, resume from the newest complete one, keep the last K.

A checkpoint is a folder `checkpoints/step-00001000/` holding
  gates.safetensors  the gates at that step, a file MaskAttn Loader reads as it is;
  state.pt           optimizer, scheduler, RNG states, step and position in the data order
                     (plain tensors and numbers: torch.load(weights_only=True) reads it);
  COMPLETE           written last: a folder without it is ignored and cleaned up.
The folder is written under a temporary name and renamed, so a crash or a full disk
never damages the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from maskattn_core import GateSet, load_gate_file, save_gate_file

PREFIX = "step-"
MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written or read; the message says what is still safe."""


def checkpoint_dir(output: Path) -> Path:
    return Path(output) / "checkpoints"


def complete_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_dir(output)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output: Path) -> Path | None:
    found = complete_checkpoints(output)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(output: Path, step: int, gate_set: GateSet, training_state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep_last` complete ones."""
    root = checkpoint_dir(output)
    final = root / f"{PREFIX}{step:08d}"
    if (final / MARKER).is_file():
        return final
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_gate_file(gate_set, tmp / "gates.safetensors")
        torch.save(dict(training_state, rng=rng_state()), tmp / "state.pt")
        for name in ("gates.safetensors", "state.pt"):
            _fsync(tmp / name)
        if final.exists():  # an incomplete leftover of the same step
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker = final / f".{MARKER}.tmp"
        marker.write_text(json.dumps({"step": step}))
        os.replace(marker, final / MARKER)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(output)
        safe = f"the last good checkpoint {last} is intact" if last else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write the checkpoint for step {step} in {root}: "
                              f"{error.strerror or error} ({type(error).__name__}); {safe}") from error
    prune(output, keep_last)
    return final


def prune(output: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of interrupted writes."""
    root = checkpoint_dir(output)
    for old in complete_checkpoints(output)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(f".{PREFIX}*.tmp-*"):
        if leftover.name.endswith(f"-{os.getpid()}"):
            continue
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_checkpoint(path: Path) -> tuple[GateSet, dict]:
    """(the gates, the training state) of a complete checkpoint folder."""
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    try:
        gate_set = load_gate_file(path / "gates.safetensors")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file: say which, and that older checkpoints may still be good
        raise CheckpointError(f"checkpoint {path} cannot be read ({error}); delete it to resume from the "
                              "previous one") from error
    return gate_set, state
