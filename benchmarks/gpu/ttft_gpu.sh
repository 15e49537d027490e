#!/usr/bin/env bash
# The TTFT tables on a GPU machine: a stock server (radix cache only) and a --kvcomm server of the
# same build and model side by side on one GPU, then benchmarks/ttft.py against both.
#
# Run from the project root on the GPU box, with the bundle of ../shared/gpu (build it here with
# `bash ../shared/gpu/build_bundle.sh .gpu`) and a wheel of this project in .gpu/
# (`.venv/bin/pip wheel --no-deps . -w .gpu/`):
#   OUT=/tmp/out bash benchmarks/gpu/ttft_gpu.sh --table 2 [more ttft.py flags]
# Env: OUT (results and server logs), KVCOMM_FLAGS (the --kvcomm server's flags; the default
# gate threshold 1.0 is for dummy weights, whose KV gives the entropy gate no signal).
# Each server gets --max-total-tokens 65536 (8 GiB of KV at Llama-3.1-8B shape), so both fit with
# the --kvcomm server's anchors and bases (--kvcomm-max-memory-mb) on an 80 GB GPU.
set -euo pipefail
B=$PWD/.gpu
OUT=${OUT:-/tmp/ttft_out}
KVCOMM_FLAGS=${KVCOMM_FLAGS:---kvcomm-threshold 1.0 --kvcomm-max-memory-mb 12000}
mkdir -p "$OUT" /tmp/site /tmp/models
# Unpack once here: the two start-ups below run in parallel.
[ -f /tmp/site/.unpacked ] || { tar -xJf $B/site.tar.xz -C /tmp/site && touch /tmp/site/.unpacked; }
[ -d /tmp/models/llama31-8b-dummy ] || tar -xJf $B/model.tar.xz -C /tmp/models
[ -d "$HOME/.cache/tvm-ffi" ] || tar -xzf $B/jit_cache_h100.tgz -C "$HOME"
# --upgrade: a /tmp/site left by an earlier run on the same host keeps its old copy otherwise.
# Servers start in /tmp: from the project root, its sglang_kvcomm/ and radix_anchor/ would shadow
# the wheel's (python -m puts the working directory first on sys.path), its kernels would not.
pip install -q --upgrade --no-deps --target /tmp/site $B/sglang_kvcomm-*.whl
SHARED=(--mem-fraction-static 0.9 --max-total-tokens 65536)
trap 'pkill -TERM -f sglang.launch_server || true' EXIT
(cd /tmp && LOG=$OUT/radix.log source $B/start_server.sh --port 30000 "${SHARED[@]}") & radix=$!
(cd /tmp && LOG=$OUT/kvcomm.log source $B/start_server.sh --port 30001 "${SHARED[@]}" --kvcomm $KVCOMM_FLAGS) &
kvcomm=$!
wait $radix && wait $kvcomm
export PYTHONPATH=/tmp/site:$PWD/benchmarks
python3 benchmarks/ttft.py --radix-url http://127.0.0.1:30000 --kvcomm-url http://127.0.0.1:30001 \
  --vocab 128000 --out "$OUT" "$@"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/gpu.csv"
