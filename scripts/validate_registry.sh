#!/usr/bin/env bash
# Validate pyproject.toml the way the Comfy Registry's own CLI does before it publishes:
# `comfy node validate` from comfy-cli (parses [project] and [tool.comfy], checks the version,
# requires-comfyui, the licence and classifier formats, and runs ruff for exec/eval and
# `a; b` lines). comfy-cli reports most problems as warnings and exits 0, dropping the field it
# could not read; here any warning fails. comfy-cli and its dependencies (about 340 MB, uv and
# ruff among them) go into a throwaway virtual environment, never into .venv.
#   bash scripts/validate_registry.sh      # about a minute, most of it pip
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFY_CLI="comfy-cli==1.23.0"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"${PYTHON:-python3}" -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install -q --disable-pip-version-check "$COMFY_CLI"
cd "$here"
# Its own HOME: comfy-cli keeps a config file there and must not ask about telemetry.
if ! out="$(HOME="$scratch" "$scratch/venv/bin/comfy" --skip-prompt --no-enable-telemetry node validate 2>&1 < /dev/null)"; then
  echo "$out"
  echo "[registry] comfy node validate failed" >&2
  exit 1
fi
echo "$out"
if grep -qiE "warning|error" <<<"$out"; then
  echo "[registry] comfy node validate warned: the registry would drop or refuse what it names" >&2
  exit 1
fi
echo "[registry] pyproject.toml passes $COMFY_CLI's comfy node validate"
