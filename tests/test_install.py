"""A user's checkout: a folder named as the README says, set up by scripts/setup.sh."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from maskattn_comfy import host

REPO = Path(__file__).resolve().parent.parent
# What setup.sh, the demo and the tests make inside a checkout; a fresh clone has none of it.
NOT_IN_A_CLONE = shutil.ignore_patterns(".git", ".venv", ".comfyui", ".comfyui_path", ".cache", "output",
                                        "maskattn-demo", "__pycache__", ".pytest_cache", ".whl")


def test_the_suite_runs_in_a_checkout_folder_that_is_not_a_python_identifier(tmp_path):
    checkout = tmp_path / "ComfyUI-MaskAttn"
    shutil.copytree(REPO, checkout, ignore=NOT_IN_A_CLONE, symlinks=True)
    env = dict(os.environ, COMFYUI_PATH=str(host.find_comfyui()))
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_benchmark_schedule.py", "-q"],
                         cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "error" not in run.stdout.lower()


def test_torchaudio_is_installed_beside_torch_for_current_comfyui():
    # ComfyUI's comfy/sd.py imports torchaudio at start since about 0.20; scripts/setup.sh installs it.
    import torch
    import torchaudio

    assert torchaudio.__version__.split("+")[0] and torch.__version__.split("+")[0]
