"""Never lose work: atomic checkpoints, resume from the newest complete one, keep the last K.

A checkpoint is a folder `checkpoints/step-00001000/` holding
  gates.safetensors  the gates at that step, a file MaskAttn Loader reads as it is;
  state.pt           optimizer, scheduler, RNG states, step and position in the data order
                     (plain tensors and numbers: torch.load(weights_only=True) reads it);
  COMPLETE           a folder without it is ignored.
The folder is written whole under a hidden temporary name and renamed, so a crash or a full
disk never damages the last good checkpoint; --resume passes over a checkpoint whose files
were damaged later (a truncated copy) for the one before it, and says so.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from maskattn_core import GateSet, load_gate_file, save_gate_file

PREFIX = "step-"
MARKER = "COMPLETE"
_STEP_FOLDER = re.compile(re.escape(PREFIX) + r"[0-9]+")


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written or read; the message says what is still safe."""


def checkpoint_dir(output: Path) -> Path:
    return Path(output) / "checkpoints"


def complete_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_dir(output)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_FOLDER.fullmatch(p.name) and p.is_dir() and (p / MARKER).is_file()]
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


def _fsync_folder(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some systems (Windows): nothing to sync there
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_checkpoint(output: Path, step: int, gate_set: GateSet, training_state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep_last` complete ones.

    Everything, the COMPLETE marker included, is written into a hidden temporary folder that one
    rename makes visible: a failure at any point (a full disk, a kill) leaves the earlier
    checkpoints as they were and no partial folder under a checkpoint's name.
    """
    root = checkpoint_dir(output)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_gate_file(gate_set, tmp / "gates.safetensors")
        torch.save(dict(training_state, rng=rng_state()), tmp / "state.pt")
        (tmp / MARKER).write_text(json.dumps({"step": step}))
        for name in ("gates.safetensors", "state.pt", MARKER):
            _fsync(tmp / name)
        _fsync_folder(tmp)
        if final.exists():  # a leftover of the same step: unreadable (passed over by --resume) or incomplete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_folder(root)
    except Exception as error:  # OSError, or what torch (RuntimeError) and safetensors make of a full disk
        last = latest_checkpoint(output)
        safe = f"the last good checkpoint {last} is intact" if last else "no earlier checkpoint exists"
        why = getattr(error, "strerror", None) or str(error).strip() or "no reason given"
        raise CheckpointError(f"could not write the checkpoint for step {step} in {root}: {why} "
                              f"({type(error).__name__}); {safe}. Free some space (or fix the folder's "
                              "permissions) and run again with --resume") from error
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("state.pt holds no training state")
    except Exception as error:  # a damaged file: say which, and that older checkpoints may still be good
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); delete it to "
                              "resume from the previous one") from error
    return gate_set, state


def load_newest_readable(output: Path, say=print) -> tuple[Path, GateSet, dict, list[Path]] | None:
    """(path, gates, state, the damaged newer ones) of the newest complete checkpoint that reads; a
    damaged newer one (a truncated file) is reported through `say` and passed over for the one before
    it. None when there is no checkpoint at all; CheckpointError when there are some and none reads."""
    found = complete_checkpoints(output)
    damaged: list[Path] = []
    problems = []
    for path in reversed(found):
        try:
            gate_set, state = load_checkpoint(path)
        except CheckpointError as error:
            problems.append(str(error.__cause__ or error))
            damaged.append(path)
            say(f"--resume: checkpoint {path.name} cannot be read ({error.__cause__ or error}); "
                "trying the one before it")
            continue
        if damaged:
            say(f"--resume: resuming from {path.name}, the newest checkpoint that reads")
        return path, gate_set, state, damaged
    if found:
        raise CheckpointError(f"none of the {len(found)} checkpoints in {checkpoint_dir(output)} can be read "
                              f"({'; '.join(problems)}); start a new run without --resume or in a new --output")
    return None


def set_aside(damaged: list[Path], say=print) -> None:
    """Rename unreadable checkpoints to `step-N.damaged`: kept for inspection, no longer counted by --keep-last
    (which could otherwise prune the good ones and keep them) or found by --resume."""
    for path in damaged:
        target = path.with_name(path.name + ".damaged")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(path, target)
        say(f"--resume: set the unreadable checkpoint aside as {target}")
