"""benchmarks/gpu_check.py, the one-command GPU check, runs its own code on the CPU at tiny size (--smoke)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from maskattn_comfy import host

REPO = Path(__file__).resolve().parent.parent
PARTS = ["sampling, default gates", "sampling, strength 0", "sampling, outside step range"]
VISUALIZE = ["Visualize Mask, gate probability", "Visualize Mask, attention difference"]
TRAINER = [f"trainer, batch {b}, {gc} gradient checkpointing" for gc in ("no", "with") for b in (1, 2)]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = dict(os.environ, COMFYUI_PATH=str(host.find_comfyui()))
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--json", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout, json.loads(out.read_text())


def test_the_smoke_run_prints_one_table_with_every_row_in_order(smoke):
    stdout, _ = smoke
    final = stdout[stdout.rindex("\nGPU check: "):]
    assert "torch " in final and "ComfyUI 0." in final
    lines = [line for line in final.splitlines() if line.startswith("|")]
    assert lines[0] == "| part | configuration | result | goal | met |"
    parts = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert parts == PARTS + VISUALIZE + PARTS + TRAINER
    assert [line.split(" | ")[1].split(",")[0] for line in lines[2:8]] == ["fp32"] * 5 + ["bf16"]
    assert not any("FAILED" in line for line in lines)


def test_the_numbers_are_sane(smoke):
    _, result = smoke
    rows = {(row["part"], row["configuration"].split(",")[0]): row for row in result["rows"]}
    assert result["environment"]["comfyui"] and result["environment"]["torch"] and result["environment"]["device"]
    for dtype in ("fp32", "bf16"):
        for part in PARTS:
            row = rows[(part, dtype)]
            for key in ("ratio", "ratio_min", "ratio_max", "unpatched_s"):
                assert math.isfinite(row[key]) and row[key] > 0, (part, dtype, key, row[key])
            assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
            assert math.isfinite(row["peak_extra_mib"])
            assert row["goal"] == (1.01 if part.endswith("default gates") else 1.001)
        # Strength 0 and an empty step range run the unpatched model's code: the same sample, bit for bit.
        assert rows[("sampling, strength 0", dtype)]["same_output"] is True
        assert rows[("sampling, outside step range", dtype)]["same_output"] is True
        assert rows[("sampling, default gates", dtype)]["same_output"] is False
    for part in VISUALIZE:
        row = rows[(part, "fp32")]
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0 and row["plain_s"] > 0
    for part in TRAINER:
        row = rows[(part, "fp32")]
        assert math.isfinite(row["steps_per_s"]) and row["steps_per_s"] > 0
        assert row["peak_mib"] > 0 and row["skipped_steps"] == 0
    assert result["total_s"] > 0 and set(result["seconds"]) >= {"build", "sampling fp32", "visualize", "trainer"}


@pytest.fixture(scope="module")
def gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("maskattn_gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_the_full_check_is_budgeted_under_nine_minutes(gpu_check):
    plan = gpu_check.FULL
    total = sum(plan.budget_s.values()) + plan.budget_s["sampling"] * (len(plan.dtypes) - 1)
    assert total <= 480 and plan.size == 1024 and plan.dtypes == ("fp16", "bf16") and plan.trainer_resolution == 1024
    help_text = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    deadline = int(re.search(r"default (\d+): the device tool", " ".join(help_text.split())).group(1))
    assert total < deadline <= 540 - 15, "a part may start only while there is time left to finish under 9 minutes"


def test_rounds_follow_the_part_s_budget_within_bounds(gpu_check):
    plan = gpu_check.FULL
    assert gpu_check.rounds_for(120, 7.0, plan) == 17
    assert gpu_check.rounds_for(5, 7.0, plan) == plan.min_rounds
    assert gpu_check.rounds_for(10_000, 1.0, plan) == plan.max_rounds
    assert gpu_check.rounds_for(120, 7.0, gpu_check.SMOKE) == gpu_check.SMOKE.min_rounds
