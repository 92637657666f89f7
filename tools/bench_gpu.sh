#!/usr/bin/env bash
# Full-size GPU benchmark of the torch cases (similarity scoring, training step, DAA loss), under 5 minutes.
#
#   bash tools/bench_gpu.sh [OUT_DIR]   # tables in OUT_DIR/bench_gpu.md and bench_gpu_compile.md (default .)
#
# The numpy cases (ASP, PMRP, TF-IDF, np2h) run on the CPU whatever the device: `python -m tools.bench` covers them.
# The torch.compile rows run separately, so that a compiler failure (no Triton, say) costs only those rows.
# Without a CUDA device the script runs the same commands as a CPU smoke run (--quick), which checks it anywhere.
set -euo pipefail
out_dir="$(realpath -m -- "${1:-.}")"
cd "$(dirname "$0")/.."
mkdir -p "$out_dir"
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    options=(--device cuda)
else
    echo "bench_gpu.sh: no CUDA device, running the CPU smoke benchmark (--quick) instead" >&2
    options=(--device cpu --quick)
fi
timeout 170 python -m tools.bench "${options[@]}" --cases similarity train daa --out "$out_dir/bench_gpu.md"
timeout 110 python -m tools.bench "${options[@]}" --cases similarity --compile --out "$out_dir/bench_gpu_compile.md" \
    || echo "bench_gpu.sh: the torch.compile run failed or timed out (exit $?); bench_gpu.md is complete" >&2
