"""Convert the authors' gate checkpoint (.pt) into this pack's gate file (.safetensors).

    python -m maskattn_core.convert gate_final.pt models/maskattn/gate_final.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .gate_file import save_gate_file
from .official import OfficialCheckpointError, load_official_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maskattn_core.convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="the authors' gate_*.pt")
    parser.add_argument("output", type=Path, nargs="?", help="where to write (default: beside it, .safetensors)")
    args = parser.parse_args(argv)
    output = args.output or args.checkpoint.with_suffix(".safetensors")
    try:
        gate_set = load_official_checkpoint(args.checkpoint)
    except OfficialCheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_gate_file(gate_set, output)
    print(f"wrote {output}: {len(gate_set.layers)} layers, {len(gate_set.heads)} head(s), "
          f"{gate_set.parameter_count()} parameters, config {gate_set.config.to_dict()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
