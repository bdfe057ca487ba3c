"""Mends of Triton 3.6's interpreter for the CPU world, in one place; :func:`install` (called by ``triton_dist.init()``
there, before any kernel runs) applies them, and nothing else of the interpreter changes.

**bf16.** The interpreter keeps bf16 values as raw uint16 bit patterns and then gets them wrong (Triton 3.6.0,
``triton/runtime/interpreter.py``): arithmetic, comparisons, ``min``/``max``, ``tl.sum`` and ``tl.dot`` on bf16 operate
on the bit patterns as integers (a ``tl.dot`` of bf16 tiles returned 3.65e10 where the answer was 13.5); fp32 -> bf16
casts truncate instead of rounding to nearest even (one bf16 step off in about a quarter of the elements of an
all-reduce); int -> bf16 casts store the integer as bits. Mended, every kernel sees what the GPU computes: bf16 values
widen exactly to fp32, each bf16 operation is done in fp32 and rounded to nearest even (what sm_90's bf16
instructions give for add, sub, mul, fma, min, max and comparisons), ``tl.dot`` of bf16 tiles accumulates in fp32,
and casts go through fp32 with round-to-nearest-even.

**fp8.** Its fp32 / fp16 / bf16 -> fp8 casts add the first cut-off bit to the truncated mantissa without carrying
into the exponent (127.9 -> e4m3 came out 64, not 128) and without ties-to-even. Mended: the value goes through
torch's conversion (round to nearest even), clamped first to the format's largest finite value (the GPU's
``cvt.rn.satfinite``); NaN stays NaN.

**Errors.** The interpreter wraps every exception of a kernel in ``InterpreterError`` (once per device-function
level), so ``except triton_dist.SignalTimeout`` caught nothing in the CPU world. Mended, a launch re-raises the
triton-dist error (:data:`UNWRAPPED`) found in the chain, as on GPUs, with the kernel's name added (which op).
"""
from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter as _interp
from triton.runtime.errors import InterpreterError

from ..runtime.errors import CallMismatch, SignalTimeout

UNWRAPPED = (SignalTimeout, CallMismatch)  # triton-dist's errors: a kernel launch raises them unwrapped
_installed = False


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN (0x7fc0 with its sign)."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (((u >> 16) & 0x8000) | 0x7FC0).astype(np.uint16)
    return np.where(np.isnan(x), nan, rounded)


def _is_bf16(handle) -> bool:
    return handle.dtype.scalar == tl.bfloat16


def _widen(handle) -> np.ndarray:
    return bf16_to_f32(handle.data) if _is_bf16(handle) else handle.data


def _result(data: np.ndarray, dtype) -> "_interp.TensorHandle":
    """``data`` computed in fp32 for an op whose type is ``dtype``: bf16 again (rounded), or a comparison's bools."""
    if data.dtype == np.bool_:
        return _interp.TensorHandle(data, tl.int1)
    return _interp.TensorHandle(f32_to_bf16(data), dtype)


_FP8 = {}  # Triton fp8 type name -> (torch dtype, largest finite value), filled by _mend_bf16


def install() -> None:
    """Apply the mends (idempotent)."""
    global _installed
    if _installed:
        return
    _mend_bf16()
    _mend_errors()
    _installed = True


def _triton_dist_error(err: BaseException) -> BaseException | None:
    """The first :data:`UNWRAPPED` error in ``err``'s chain of causes, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UNWRAPPED):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _mend_errors() -> None:
    launch = _interp.GridExecutor.__call__

    def unwrapping_launch(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        except InterpreterError as wrapped:
            err = _triton_dist_error(wrapped)
            if err is None:
                raise
        name = getattr(self.fn, "__name__", "?")
        if err.args and isinstance(err.args[0], str) and "(in kernel " not in err.args[0]:
            err.args = (f"{err.args[0]} (in kernel {name})",) + err.args[1:]  # which op: its kernel
        raise err.with_traceback(err.__traceback__) from None

    _interp.GridExecutor.__call__ = unwrapping_launch


def _mend_bf16() -> None:
    B = _interp.InterpreterBuilder
    import torch
    _FP8.update({str(tl.float8e4nv): (torch.float8_e4m3fn, 448.0), str(tl.float8e5): (torch.float8_e5m2, 57344.0)})
    binary_op, unary_op, ternary_op, cast_impl = B.binary_op, B.unary_op, B.ternary_op, B.cast_impl
    fp_to_fp, create_dot, create_fma = B.create_fp_to_fp, B.create_dot, B.create_fma

    def bf16_binary_op(self, lhs, rhs, op):
        if not (_is_bf16(lhs) or _is_bf16(rhs)):
            return binary_op(self, lhs, rhs, op)
        with np.errstate(all="ignore"):
            return _result(op(_widen(lhs), _widen(rhs)), lhs.dtype.scalar)

    def bf16_unary_op(self, arg, op):
        if not _is_bf16(arg):
            return unary_op(self, arg, op)
        with np.errstate(all="ignore"):
            return _result(op(_widen(arg)), arg.dtype.scalar)

    def bf16_ternary_op(self, lhs, rhs, other, op):
        if op is np.where or not _is_bf16(other):  # select moves bits: right as it is
            return ternary_op(self, lhs, rhs, other, op)
        return _result(op(_widen(lhs), _widen(rhs), _widen(other)), other.dtype.scalar)

    def bf16_fma(self, x, y, z):
        if not _is_bf16(z):
            return create_fma(self, x, y, z)
        return _result(_widen(x) * _widen(y) + _widen(z), z.dtype.scalar)

    def bf16_cast(self, src, dst_type):
        dst = dst_type.scalar
        if not (_is_bf16(src) or dst == tl.bfloat16) or src.dtype.scalar == dst:
            return cast_impl(self, src, dst_type)
        if _is_bf16(src):
            wide = bf16_to_f32(src.data)
            return _interp.TensorHandle(wide.astype(_interp._get_np_dtype(dst_type)), dst)
        data = src.data
        if src.dtype.scalar.is_fp8():
            data = _interp._convert_float(data, src.dtype.scalar, tl.float16, None).view(np.float16)
        return _interp.TensorHandle(f32_to_bf16(data.astype(np.float32)), dst)

    def bf16_fp_to_fp(self, src, dst_type, rounding_mode):
        if _is_bf16(src) and dst_type.scalar == tl.float32 or src.dtype.scalar == tl.float32 and \
                dst_type.scalar == tl.bfloat16:
            return bf16_cast(self, src, dst_type)
        fp8 = _FP8.get(str(dst_type.scalar))
        if fp8 is not None and src.dtype.scalar in (tl.float32, tl.float16, tl.bfloat16):
            import torch  # the interpreter's own downcast rounds wrong (module docstring)
            wide = np.ascontiguousarray(_widen(src).astype(np.float32))
            tdt, big = fp8
            bits = torch.from_numpy(wide).clamp(-big, big).to(tdt).view(torch.uint8).numpy()
            return _interp.TensorHandle(bits.view(_interp._get_np_dtype(dst_type)), dst_type.scalar)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    def bf16_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (_is_bf16(a) or _is_bf16(b)):
            return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        acc = np.matmul(_widen(a).astype(np.float32), _widen(b).astype(np.float32)) + _widen(d)
        return _result(acc, d.dtype.scalar) if _is_bf16(d) else _interp.TensorHandle(
            acc.astype(d.data.dtype), d.dtype.scalar)

    for name, fn in (("binary_op", bf16_binary_op), ("unary_op", bf16_unary_op), ("ternary_op", bf16_ternary_op),
                     ("create_fma", bf16_fma), ("cast_impl", bf16_cast), ("create_fp_to_fp", bf16_fp_to_fp),
                     ("create_dot", bf16_dot)):
        setattr(B, name, fn)

    R = _interp.ReduceOps
    reduce_sum, min_max = R.sum, R.min_max

    def bf16_sum(self, input):
        if input.dtype.scalar != tl.bfloat16:
            return reduce_sum(self, input)
        total = np.sum(bf16_to_f32(input.handle.data), axis=self.axis, keepdims=self.keep_dims, dtype=np.float32)
        return _bf16_tensor(self, total, input.dtype)

    def bf16_min_max(self, input, val_reduce_op, idx_reduce_op=None):
        x = input[0] if isinstance(input, tuple) else input
        if x.dtype.scalar != tl.bfloat16:
            return min_max(self, input, val_reduce_op, idx_reduce_op)
        wide = bf16_to_f32(x.handle.data)
        val = idx = None
        if val_reduce_op:
            val = _bf16_tensor(self, val_reduce_op(wide, axis=self.axis, keepdims=self.keep_dims), x.dtype)
        if idx_reduce_op:
            idx = self.to_tensor(idx_reduce_op(wide, axis=self.axis, keepdims=self.keep_dims), tl.int32)
        return (val, idx) if val is not None and idx is not None else (val if val is not None else idx)

    R.sum, R.min_max = bf16_sum, bf16_min_max


def _bf16_tensor(reduce_op, value, dtype):
    """A reduction's fp32 result as the bf16 tensor ``to_tensor`` would make from bits."""
    bits = f32_to_bf16(np.asarray(value, dtype=np.float32))
    return reduce_op.to_tensor(bits if bits.shape else bits.item(), dtype)
