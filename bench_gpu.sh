#!/usr/bin/env bash
# Full-size GPU benchmark of the torch cases (similarity scoring, training step, DAA loss), under 5 minutes.
#
#   bash bench_gpu.sh        # tables in bench_gpu.md and bench_gpu_compile.md, under $OUT when it is set
#
# The numpy cases (ASP, PMRP, TF-IDF, np2h) run on the CPU whatever the device: `python bench.py` covers them.
# The torch.compile rows run separately, so that a compiler failure (no Triton, say) costs only those rows.
# Without a CUDA device the script runs the same commands as a CPU smoke run (--quick), which checks it anywhere.
set -euo pipefail
cd "$(dirname "$0")"
out_dir="${OUT:-.}"
mkdir -p "$out_dir"
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    options=(--device cuda)
else
    echo "bench_gpu.sh: no CUDA device, running the CPU smoke benchmark (--quick) instead" >&2
    options=(--device cpu --quick)
fi
timeout 170 python bench.py "${options[@]}" --cases similarity train daa --out "$out_dir/bench_gpu.md"
timeout 110 python bench.py "${options[@]}" --cases similarity --compile --out "$out_dir/bench_gpu_compile.md" \
    || echo "bench_gpu.sh: the torch.compile run failed or timed out (exit $?); bench_gpu.md is complete" >&2
