"""The sequence-parallel prefill attention (kernels/attention/sp_ag_attention.py) with the configs its launcher takes
(flash_attn.default_config; head dim 128, every head dim with TRITON_DIST_COMPILE_ALL=1), bf16, zig-zag and
contiguous shards, causal and not, K/V of the gathered buffer by TMA descriptors and by pointers."""
import os

import torch

from triton_dist.kernels.attention import _common as AC
from triton_dist.kernels.attention import flash_attn as FA
from triton_dist.kernels.attention import sp_ag_attention as SPA


def checks(check) -> None:
    for d in AC.HEAD_DIMS if os.environ.get("TRITON_DIST_COMPILE_ALL") == "1" else (128,):  # README.md
        for causal in (True, False):
            cfg = FA.default_config(d, torch.bfloat16, causal)
            for tma, slots in ((True, 2), (True, 1), (False, 2)):
                kv = f"tensordesc<bf16[{cfg.block_n}, {d}]>" if tma else "*bf16"
                sig = {"q": "*bf16", "kv_k": kv, "kv_v": kv, "o": "*bf16", "lse": "*fp32", "cu": "*i32",
                       "sig_ptr": "*i32", "epoch_ptr": "*i32", "B": "i32", "HQ": "i32", "GROUP": "i32",
                       "blocks_per_slot": "i32", "total": "i32", "stride_qt": "i32", "stride_qh": "i32",
                       "stride_kvt": "i32", "qk_scale2": "fp32", "softcap": "fp32"}
                check(SPA._sp_ag_attn_kernel, sig,
                      dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=d, SLOTS=slots, CAUSAL=causal,
                           SOFTCAP=False, USE_TMA=tma, STORE_LSE=not tma, DOT_PRECISION="ieee"),
                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
