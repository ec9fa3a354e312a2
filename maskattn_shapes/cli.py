"""Argument types and checks shared by the Shapes world's commands: a bad value is one argparse
line (exit 2) before any work, never a traceback minutes later."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def number(kind, text: str):
    """`text` as `kind` (int or float); a float must be finite (NaN compares false with every bound)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def positive(kind):
    def parse(text: str):
        value = number(kind, text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def non_negative(kind):
    def parse(text: str):
        value = number(kind, text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def writable_folder(parser: argparse.ArgumentParser, folder, flag: str) -> Path:
    """Create `folder` and write a probe file in it, or stop with `parser`'s one-line error."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        parser.error(f"{flag} {folder}: cannot write there ({error.strerror or error})")
    return folder
