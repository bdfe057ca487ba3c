"""Compile every GPU kernel of the library, the tests and the benchmarks for sm_90 with Triton's own ptxas, on a
machine without GPUs (``python scripts/compile_gpu_kernels.py``; run by tests/test_gpu_compile.py in a process without TRITON_INTERPRET). Catches what the
interpreter accepts but the compiler does not (non-constexpr globals, type errors in PTX builtins, ...), and kernels
whose shared memory exceeds the H100/H200's 227 KB per block (which only a launch would report).
Prints one line per kernel; exits non-zero if any kernel fails. NVSHMEM kernels are compiled down to ptxas, where
only the unresolved NVSHMEM symbols may fail (libnvshmem_device.bc is not on CPU machines). A second pass compiles the
libshmem_device kernels again with the cuda backend's flavour (``_compile.install(shmem="triton_dist")``: our
triton_dist_shmem.ll) all the way to a cubin, and checks that every libshmem_device name was linked that way."""
import glob
import importlib.util
import itertools
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "compile check needs the compiler, not the interpreter"
os.environ["TRITON_DIST_TEST_BACKEND"] = "cuda"  # keeps tests/conftest.py (imported by test modules) off the interpreter
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import triton_dist.language as dl  # noqa: E402
from triton_dist.language import _compile  # noqa: E402
from triton_dist.language import _shmem_names  # noqa: E402
from triton_dist.language import libshmem_device as shmem  # noqa: E402

_compile.install(shmem="nvshmem")  # first pass: libshmem_device kernels link NVSHMEM (backend "nvshmem")

import test_gpu_stress as S  # noqa: E402
import test_language as T  # noqa: E402
import test_libshmem as L  # noqa: E402
from triton_dist.bench import primitives as P  # noqa: E402
from triton_dist.kernels import ag_gemm as AGG  # noqa: E402
from triton_dist.kernels import _common as C  # noqa: E402
from triton_dist.kernels import all_gather as AG  # noqa: E402
from triton_dist.kernels import all_reduce as AR  # noqa: E402
from triton_dist.kernels import all_to_all as A2A  # noqa: E402
from triton_dist.kernels import decode_gemm as DG  # noqa: E402
from triton_dist.kernels import gemm as GEMM  # noqa: E402
from triton_dist.kernels import gemm_ar as GAR  # noqa: E402
from triton_dist.kernels import gemm_rs as GRS  # noqa: E402
from triton_dist.kernels import grouped_gemm as GG  # noqa: E402
from triton_dist.kernels import reduce_scatter as RS  # noqa: E402
from triton_dist.kernels import routing as RT  # noqa: E402
from triton_dist.kernels import stream_barrier as SB  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # dynamic shared memory per block on H100/H200 (227 KB): compiling does not check it, launching does
failures = []


def check(fn, sig, const=None, nvshmem=False, options=None):
    const = dict(const or {})
    full = dict(sig, **{k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(full.items()) if v.startswith("*")}
    name = f"{fn.__name__}{const or ''}"
    try:
        kernel = triton.compile(ASTSource(fn, full, constexprs=const, attrs=attrs), target=TARGET, options=options)
        if kernel.metadata.shared > SMEM_LIMIT:  # the launch would fail with OutOfResources on the GPU
            failures.append(name)
            print("FAIL", name, f"shared memory {kernel.metadata.shared} > {SMEM_LIMIT} bytes per block")
            return
        print("ok  ", name)
    except Exception as e:  # report every kernel, then fail
        msg = str(e)
        if nvshmem and ("Unresolved extern function 'nvshmem" in msg or "libnvshmem_device.bc was not found" in msg):
            print("ok  ", name, "(up to the NVSHMEM link)")
            return
        failures.append(name)
        print("FAIL", name, msg[-1500:])


def run_families() -> None:
    """Kernel families with their own lists (scripts/compile_checks/<family>.py, each a ``checks(check)`` function
    that calls ``check(fn, signature, constexprs, options=...)`` as above for every GPU configuration of its
    kernels)."""
    for path in sorted(glob.glob(os.path.join(ROOT, "scripts", "compile_checks", "*.py"))):
        spec = importlib.util.spec_from_file_location(f"compile_checks_{os.path.basename(path)[:-3]}", path)
        family = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(family)
        family.checks(check)


def finish() -> None:
    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)


# TRITON_DIST_COMPILE_PART: "all" (default), "main" (the kernels listed below) or "families" (compile_checks/):
# tests/test_gpu_compile.py runs the two parts side by side
PART = os.environ.get("TRITON_DIST_COMPILE_PART", "all")
if PART == "families":
    run_families()
    finish()

coll = {"x_ptr": "*bf16", "out_ptr": "*bf16", "staging_ptr": "*bf16", "pad_ptr": "*i32", "epoch_ptr": "*i32"}
check(AR._one_shot_kernel, dict(coll, n="i32", wait_all="i32", sig="i32"), {"BLOCK": 2048})
check(AR._push_one_shot_kernel, dict(coll, n="i32", slot="i32", wait_all="i32", sig="i32"), {"BLOCK": 2048})
check(AR._two_shot_kernel, dict(coll, n="i32", chunk="i32", wait_all="i32", sig="i32"), {"BLOCK": 2048})
for dt, half in (("bf16", True), ("fp32", False)):
    check(AR._ll_kernel, {"x_ptr": "*i16" if half else "*i32", "out_ptr": f"*{dt}", "buf_ptr": "*i64",
                          "epoch_ptr": "*i32", "n": "i32", "words": "i32", "slot_words": "i32", "sig": "i32",
                          "pad_ptr": "*i32", "pad_counters_ptr": "*i32"},
          {"HALF": half, "BLOCK": 1024})
check(AG._ll_kernel, {"x_ptr": "*i32", "out_ptr": "*i32", "buf_ptr": "*i64", "epoch_ptr": "*i32", "words": "i32",
                      "slot_words": "i32", "sig": "i32", "pad_ptr": "*i32", "pad_counters_ptr": "*i32"},
      {"BLOCK": 1024})
for phase in (0, 1, 2):
    check(C.copy_engine_signal_kernel, {"pad_ptr": "*i32", "epoch_ptr": "*i32", "wait_all": "i32", "sig": "i32"},
          {"PHASE": phase})
check(SB._stream_barrier_kernel, {"slots_ptr": "*i64", "counter_ptr": "*i64"}, options=dict(num_warps=1))
check(AR._push_two_shot_kernel, dict(coll, n="i32", chunk="i32", slot="i32", wait_all="i32", sig="i32"),
      {"BLOCK": 8192})
check(RS._push_kernel, dict(coll, chunk="i32", slot="i32", wait_all="i32", sig="i32"), {"BLOCK": 8192})
check(RS._full_mesh_kernel, dict(coll, chunk="i32", wait_all="i32", sig="i32"), {"BLOCK": 2048})
check(RS._ring_kernel, dict(coll, staging_ptr="*fp32", chunk="i32", wait_all="i32", sig="i32"), {"BLOCK": 2048})
words = {k: ("*i32" if v.startswith("*") else v) for k, v in coll.items()}
check(AG._pull_kernel, dict(words, m="i32", wait_all="i32", sig="i32"), {"BLOCK": 4096})
check(AG._push_kernel, dict(words, m="i32", wait_all="i32", sig="i32"), {"BLOCK": 4096})
check(AG._ring_kernel, dict(words, m="i32", wait_all="i32", sig="i32"), {"BLOCK": 4096})
for equal in (True, False):
    check(A2A._all_to_all_kernel,
          {"x_ptr": "*i32", "out_ptr": "*i32", "staging_ptr": "*i32", "table_ptr": "*i64", "meta_ptr": "*i64",
           "pad_ptr": "*i32", "epoch_ptr": "*i32", "x_words": "i64", "row_words": "i64", "m_rows": "i64",
           "nprog": "i32", "wait_all": "i32", "sig": "i32"}, {"EQUAL": equal, "BLOCK": 4096, "WORLD_BLOCK": 8})
# Overlapped GEMMs, bf16, with the GPU configs (gemm.GPU_CONFIG_16BIT; gemm_ar.decode_config for M <= 64): TMA
# descriptors for A and B (B row-major, or B = w.t()), and the pointer fallback (unit strides specialised, as at run
# time).
G16 = GEMM.GPU_CONFIG_16BIT
gemm_const = dict(BLOCK_M=G16.block_m, BLOCK_N=G16.block_n, BLOCK_K=G16.block_k, GROUP_M=G16.group_m)
gemm_opts = dict(num_warps=G16.num_warps, num_stages=G16.num_stages)
ab_strides = dict(stride_am="i32", stride_ak="i32", stride_bk="i32", stride_bn="i32")


def gemm_operands(block_m, block_n, block_k, tma, trans):
    """Signature entries of a and b, and the unit strides the launcher specialises for the pointer path."""
    if not tma:
        return {"a": "*bf16", "b": "*bf16"}, {"stride_ak": 1, "stride_bn": 1}
    b = f"tensordesc<bf16[{block_n}, {block_k}]>" if trans else f"tensordesc<bf16[{block_k}, {block_n}]>"
    return {"a": f"tensordesc<bf16[{block_m}, {block_k}]>", "b": b}, {}


for tma, trans in ((True, False), (True, True), (False, False)):
    ab, unit = gemm_operands(G16.block_m, G16.block_n, G16.block_k, tma, trans)
    flags = dict(USE_TMA=tma, B_TRANS=trans, DOT_PRECISION="ieee")
    c_desc = f"tensordesc<bf16[{G16.block_m}, {G16.block_n // 2}]>"
    for tma_store in ((False, True) if tma else (False,)):
        sig = dict(ab, c_ptr="*bf16", c_desc=c_desc if tma_store else "*bf16", sig_ptr="*i32", epoch_ptr="*i32",
                   m_loc="i32", N="i32", K="i32", **ab_strides, stride_cm="i32", stride_cn="i32")
        check(AGG._ag_gemm_kernel, {k: v for k, v in sig.items() if k not in unit},
              dict(gemm_const, **flags, **unit, TMA_STORE=tma_store), options=gemm_opts)
    for partial, direct in (("bf16", False), ("fp32", False), ("bf16", True)):
        tma_store = direct and tma
        sig = dict(ab, recv_ptr=f"*{partial}", c_desc=c_desc if tma_store else f"*{partial}", flags_ptr="*i32",
                   sig_ptr="*i32", hdr_ptr="*i64", epoch_ptr="*i32", m_loc="i32", N="i32", K="i32", **ab_strides,
                   slot_stride="i32", call_sig="i32")
        check(GRS._gemm_rs_kernel, {k: v for k, v in sig.items() if k not in unit},
              dict(gemm_const, **flags, **unit, DIRECT=direct, TMA_STORE=tma_store), options=gemm_opts)
    dec = GAR.GemmConfig(64, 64, 128, group_m=1, num_stages=4, num_warps=4)  # decode_config(64, bf16) on GPUs
    ab, unit = gemm_operands(dec.block_m, dec.block_n, dec.block_k, tma, trans)
    sig = dict(ab, out_ptr="*bf16", slots_ptr="*bf16", flags_ptr="*i32", pad_ptr="*i32", hdr_ptr="*i64",
               epoch_ptr="*i32", M="i32", N="i32", K="i32", **ab_strides, slot_stride="i32", call_sig="i32")
    check(GAR._gemm_ar_kernel, {k: v for k, v in sig.items() if k not in unit},
          dict(BLOCK_M=dec.block_m, BLOCK_N=dec.block_n, BLOCK_K=dec.block_k, **flags, **unit),
          options=dict(num_warps=dec.num_warps, num_stages=dec.num_stages))
# The narrow dense config (gemm.GPU_CONFIG_16BIT_NARROW: output shapes whose waves 256-wide tiles fill badly)
GN = GEMM.GPU_CONFIG_16BIT_NARROW
ab, unit = gemm_operands(GN.block_m, GN.block_n, GN.block_k, True, True)
check(AGG._ag_gemm_kernel, dict(ab, c_ptr="*bf16", c_desc=f"tensordesc<bf16[{GN.block_m}, {GN.block_n}]>",
                                sig_ptr="*i32", epoch_ptr="*i32", m_loc="i32", N="i32", K="i32", **ab_strides,
                                stride_cm="i32", stride_cn="i32"),
      dict(BLOCK_M=GN.block_m, BLOCK_N=GN.block_n, BLOCK_K=GN.block_k, GROUP_M=GN.group_m, USE_TMA=True, B_TRANS=True,
           DOT_PRECISION="ieee", TMA_STORE=True), options=dict(num_warps=GN.num_warps, num_stages=GN.num_stages))
# The decode core at its default GPU configs for M = 1 and M = 128 (K = 12288, N = 4096: split K), each operand
# flavour, with that split and without.
for m, tma, trans in itertools.product((1, 128), (True, False), (False, True)):
    dc = DG.default_config(m, 4096, 12288, torch.bfloat16, 132)
    if not tma and trans:
        continue
    for split in (1, dc.split_k):
        ab, unit = gemm_operands(dc.block_m, dc.block_n, dc.block_k, tma, trans)
        sig = dict(ab, c="*bf16", ws_ptr="*fp32", count_ptr="*i32", M="i32", N="i32", K="i32", **ab_strides,
                   stride_cm="i32", stride_cn="i32", kt_per_split="i32")
        check(DG._decode_gemm_kernel, {k: v for k, v in sig.items() if k not in unit},
              dict(BLOCK_M=dc.block_m, BLOCK_N=dc.block_n, BLOCK_K=dc.block_k, SPLIT_K=split, USE_TMA=tma,
                   B_TRANS=trans, DOT_PRECISION="ieee", PDL=m == 1 and tma and trans,
                   PERSISTENT=split > 1 and tma, **unit),
              options=dict(num_warps=dc.num_warps, num_stages=dc.num_stages, launch_pdl=m == 1 and tma and trans))
# The grouped core at its default configs for prefill (4096 rows per expert) and decode groups (1, 16, 128 rows), bf16
# and fp32, each weight flavour (3-D TMA descriptor [E, K, N] or [E, N, K], or pointers), with and without split K.
gg_cases = [(torch.bfloat16, 4096, 1792, 4096, 8), (torch.float32, 4096, 1792, 4096, 8),
            (torch.bfloat16, 1, 1792, 4096, 8), (torch.bfloat16, 16, 1536, 2048, 128),
            (torch.bfloat16, 128, 1536, 2048, 128), (torch.float32, 16, 1536, 2048, 128)]
gg_seen = set()
for (dt, rows, n, k, act), (tma, trans) in itertools.product(gg_cases, ((True, False), (True, True), (False, False))):
    gc = GG.default_config(dt, rows, n=n, k=k, active_experts=act, sms=132)
    el = "bf16" if dt == torch.bfloat16 else "fp32"
    for split in sorted({1, gc.split_k}):
        if (el, gc, split, tma, trans) in gg_seen:
            continue
        gg_seen.add((el, gc, split, tma, trans))
        if tma:
            wd = [gc.block_n, gc.block_k] if trans else [gc.block_k, gc.block_n]
            xw, unit = {"x": f"tensordesc<{el}[{gc.block_m}, {gc.block_k}]>",
                        "w": f"tensordesc<{el}[1, {wd[0]}, {wd[1]}]>"}, {}
        else:
            xw, unit = {"x": f"*{el}", "w": f"*{el}"}, {"stride_xk": 1, "stride_wn": 1}
        sig = dict(xw, out=f"*{el}", offs_ptr="*i32", ws_ptr="*fp32", count_ptr="*i32", R="i32", N="i32", K="i32",
                   E="i32", stride_xm="i32", stride_xk="i32", stride_we="i32", stride_wk="i32", stride_wn="i32",
                   stride_om="i32", stride_on="i32", row_tile_bound="i32", kt_per_split="i32")
        check(GG._grouped_gemm_kernel, {k_: v for k_, v in sig.items() if k_ not in unit and k_ != "stride_on"},
              dict(BLOCK_M=gc.block_m, BLOCK_N=gc.block_n, BLOCK_K=gc.block_k, GROUP_M=gc.group_m, SPLIT_K=split,
                   E_BLOCK=128, USE_TMA=tma, W_TRANS=trans, DOT_PRECISION="ieee", stride_on=1, **unit),
              options=dict(num_warps=gc.num_warps, num_stages=gc.num_stages))
check(RT._gather_rows_kernel, {"x_ptr": "*bf16", "idx_ptr": "*i32", "out_ptr": "*bf16", "rows": "i32", "H": "i32",
                               "stride_x": "i32", "stride_o": "i32"}, {"BLOCK_R": 8, "BLOCK_H": 1024},
      options=dict(num_warps=4))
for weighted in (True, False):
    check(RT._scatter_combine_kernel, {"y_ptr": "*bf16", "idx_ptr": "*i32", "w_ptr": "*fp32", "out_ptr": "*bf16",
                                       "T": "i32", "H": "i32", "stride_y": "i32", "stride_o": "i32",
                                       "stride_wt": "i32", "stride_wk": "i32"},
          {"TOPK": 8, "WEIGHTED": weighted, "BLOCK_T": 4, "BLOCK_H": 1024}, options=dict(num_warps=4))
for partial in ("bf16", "fp32"):
    check(GRS._rs_reduce_kernel, {"recv_ptr": f"*{partial}", "out_ptr": "*bf16", "flags_ptr": "*i32", "sig_ptr": "*i32",
                                  "hdr_ptr": "*i64", "epoch_ptr": "*i32", "m_loc": "i32", "N": "i32",
                                  "slot_stride": "i32", "call_sig": "i32"},
          dict(BLOCK_M=G16.block_m, BLOCK_N=G16.block_n, GROUP_M=G16.group_m, SUB_M=GRS.REDUCE_ROWS),
          options=dict(num_warps=8))
check(GRS._dec_reduce_kernel, {"own_ptr": "*bf16", "recv_ptr": "*bf16", "out_ptr": "*bf16", "sig_ptr": "*i32",
                               "hdr_ptr": "*i64", "epoch_ptr": "*i32", "n": "i32", "slot": "i32", "call_sig": "i32"},
      {"BLOCK": 8192}, options=dict(num_warps=8))
for phase in (0, 1):
    check(GRS._dec_signal_kernel, {"sig_ptr": "*i32", "hdr_ptr": "*i64", "epoch_ptr": "*i32", "dst": "i32",
                                   "call_sig": "i32"}, {"PHASE": phase},
          options=dict(num_warps=1))
check(AGG._ag_pull_kernel, {"a_ptr": "*bf16", "gathered_ptr": "*bf16", "sig_ptr": "*i32", "pad_ptr": "*i32",
                            "epoch_ptr": "*i32", "chunk_numel": "i32", "sig": "i32"}, {"BLOCK": 8192},
      options=dict(num_warps=8))
check(AGG._ce_begin_kernel, {"sig_ptr": "*i32", "epoch_ptr": "*i32"}, options=dict(num_warps=1))
for publish in (True, False):
    check(AGG._ce_step_kernel, {"sig_ptr": "*i32", "pad_ptr": "*i32", "epoch_ptr": "*i32", "arrived": "i32",
                                "next_src": "i32", "sig": "i32"}, {"PUBLISH": publish}, options=dict(num_warps=1))
for flavour in P.FLAVOURS:
    check(P._pingpong_kernel, {"sig_ptr": "*i32", "base": "i32", "iters": "i32"}, {"FLAVOUR": flavour})
for push in (True, False):
    check(P._copy_kernel, {"dst_ptr": "*i32", "src_ptr": "*i32", "n": "i32", "peer": "i32"},
          {"PUSH": push, "BLOCK": 4096})
check(T._who_kernel, {"out_ptr": "*i32"})
check(T._push_kernel, {"buf_ptr": "*fp16", "n": "i32"}, {"BLOCK": 512})
check(T._pull_kernel, {"buf_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32"}, {"BLOCK": 512})
check(T._ring_kernel, {"buf_ptr": "*fp32", "sig_ptr": "*i32", "n": "i32", "epoch": "i32"}, {"BLOCK": 256})
check(T._count_kernel, {"sig_ptr": "*i32", "out_ptr": "*i32"}, {"ADDS": 3})
check(T._many_signals_kernel, {"sig_ptr": "*i64", "out_ptr": "*i32", "value": "i64"})
check(T._ldst_atomic_kernel, {"word_ptr": "*i32", "out_ptr": "*i32"})
check(T._clock_kernel, {"out_ptr": "*i64"})
check(T._never_signalled_kernel, {"sig_ptr": "*i32"})
check(S._stress_kernel, {"buf_ptr": "*i32", "sig_ptr": "*i32", "ack_ptr": "*i32", "err_ptr": "*i32", "iters": "i32"},
      {"BLOCK": 1024})
check(L._put_signal_ring_kernel, {"dst_ptr": "*u8", "src_ptr": "*u8", "sig_ptr": "*u64", "out_ptr": "*i64",
                                  "nbytes": "i32", "epoch": "i32"}, {"NBLOCKS": 4}, nvshmem=True)
check(L._get_kernel, {"dst_ptr": "*fp16", "src_ptr": "*fp16", "nbytes": "i32"}, nvshmem=True)
check(L._barrier_kernel, {"buf_ptr": "*i32", "out_ptr": "*i32"}, nvshmem=True)
check(L._signal_add_kernel, {"sig_ptr": "*u64", "out_ptr": "*i64"}, nvshmem=True)


_spec = importlib.util.spec_from_file_location("tutorial_05", os.path.join(ROOT, "tutorials", "05_ll_allreduce.py"))
T5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T5)
check(T5.ll_all_reduce_kernel, {"x_ptr": "*fp32", "ll_ptr": "*i64", "out_ptr": "*fp32", "n": "i32", "epoch": "i32"},
      {"BLOCK": 1024})

_spec = importlib.util.spec_from_file_location("tutorial_06", os.path.join(ROOT, "tutorials",
                                                                           "06_gemm_rs_decomposed.py"))
T6 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T6)
check(T6.before_copy, {"done_ptr": "*i32", "dst": "i32", "call": "i32"}, options=dict(num_warps=1))
check(T6.after_copy, {"arrived_ptr": "*i32", "dst": "i32", "call": "i32"}, options=dict(num_warps=1))
check(T6.reduce_kernel, {"own_ptr": "*bf16", "recv_ptr": "*bf16", "out_ptr": "*bf16", "arrived_ptr": "*i32",
                         "n": "i32", "call": "i32"}, {"BLOCK": 8192}, options=dict(num_warps=8))
check(T6.finish, {"done_ptr": "*i32", "call": "i32"}, options=dict(num_warps=1))

_spec = importlib.util.spec_from_file_location("tutorial_07", os.path.join(ROOT, "tutorials", "07_split_k_decode.py"))
T7 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T7)
check(T7.split_k_gemv_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "part_ptr": "*fp32",
                               "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32"},
      {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT": 4})


def check_vectorised(fn, sig, const, min_v4):
    """Loads made through dl.consume_token / dl.symm_at must stay 16-byte vectors (integer arguments specialised
    as divisible by 16, as Triton does at launch for such values)."""
    full = dict(sig, **{k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(full.items())
             if v.startswith("*") or (v == "i32" and k != "wait_all")}
    ptx = triton.compile(ASTSource(fn, full, constexprs=const, attrs=attrs), target=TARGET).asm["ptx"]
    v4 = ptx.count("ld.global.v4.b32")
    scalar = sum(ptx.count(f"ld.global.{w} ") for w in ("b16", "b32"))
    ok = v4 >= min_v4 and scalar <= 4
    print("ok  " if ok else "FAIL", f"{fn.__name__} vectorised: {v4} v4 loads, {scalar} scalar data loads")
    if not ok:
        failures.append(f"{fn.__name__} (vectorisation)")


check_vectorised(AG._pull_kernel, dict(words, m="i32", wait_all="i32", sig="i32"), {"BLOCK": 4096}, 16)
check_vectorised(AR._two_shot_kernel, dict(coll, n="i32", chunk="i32", wait_all="i32", sig="i32"), {"BLOCK": 8192}, 16)
check_vectorised(RS._push_kernel, dict(coll, chunk="i32", slot="i32", wait_all="i32", sig="i32"), {"BLOCK": 8192}, 16)


# ---------------------------------------------------------------------------------------------------------------------
# Second pass: libshmem_device on the cuda backend. Same kernel sources, linked against triton_dist_shmem.ll (which
# defines NVSHMEM's symbols), compiled through ptxas to a cubin; no NVSHMEM symbol may remain in the PTX.
@triton.jit
def _every_shmem_name_kernel(dst_ptr, src_ptr, sig_ptr, out_ptr, nbytes, pe, sig_op, cmp):
    """Calls every libshmem_device name once (constant and run-time sig_op/cmp), so each is linked and compiled."""
    me = shmem.my_pe()
    npes = shmem.n_pes()
    shmem.putmem(dst_ptr, src_ptr, nbytes, pe)
    shmem.putmem_nbi(dst_ptr, src_ptr, nbytes, pe)
    shmem.putmem_block(dst_ptr, src_ptr, nbytes, pe)
    shmem.putmem_warp(dst_ptr, src_ptr, nbytes, pe)
    shmem.putmem_nbi_block(dst_ptr, src_ptr, nbytes, pe)
    shmem.putmem_nbi_warp(dst_ptr, src_ptr, nbytes, pe)
    shmem.getmem(dst_ptr, src_ptr, nbytes, pe)
    shmem.getmem_nbi(dst_ptr, src_ptr, nbytes, pe)
    shmem.getmem_block(dst_ptr, src_ptr, nbytes, pe)
    shmem.getmem_warp(dst_ptr, src_ptr, nbytes, pe)
    shmem.getmem_nbi_block(dst_ptr, src_ptr, nbytes, pe)
    shmem.getmem_nbi_warp(dst_ptr, src_ptr, nbytes, pe)
    shmem.putmem_signal(dst_ptr, src_ptr, nbytes, sig_ptr, 1, shmem.NVSHMEM_SIGNAL_SET, pe)
    shmem.putmem_signal_nbi(dst_ptr, src_ptr, nbytes, sig_ptr, 1, shmem.NVSHMEM_SIGNAL_ADD, pe)
    shmem.putmem_signal_block(dst_ptr, src_ptr, nbytes, sig_ptr, 1, shmem.NVSHMEM_SIGNAL_ADD, pe)
    shmem.putmem_signal_warp(dst_ptr, src_ptr, nbytes, sig_ptr, 1, shmem.NVSHMEM_SIGNAL_SET, pe)
    shmem.putmem_signal_nbi_block(dst_ptr, src_ptr, nbytes, sig_ptr, 1, sig_op, pe)
    shmem.putmem_signal_nbi_warp(dst_ptr, src_ptr, nbytes, sig_ptr, 1, sig_op, pe)
    shmem.signal_op(sig_ptr, 2, shmem.NVSHMEM_SIGNAL_ADD, pe)
    shmem.signal_op(sig_ptr, 2, sig_op, pe)
    shmem.fence()
    shmem.quiet()
    shmem.barrier_all()
    shmem.barrier_all_block()
    shmem.barrier_all_warp()
    shmem.sync_all()
    shmem.sync_all_block()
    shmem.sync_all_warp()
    seen = shmem.signal_wait_until(sig_ptr, shmem.NVSHMEM_CMP_GE, 1)
    seen += shmem.signal_wait_until(sig_ptr, cmp, 1)
    tl.store(shmem.remote_ptr(out_ptr, pe), seen.to(tl.int64) + me + npes)


@triton.jit
def _dl_and_shmem_kernel(sig_ptr, out_ptr):
    """dl.rank links only part of triton_dist_device.ll; triton_dist_shmem.ll needs more of it (check_wait): the
    device module must be linked after the shmem one."""
    seen = shmem.signal_wait_until(sig_ptr, shmem.NVSHMEM_CMP_EQ, 1)
    tl.store(out_ptr, seen.to(tl.int64) + dl.rank())


@triton.jit
def _bad_sig_op_kernel(sig_ptr, WHERE: tl.constexpr, OP: tl.constexpr):
    if WHERE == 0:
        shmem.signal_op(sig_ptr, 1, OP, 0)
    elif WHERE == 1:
        shmem.putmem_signal_block(sig_ptr, sig_ptr, 8, sig_ptr, 1, OP, 0)
    else:
        shmem.putmem_signal_warp(sig_ptr, sig_ptr, 8, sig_ptr, 1, OP, 0)


@triton.jit
def _bad_cmp_kernel(sig_ptr, CMP: tl.constexpr):
    shmem.signal_wait_until(sig_ptr, CMP, 1)


_compile.install(shmem="triton_dist")  # what triton_dist.init() does for backend "cuda"
shmem_symbols_seen = set()
_COMMENT = re.compile(r"//[^\n]*")


def check_shmem_ll(fn, sig, const=None, options=None):
    """Compile with triton_dist_shmem.ll to a cubin: every error fails, and no NVSHMEM symbol may be left."""
    const = dict(const or {})
    full = dict(sig, **{k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(full.items()) if v.startswith("*")}
    name = f"{fn.__name__}{const or ''}{options or ''} (triton_dist_shmem.ll)"
    try:
        kernel = triton.compile(ASTSource(fn, full, constexprs=const, attrs=attrs), target=TARGET, options=options)
        code = _COMMENT.sub("", kernel.asm["ptx"])  # LLVM names basic blocks after inlined functions in comments
        left = sorted(set(re.findall(r"\bnvshmemx?_\w+", code)))
        if left:
            raise RuntimeError(f"PTX still refers to {left}")
        if not kernel.asm.get("cubin"):
            raise RuntimeError("no cubin")
        shmem_symbols_seen.update(re.findall(r'symbol = "(nvshmemx?_\w+)"', kernel.asm["ttgir"]))
        print("ok  ", name)
    except Exception as e:  # report every kernel, then fail
        failures.append(name)
        print("FAIL", name, str(e)[-1500:])


def check_rejected(fn, sig, const, needle):
    """A constant argument that NVSHMEM does not define must fail at compile time, naming the valid ones."""
    full = dict(sig, **{k: "constexpr" for k in const})
    name = f"{fn.__name__}{const} rejected"
    try:
        triton.compile(ASTSource(fn, full, constexprs=const), target=TARGET)
        msg = "compiled"
    except Exception as e:
        msg = f"{e!r} {e.__cause__!r}"
        if needle in msg:
            print("ok  ", name)
            return
    failures.append(name)
    print("FAIL", name, "expected a compile error mentioning", needle, "got:", msg[-1500:])


check_shmem_ll(L._put_signal_ring_kernel, {"dst_ptr": "*u8", "src_ptr": "*u8", "sig_ptr": "*u64", "out_ptr": "*i64",
                                           "nbytes": "i32", "epoch": "i32"}, {"NBLOCKS": 4})
check_shmem_ll(L._get_kernel, {"dst_ptr": "*fp16", "src_ptr": "*fp16", "nbytes": "i32"})
check_shmem_ll(L._barrier_kernel, {"buf_ptr": "*i32", "out_ptr": "*i32"})
check_shmem_ll(L._signal_add_kernel, {"sig_ptr": "*u64", "out_ptr": "*i64"})
every = {"dst_ptr": "*u8", "src_ptr": "*u8", "sig_ptr": "*u64", "out_ptr": "*i64", "nbytes": "i64", "pe": "i32",
         "sig_op": "i32", "cmp": "i32"}
check_shmem_ll(_every_shmem_name_kernel, every)
check_shmem_ll(_every_shmem_name_kernel, every, options=dict(num_warps=1))
check_shmem_ll(_dl_and_shmem_kernel, {"sig_ptr": "*u64", "out_ptr": "*i64"})
missing = sorted({_shmem_names.nvshmem_symbol(n) for n in _shmem_names.ALL} - shmem_symbols_seen)
print("ok  " if not missing else "FAIL", f"libshmem_device names linked with triton_dist_shmem.ll: "
      f"{len(_shmem_names.ALL) - len(missing)} of {len(_shmem_names.ALL)}", *missing)
if missing:
    failures.append("libshmem_device coverage")
for where in (0, 1, 2):
    check_rejected(_bad_sig_op_kernel, {"sig_ptr": "*u64"}, {"WHERE": where, "OP": 11}, "NVSHMEM_SIGNAL_SET")
check_rejected(_bad_cmp_kernel, {"sig_ptr": "*u64"}, {"CMP": 6}, "NVSHMEM_CMP_EQ")
_compile.install(shmem="nvshmem")  # back to the default flavour

if PART == "all":
    run_families()
finish()
