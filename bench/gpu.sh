#!/usr/bin/env bash
# bench/gpu.sh OUT_DIR [--steps N] [--repeats N] [--batch-size N] [--peak-tflops T] [--device cpu --quick]
#
# Figures 1, 2 and 5 of bench/ (tracking overhead, checkpoint bytes, throughput against a plain HF Trainer + PEFT
# script) on a Qwen2.5-0.5B-shaped model in bf16 on one CUDA GPU, plus tokens/s and model FLOP utilisation. The
# table goes to OUT_DIR/results.md (and results.json). Before them, a 1-GPU FSDP smoke run (bench/fsdp_smoke.py:
# LoRA-only full checkpoints, resume, export, eval under training.strategy=fsdp) writes OUT_DIR/fsdp_smoke.md; a
# failed check is reported and the figures still run. Killed after 2 + 7 minutes.
#
# Works offline. It needs torch, lightning, transformers and peft installed; what else loratrace's training
# imports (pyarrow; duckdb for the end-of-run samples index, optional) is installed from the wheels in
# bench/wheels/ into a private folder, never into the environment. Fill bench/wheels/ where a package index is
# reachable:  bench/fetch_wheels.sh [PYTHON_VERSION]
set -euo pipefail

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: bench/gpu.sh OUT_DIR [--steps N] [--repeats N] [--batch-size N] [--peak-tflops T]" >&2
    exit 2
fi
out="$1"; shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python3}"

if ! "$python" -c "import torch, lightning, transformers, peft" 2>/dev/null; then
    echo "gpu.sh: $python lacks one of torch, lightning, transformers, peft (this script installs only the rest)" >&2
    exit 2
fi

deps="${TMPDIR:-/tmp}/loratrace-bench-deps-$("$python" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
export PYTHONPATH="$root/src:$root:$deps${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$python" -c '
import importlib.util
need = {"pyarrow": "pyarrow", "yaml": "pyyaml", "duckdb": "duckdb"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))')
for pkg in $missing; do
    if "$python" -m pip install --quiet --no-index --find-links "$here/wheels" --target "$deps" "$pkg" 2>/dev/null; then
        echo "gpu.sh: installed $pkg from bench/wheels into $deps"
    elif [ "$pkg" = duckdb ]; then
        echo "gpu.sh: no duckdb wheel in bench/wheels: runs skip their samples index (the figures do not need it)"
    else
        echo "gpu.sh: $pkg is not installed and bench/wheels/ has no wheel for this Python;" \
             "run bench/fetch_wheels.sh $("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
             "where a package index is reachable" >&2
        exit 2
    fi
done

mkdir -p "$out"
cd "$root"
device=cuda
previous=""
for arg in "$@"; do  # --device cpu: the smoke run checks the same things under ddp (Lightning's FSDP needs CUDA)
    if [ "$previous" = "--device" ]; then device="$arg"; fi
    previous="$arg"
done
smoke=0
timeout 120 "$python" -m bench.fsdp_smoke --out "$out" --device "$device" || smoke=$?
timeout 420 "$python" -m bench.gpu --out "$out" "$@"
if [ "$smoke" -ne 0 ]; then
    echo "gpu.sh: the FSDP smoke run failed (exit $smoke): see $out/fsdp_smoke.md and the lines above" >&2
    exit "$smoke"
fi
