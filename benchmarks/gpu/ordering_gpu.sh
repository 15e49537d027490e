#!/usr/bin/env bash
# On the GPU box: one --kvcomm server (overlap scheduler on, SGLang's default) and
# benchmarks/ordering.py against it: the same reused prompt idle and under concurrent decode load.
# Run from the project root with the bundle of ../shared/gpu in .gpu/ and a wheel of this project
# there (see ttft_gpu.sh):  OUT=/tmp/out bash benchmarks/gpu/ordering_gpu.sh [ordering.py flags]
# Env: OUT (results and the server log), KVCOMM_FLAGS (gate threshold 1.0: dummy weights give the
# entropy gate no signal; 12 GB holds the 2K-token content's base and its pool's anchors at 8B shape).
set -euo pipefail
B=$PWD/.gpu
OUT=${OUT:-/tmp/ordering_out}
KVCOMM_FLAGS=${KVCOMM_FLAGS:---kvcomm-threshold 1.0 --kvcomm-max-memory-mb 12000}
mkdir -p "$OUT" /tmp/site
[ -f /tmp/site/.unpacked ] || { tar -xJf $B/site.tar.xz -C /tmp/site && touch /tmp/site/.unpacked; }
# --upgrade: a /tmp/site left by an earlier run on the same host keeps its old copy otherwise.
# Servers start in /tmp: from the project root, its sglang_kvcomm/ and radix_anchor/ would shadow
# the wheel's (python -m puts the working directory first on sys.path), its kernels would not.
pip install -q --upgrade --no-deps --target /tmp/site $B/sglang_kvcomm-*.whl
trap 'pkill -TERM -f sglang.launch_server || true' EXIT
pushd /tmp > /dev/null
LOG=$OUT/kvcomm.log source $B/start_server.sh --port 30001 --mem-fraction-static 0.85 --kvcomm $KVCOMM_FLAGS
popd > /dev/null
export PYTHONPATH=/tmp/site:$PWD/benchmarks
python3 benchmarks/ordering.py --url http://127.0.0.1:30001 --vocab 128000 --out "$OUT" "$@"
