"""benchmarks/regions_overhead.py runs (its --smoke mode: the tiny model, one step, one round); no timing is checked."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_regions_benchmark_runs_every_variant_in_smoke_mode():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "regions_overhead.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for variant in ("1 region", "4 regions", "loader", "loader + 1 region"):
        assert any(line.startswith(variant + " ") for line in lines), done.stdout
