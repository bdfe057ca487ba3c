#!/usr/bin/env bash
# The GPU suite: every test on CUDA worlds of 2, 3 and 4 ranks (and all GPUs when there are more), the GPU-only
# tests, the tutorials (SKIP_TUTORIALS=1 skips them), then the primitive, collective and GEMM benchmarks on all
# local GPUs, the compute-core and attention benchmarks on one, the MoE and end-to-end benchmarks and `triton-dist
# generate` (Qwen3-8B shape, random weights) on all. On a machine with fewer than 4 GPUs the worlds larger than the
# machine share GPUs (shared-GPU worlds, TRITON_DIST_TEST_SHARE_GPUS=1) under one private MPS daemon started here
# (NO_MPS=1: none, the ranks time-slice); the tutorials then run on 4 ranks sharing the GPUs, and the benchmarks at
# world size 1 are the no-communication reference (SHARED_BENCH=1 adds a shared-world bench run, whose rows are
# marked shared_gpu: not performance).
# Run on a machine with GPUs from the repository root:
#     TRITON_DIST_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_suite.sh [OUT_DIR]
# (TRITON_DIST_COMMIT names the commit in the benchmark rows where the checkout has no .git.)
# Writes OUT_DIR/pytest.log, OUT_DIR/junit-<test file>.xml, OUT_DIR/<card>.jsonl (bench rows) and a summary table
# (last). TEST_FILES, FILE_TIMEOUT, TEST_TIMEOUT, PYTEST_ARGS, SKIP_BENCH, BENCH_ARGS, COLL_ARGS, GEMM_ARGS, CORES_ARGS,
# ATTN_ARGS, MOE_ARGS, E2E_ARGS adjust it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-tests/gpu_results/latest}}
mkdir -p "$OUT_DIR"
# NVLink multicast stays off on shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the autotuner's cache of this run (not a stale ~/.cache from another commit)
export TRITON_DIST_CACHE_DIR=${TRITON_DIST_CACHE_DIR:-$OUT_DIR/tune_cache}
PY=${PYTHON:-python3}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $NGPU"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 8

# World sizes of the `world` fixtures: 2, 3 and 4, plus all GPUs on a larger machine (e.g. 8).
if [ -z "${TRITON_DIST_TEST_WORLD_SIZES:-}" ]; then
    export TRITON_DIST_TEST_WORLD_SIZES=2,3,4
    [ "$NGPU" -gt 4 ] && export TRITON_DIST_TEST_WORLD_SIZES=2,3,4,$NGPU
fi
SHARE_ARGS=""
TUT_N=$NGPU
if [ "$NGPU" -lt 4 ]; then
    export TRITON_DIST_TEST_SHARE_GPUS=1
    [ "$NGPU" -lt 2 ] && { TUT_N=4; SHARE_ARGS="--share-gpus"; }
    if [ "${NO_MPS:-0}" != 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
        eval "$($PY -m triton_dist mps start)" || exit 1
        trap '$PY -m triton_dist mps stop "$TRITON_DIST_MPS_ROOT"' EXIT
        echo "shared-GPU worlds under a private MPS daemon ($CUDA_MPS_PIPE_DIRECTORY)"
    else
        export CUDA_MPS_PIPE_DIRECTORY=/nonexistent/triton_dist_no_mps  # off any daemon: the ranks time-slice
        echo "shared-GPU worlds without MPS: ranks time-slice the GPU"
    fi
fi
# One pytest per test file, each under its own deadline (FILE_TIMEOUT s) and a per-test timeout (TEST_TIMEOUT s), so
# that a stalled test costs one file, not the rest of the suite. TEST_FILES picks files (default: every file that
# touches a device; the CPU-only files below, which mock the GPU or run CPU worlds, run in CI and are left out).
CPU_ONLY="test_launcher test_shared_gpu test_gpu_compile test_tutorials test_bench_collectives test_bench_gemm"
CPU_ONLY="$CPU_ONLY test_bench_cores"
if [ -z "${TEST_FILES:-}" ]; then
    TEST_FILES=""
    for f in tests/test_*.py; do
        case " $CPU_ONLY " in *" $(basename "$f" .py) "*) ;; *) TEST_FILES="$TEST_FILES $f" ;; esac
    done
fi
TEST_RC=0
for f in $TEST_FILES; do
    name=$(basename "$f" .py)
    TRITON_DIST_TEST_BACKEND=cuda timeout "${FILE_TIMEOUT:-600}" $PY -m pytest -q -m "" "$f" -p no:cacheprovider \
        --timeout "${TEST_TIMEOUT:-240}" --junitxml="$OUT_DIR/junit-$name.xml" ${PYTEST_ARGS:-} 2>&1 \
        | tee -a "$OUT_DIR/pytest.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "$f: stopped after ${FILE_TIMEOUT:-600} s (no junit report)" | tee -a "$OUT_DIR/pytest.log"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && TEST_RC=1  # 5: no tests collected
done

# The tutorials as their users run them, on all local GPUs; each exits non-zero when its result differs from torch.
TUT_RC=0
if [ "${SKIP_TUTORIALS:-0}" != 1 ]; then
    for t in tutorials/0*.py; do
        timeout "${TUTORIAL_TIMEOUT:-240}" $PY -m triton_dist run -n "$TUT_N" $SHARE_ARGS "$t" \
            > "$OUT_DIR/$(basename "$t" .py).log" 2>&1
        rc=$?
        echo "tutorial $t on $TUT_N ranks, $NGPU GPU(s): rc $rc; $(grep -i -m1 'match\|exactly' "$OUT_DIR/$(basename "$t" .py).log")" \
            | tee -a "$OUT_DIR/tutorials.log"
        [ "$rc" -ne 0 ] && TUT_RC=1
    done
    # ten init()/finalize() cycles in one process, with ops in every world
    timeout 240 $PY -m triton_dist run -n "$TUT_N" $SHARE_ARGS tests/scripts/reinit.py 10 > "$OUT_DIR/reinit.log" 2>&1
    rc=$?
    echo "reinit (10 init/finalize cycles) on $TUT_N ranks: rc $rc" | tee -a "$OUT_DIR/tutorials.log"
    [ "$rc" -ne 0 ] && TUT_RC=1
fi

BENCH_RC=0
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    $PY -m triton_dist bench primitives -n "$NGPU" --out "$OUT_DIR" ${BENCH_ARGS:-} 2>&1 | tee "$OUT_DIR/bench.log"
    BENCH_RC=${PIPESTATUS[0]}
    $PY -m triton_dist bench collectives -n "$NGPU" --out "$OUT_DIR" --plot "$OUT_DIR/collectives.png" \
        ${COLL_ARGS:-} 2>&1 | tee "$OUT_DIR/bench_collectives.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || BENCH_RC=1
    $PY -m triton_dist bench gemm -n "$NGPU" --out "$OUT_DIR" --plot "$OUT_DIR/gemm.png" \
        ${GEMM_ARGS:-} 2>&1 | tee "$OUT_DIR/bench_gemm.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || BENCH_RC=1
    # the single-GPU compute cores (dense, decode, grouped) against cuBLAS / torch._grouped_mm, at world size 1
    # (default: the dense shapes and Qwen3-8B at TP 1 and 8 at four decode sizes; the full decode sweep, every model,
    # shard and M with its tuning, takes ~20 min on an H200: pass CORES_ARGS="--models ... --tp ... --m ..." in parts)
    $PY -m triton_dist bench cores -n 1 --out "$OUT_DIR" --plot "$OUT_DIR/cores.png" \
        ${CORES_ARGS:---models qwen3-8b --tp 1,8 --m 1,16,64,256} 2>&1 | tee "$OUT_DIR/bench_cores.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || BENCH_RC=1
    # attention at world 1 (local kernels against SDPA), MoE and the end-to-end engine on all local GPUs
    $PY -m triton_dist bench attention -n 1 --out "$OUT_DIR" --plot "$OUT_DIR/attention.png" ${ATTN_ARGS:-} 2>&1 \
        | tee "$OUT_DIR/bench_attention.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || BENCH_RC=1
    $PY -m triton_dist bench moe -n "$NGPU" --out "$OUT_DIR" --plot "$OUT_DIR/moe.png" \
        ${MOE_ARGS:---cases ep_ll,ep_normal,tp} 2>&1 | tee "$OUT_DIR/bench_moe.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || BENCH_RC=1
    $PY -m triton_dist bench e2e -n "$NGPU" --out "$OUT_DIR" --plot "$OUT_DIR/e2e.png" \
        ${E2E_ARGS:---model qwen3-8b --batch 1,8 --context 512} 2>&1 | tee "$OUT_DIR/bench_e2e.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || BENCH_RC=1
    # the generate command as its users run it (the CPU-world command tests of tests/test_engine.py skip on GPUs)
    $PY -m triton_dist generate --tp "$NGPU" --model qwen3-8b --mode all --batch 1 --prompt-len 512 --gen-len 32 \
        2>&1 | tee "$OUT_DIR/generate.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || BENCH_RC=1
    if [ "${SHARED_BENCH:-0}" = 1 ] && [ -n "$SHARE_ARGS" ]; then  # plumbing of the benches in a shared world
        $PY -m triton_dist bench collectives -n 2 $SHARE_ARGS --out "$OUT_DIR" ${SHARED_COLL_ARGS:-} 2>&1 \
            | tee "$OUT_DIR/bench_shared.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || BENCH_RC=1
    fi
fi

$PY - "$OUT_DIR" "$TEST_RC" "$BENCH_RC" <<'PY'
import glob, json, os, sys, xml.etree.ElementTree as ET
out, test_rc, bench_rc = sys.argv[1], sys.argv[2], sys.argv[3]
totals = dict(tests=0, failures=0, errors=0, skipped=0)
for path in sorted(glob.glob(f"{out}/junit-*.xml")):
    try:
        a = ET.parse(path).getroot().find("testsuite").attrib
    except (OSError, ET.ParseError, AttributeError) as e:
        print(f"{path}: no report ({e})")
        continue
    for k in totals:
        totals[k] += int(a[k])
    print(f"{path.split('junit-')[-1][:-4]:<24} {a['tests']:>4} run {a['failures']:>3} failed {a['errors']:>3} errors "
          f"{a['skipped']:>3} skipped")
print(f"tests: {totals['tests']} run, {totals['failures']} failed, {totals['errors']} errors, {totals['skipped']} "
      f"skipped (rc {test_rc})")
if os.path.exists(f"{out}/tutorials.log"):
    print(open(f"{out}/tutorials.log").read().rstrip())
print(f"bench rc {bench_rc}")
for path in glob.glob(f"{out}/*.jsonl"):
    rows = [json.loads(l) for l in open(path)]
    last = rows[-1]["run_id"] if rows else None
    for r in rows:
        if r["run_id"] == last:
            gb = "" if r["gbps"] is None else f"{r['gbps']:.1f} GB/s"
            if r.get("tflops") is not None:
                gb = f"{r['tflops']:.1f} TFLOP/s"
            print(f"{r['op']:<14} {r['shape']:<32} {r['provider']:<28} {r['median_us']:>10.2f} us  {gb}")
PY
exit $(( TEST_RC != 0 || TUT_RC != 0 || BENCH_RC != 0 ))
