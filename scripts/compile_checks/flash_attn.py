"""The prefill flash-attention forward (kernels/attention/flash_attn.py) at every GPU config its launcher or tuner can
pick: default_config and candidate_configs of each head dim, bf16, causal and not, K/V by TMA descriptors (varlen and
batched); the default configs also with pointer K/V, soft-capping, causal offsets and the lse store, and in fp16 and
fp32 (full-precision dots)."""
import os

import torch

from triton_dist.kernels.attention import _common as AC
from triton_dist.kernels.attention import flash_attn as FA

_EL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _signature(el: str, cfg, d: int, tma: bool) -> dict:
    kv = f"tensordesc<{el}[{cfg.block_n}, {d}]>" if tma else f"*{el}"
    sig = {"q": f"*{el}", "k": kv, "v": kv, "o": f"*{el}", "lse": "*fp32", "cu_q": "*i32", "cu_k": "*i32",
           "offsets_ptr": "*i32"}
    for name in ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_vb",
                 "stride_vt", "stride_vh", "seqlen_q", "seqlen_k", "B", "HQ", "GROUP", "row_blocks"):
        sig[name] = "i32"
    sig.update(qk_scale2="fp32", softcap="fp32")
    return sig


def _one(check, dtype, cfg, d, causal, tma=True, varlen=True, offsets=False, softcap=False, store_lse=False):
    const = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=d, VARLEN=varlen, CAUSAL=causal,
                 OFFSETS=offsets, SOFTCAP=softcap, USE_TMA=tma, STORE_LSE=store_lse,
                 DOT_PRECISION="ieee")  # gemm.dot_precision: ieee unless torch allows TF32
    check(FA._flash_attn_kernel, _signature(_EL[dtype], cfg, d, tma), const,
          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def checks(check) -> None:
    bf16 = torch.bfloat16
    for d in AC.HEAD_DIMS:
        for causal in (False, True):
            cands = FA.candidate_configs(d, bf16, causal)
            if os.environ.get("TRITON_DIST_COMPILE_ALL") != "1":  # the default and the largest (README.md)
                cands = [max(cands, key=lambda c: FA.smem_bytes(c, d, bf16))]
            for cfg in dict.fromkeys([FA.default_config(d, bf16, causal)] + cands):
                _one(check, bf16, cfg, d, causal)
            if d != 128 and os.environ.get("TRITON_DIST_COMPILE_ALL") != "1":
                continue  # the variants below at the main head dim only (README.md)
            cfg = FA.default_config(d, bf16, causal)
            _one(check, bf16, cfg, d, causal, tma=False, store_lse=True)  # pointer K/V (layouts TMA cannot take)
            _one(check, bf16, cfg, d, causal, varlen=False)  # the batched layout
            _one(check, bf16, cfg, d, causal, offsets=causal, softcap=True, store_lse=True)
            for dtype in (torch.float16, torch.float32):
                for c in dict.fromkeys([FA.default_config(d, dtype, causal)] + (
                        FA.candidate_configs(d, dtype, causal)
                        if dtype == torch.float32 and os.environ.get("TRITON_DIST_COMPILE_ALL") == "1" else [])):
                    _one(check, dtype, c, d, causal, store_lse=True)
