"""Compile every GPU kernel of the library, the tests and the benchmarks for sm_90 with Triton's own ptxas, on a
machine without GPUs (``python scripts/compile_gpu_kernels.py``; run by tests/test_gpu_compile.py in a process without TRITON_INTERPRET). Catches what the
interpreter accepts but the compiler does not (non-constexpr globals, type errors in PTX builtins, ...).
Prints one line per kernel; exits non-zero if any kernel fails. NVSHMEM kernels are compiled down to ptxas, where
only the unresolved NVSHMEM symbols may fail (libnvshmem_device.bc is not on CPU machines)."""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "compile check needs the compiler, not the interpreter"
os.environ["TRITON_DIST_TEST_BACKEND"] = "cuda"  # keeps tests/conftest.py (imported by test modules) off the interpreter
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from triton_dist.language import _compile  # noqa: E402

_compile.install()

import test_gpu_stress as S  # noqa: E402
import test_language as T  # noqa: E402
import test_libshmem as L  # noqa: E402
from triton_dist.bench import primitives as P  # noqa: E402
from triton_dist.kernels import all_gather as AG  # noqa: E402
from triton_dist.kernels import all_reduce as AR  # noqa: E402
from triton_dist.kernels import all_to_all as A2A  # noqa: E402
from triton_dist.kernels import reduce_scatter as RS  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
failures = []


def check(fn, sig, const=None, nvshmem=False):
    const = dict(const or {})
    full = dict(sig, **{k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(full.items()) if v.startswith("*")}
    name = f"{fn.__name__}{const or ''}"
    try:
        triton.compile(ASTSource(fn, full, constexprs=const, attrs=attrs), target=TARGET)
        print("ok  ", name)
    except Exception as e:  # report every kernel, then fail
        msg = str(e)
        if nvshmem and ("Unresolved extern function 'nvshmem" in msg or "libnvshmem_device.bc was not found" in msg):
            print("ok  ", name, "(up to the NVSHMEM link)")
            return
        failures.append(name)
        print("FAIL", name, msg[-1500:])


coll = {"x_ptr": "*bf16", "out_ptr": "*bf16", "staging_ptr": "*bf16", "pad_ptr": "*i32", "epoch_ptr": "*i32"}
check(AR._one_shot_kernel, dict(coll, n="i32", wait_all="i32"), {"BLOCK": 2048})
check(AR._push_one_shot_kernel, dict(coll, n="i32", slot="i32", wait_all="i32"), {"BLOCK": 2048})
check(AR._two_shot_kernel, dict(coll, n="i32", chunk="i32", wait_all="i32"), {"BLOCK": 2048})
for dt, half in (("bf16", True), ("fp32", False)):
    check(AR._ll_kernel, {"x_ptr": "*i16" if half else "*i32", "out_ptr": f"*{dt}", "buf_ptr": "*i64",
                          "epoch_ptr": "*i32", "n": "i32", "words": "i32", "slot_words": "i32"},
          {"HALF": half, "BLOCK": 1024})
check(AG._ll_kernel, {"x_ptr": "*i32", "out_ptr": "*i32", "buf_ptr": "*i64", "epoch_ptr": "*i32", "words": "i32",
                      "slot_words": "i32"}, {"BLOCK": 1024})
for phase in (0, 1, 2):
    check(AG._ce_signal_kernel, {"pad_ptr": "*i32", "epoch_ptr": "*i32", "wait_all": "i32"}, {"PHASE": phase})
check(AR._push_two_shot_kernel, dict(coll, n="i32", chunk="i32", slot="i32", wait_all="i32"), {"BLOCK": 8192})
check(RS._push_kernel, dict(coll, chunk="i32", slot="i32", wait_all="i32"), {"BLOCK": 8192})
check(RS._full_mesh_kernel, dict(coll, chunk="i32", wait_all="i32"), {"BLOCK": 2048})
check(RS._ring_kernel, dict(coll, staging_ptr="*fp32", chunk="i32", wait_all="i32"), {"BLOCK": 2048})
words = {k: ("*i32" if v.startswith("*") else v) for k, v in coll.items()}
check(AG._pull_kernel, dict(words, m="i32", wait_all="i32"), {"BLOCK": 4096})
check(AG._push_kernel, dict(words, m="i32", wait_all="i32"), {"BLOCK": 4096})
check(AG._ring_kernel, dict(words, m="i32", wait_all="i32"), {"BLOCK": 4096})
for equal in (True, False):
    check(A2A._all_to_all_kernel,
          {"x_ptr": "*i32", "out_ptr": "*i32", "staging_ptr": "*i32", "table_ptr": "*i64", "meta_ptr": "*i64",
           "pad_ptr": "*i32", "epoch_ptr": "*i32", "x_words": "i64", "row_words": "i64", "m_rows": "i64",
           "nprog": "i32"}, {"EQUAL": equal, "BLOCK": 4096, "WORLD_BLOCK": 8})
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


check_vectorised(AG._pull_kernel, dict(words, m="i32", wait_all="i32"), {"BLOCK": 4096}, 16)
check_vectorised(AR._two_shot_kernel, dict(coll, n="i32", chunk="i32", wait_all="i32"), {"BLOCK": 8192}, 16)
check_vectorised(RS._push_kernel, dict(coll, chunk="i32", slot="i32", wait_all="i32"), {"BLOCK": 8192}, 16)

print(f"{len(failures)} failed")
sys.exit(1 if failures else 0)
