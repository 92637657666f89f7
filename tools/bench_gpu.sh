#!/usr/bin/env bash
# GPU benchmark and multi-GPU training check, one command, under 8 minutes on one GPU.
#
#   bash tools/bench_gpu.sh [OUT_DIR]   # results under OUT_DIR (default .)
#
# 1. bench_gpu.md: the torch cases (similarity scoring, training step, DAA loss) at full size on CUDA, with the
#    roofline column against the GPU's fp32 torch.mm rate (python -m tools.bench covers the numpy cases on the CPU).
# 2. bench_gpu_compile.md: the torch.compile rows, in a run of their own, so that a compiler failure (no Triton,
#    say) costs only those rows.
# 3. train_gpu.log: a short train.py run on synthetic data at full dims (2048-d regions, embed 1024): SAF, whose
#    gate statistics are pooled over the processes, --amp bf16, --world_size = the visible GPUs capped at 2
#    (2: nccl, VisualSA's SyncBatchNorm and the pooled SAF statistics; 1: one process), one epoch and its
#    validation; the log ends with the epoch's time.
# Without a CUDA device the same steps run as a CPU smoke run, which checks the script anywhere: --quick bench
# sizes, and the training run with 2 gloo processes (pooled SAF statistics; plain BatchNorm, as on every CPU
# run), --amp bf16, on the tiny synthetic data.
set -euo pipefail
out_dir="$(realpath -m -- "${1:-.}")"
cd "$(dirname "$0")/.."
mkdir -p "$out_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
gpus="$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")"
if [ "$gpus" -gt 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    bench=(--device cuda)
    world=$(( gpus < 2 ? gpus : 2 ))
    data=(--n_train 512 --n_dev 100 --n_test 10 --n_testall 25 --datasets f30k_precomp)
    train=(--device cuda --batch_size 128 --img_dim 2048)
else
    echo "bench_gpu.sh: no CUDA device, running the CPU smoke run (--quick bench, 2 gloo processes) instead" >&2
    bench=(--device cpu --quick)
    world=2
    data=(--tiny --datasets f30k_precomp)
    train=(--device cpu --batch_size 8 --img_dim 32 --word_dim 16 --embed_size 32 --sim_dim 16 --threads 1)
fi
timeout 190 python -m tools.bench "${bench[@]}" --cases similarity train daa --out "$out_dir/bench_gpu.md"
timeout 110 python -m tools.bench "${bench[@]}" --cases similarity --compile --out "$out_dir/bench_gpu_compile.md" \
    || echo "bench_gpu.sh: the torch.compile run failed or timed out (exit $?); bench_gpu.md is complete" >&2
python make_synthetic_data.py --out_dir "$work/data" --vocab_dir "$work/vocab" --ann_dir "$work/ann" "${data[@]}" \
    > /dev/null
start=$(date +%s)
timeout 140 python train.py --data_path "$work/data" --vocab_path "$work/vocab" --data_name f30k_precomp \
    --model_name "$work/run" --logger_name "$work/run/log" "${train[@]}" --module_name SAF --amp bf16 \
    --world_size "$world" --num_epochs 1 --log_step 1 --workers 0 --seed 0 > "$out_dir/train_gpu.log" 2>&1 \
    || { echo "bench_gpu.sh: the training run failed (exit $?), see $out_dir/train_gpu.log" >&2; exit 1; }
echo "train.py --module_name SAF --amp bf16 --world_size $world (${train[*]}): $(( $(date +%s) - start )) s" \
    | tee -a "$out_dir/train_gpu.log"
