#!/usr/bin/env bash
# Hardware counters of the dense core against cuBLAS on one GPU (Nsight Compute; it reads them on the Firecracker
# machines, not under gVisor: tests/gpu_results and the device library's KINDS.md), for docs/perf/NOTES.md
# ("Compute cores"): the flattened chunk loop with TMA stores (scripts/gemm_variants.py v7, the ops' kernel at world
# size 1) and cuBLAS's kernel, on one shape (default: the goal's 8192x7168x8192).
#     bash scripts/ncu_dense.sh [MxNxK] [OUT_DIR]
# Writes OUT_DIR/ncu_dense.txt (the SpeedOfLight, ComputeWorkloadAnalysis, WarpStateStats and MemoryWorkloadAnalysis
# sections of one launch of each kernel). Clocks are left alone (--clock-control none).
set -uo pipefail
cd "$(dirname "$0")/.."
SHAPE=${1:-8192x7168x8192}
OUT_DIR=${2:-${OUT:-/tmp}}
mkdir -p "$OUT_DIR"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# one pass per kernel (cuBLAS's launches outnumber ours in the script's timing loop, so one filter would catch only them)
: > "$OUT_DIR/ncu_dense.txt"
rc=0
for kernels in "regex:_variant_kernel" "regex:nvjet|sm90_xmma|cutlass"; do
    ncu --clock-control none --target-processes all -k "$kernels" --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
        python3 -m triton_dist run -n 1 scripts/gemm_variants.py --shapes "$SHAPE" --variants v7_g16 --iters 2 \
        >> "$OUT_DIR/ncu_dense.txt" 2>&1 || rc=$?
done
grep -E "^  [a-z_0-9]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Tensor|Issue Slot|No Eligible|Stall" \
    "$OUT_DIR/ncu_dense.txt" | head -120
exit $rc
