#!/usr/bin/env bash
# A second ComfyUI host for the tests, beside the one scripts/setup.sh made:
#   bash scripts/setup_host.sh comfyui-0.33.0.tar.gz DEST
# unpacks the source snapshot into DEST/comfyui and makes DEST/venv, a virtual environment that
# sees .venv's packages (torch included, through a .pth file) and adds that ComfyUI's own
# requirements on top, so neither host's packages change the other's. Then:
#   COMFYUI_PATH=DEST/comfyui DEST/venv/bin/python -m pytest tests -q
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tarball="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
dest="$2"
base_py="$here/.venv/bin/python"
[ -x "$base_py" ] || { echo "[host] run scripts/setup.sh first: $base_py is missing" >&2; exit 1; }

mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
if [ ! -f "$dest/comfyui/comfyui_version.py" ]; then
  echo "[host] unpacking $(basename "$tarball") into $dest/comfyui"
  tmp="$(mktemp -d "$dest/unpack.XXXXXX")"
  tar xzf "$tarball" -C "$tmp"
  rm -rf "$dest/comfyui"
  mv "$(dirname "$(find "$tmp" -maxdepth 2 -name comfyui_version.py | head -1)")" "$dest/comfyui"
  rm -rf "$tmp"
fi

venv="$dest/venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "[host] creating $venv on top of .venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$base_py" -c 'import site; print(site.getsitepackages()[0])' > \
    "$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')/_maskattn_base_venv.pth"
fi
stamp="$venv/.comfy-requirements-installed"
if [ ! -f "$stamp" ]; then
  echo "[host] installing $(cat "$dest/comfyui/comfyui_version.py" | grep -o '"[0-9.]*"') requirements (torch stays .venv's)"
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!])' "$dest/comfyui/requirements.txt" > "$venv/comfy-req.txt"
  "$venv/bin/python" -m pip install -q -r "$venv/comfy-req.txt"
  touch "$stamp"
fi
echo "[host] ready: COMFYUI_PATH=$dest/comfyui $venv/bin/python -m pytest tests -q"
