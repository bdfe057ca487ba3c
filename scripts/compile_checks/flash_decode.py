"""Flash-decode kernels (``triton_dist/kernels/attention/flash_decode.py``), bf16: the split kernel at every config
the launcher or the tuner can pick for each head dim (:func:`candidate_configs`, the default among them),
contiguous and paged (a small page: one page id per key; a large one: one per tile), with a single split (direct
output) and with partials, softcap on and off, GQA groups of 16-row blocks and larger, strides not known to be
16-aligned (the unpipelined slow path, :func:`unaligned_config`); and the combine kernel at its block shapes. The
launcher's ``ALIGNED`` flag marks strides divisible by 16 as Triton's launcher would (this script's ``check`` marks
only pointers), so the key loops pipeline here as they do at run time."""
import os

import torch

from triton_dist.kernels.attention import _common as AC
from triton_dist.kernels.attention import flash_decode as FD

INTS = ("Hkv", "G", "HB", "S", "span", "bound", "num_pages")
STRIDES = ("stride_qb", "stride_qh", "stride_kp", "stride_kt", "stride_kh", "stride_vp", "stride_vt", "stride_vh",
           "stride_btb", "stride_ob", "stride_oh", "stride_os", "stride_lb", "stride_lh", "stride_ls")


def _split_sig(direct: bool, write_lse: bool) -> dict:
    out = "*bf16" if direct else "*fp32"
    sig = {"q": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "kv_lens": "*i32", "block_table": "*i32",
           "out": out, "lse": "*fp32" if write_lse else out}
    sig.update({k: "i32" for k in INTS})
    sig.update(qk_scale2="fp32", softcap="fp32")
    sig.update({k: "i32" for k in STRIDES})
    return sig  # stride_lens is 1 (specialised at launch): a constexpr below


def checks(check):
    seen = set()

    def split(cfg, d, bh, page, direct, softcap, write_lse, aligned=True):
        stages = FD.kernel_stages(cfg, page)
        key = (cfg.block_n, cfg.num_warps, stages, d, bh, page, direct, softcap, write_lse, aligned)
        if key in seen:
            return
        seen.add(key)
        check(FD._split_kernel, _split_sig(direct, write_lse),
              dict(stride_lens=1, D=d, BLOCK_H=bh, BLOCK_N=cfg.block_n, PAGE=page, SOFTCAP=softcap,
                   WRITE_LSE=write_lse, NUM_STAGES=stages, ALIGNED=aligned, PDL=cfg.pdl and not direct,
                   DOT_PRECISION="ieee"),
              options=dict(num_warps=cfg.num_warps, num_stages=stages))

    for d in AC.HEAD_DIMS:
        for page in (0, 16, 128):
            args = (1, 32, 8, d, 32768, torch.bfloat16, 132, page or None)
            assert FD.default_config(*args) in FD.candidate_configs(*args)
            cands = FD.candidate_configs(*args)
            if os.environ.get("TRITON_DIST_COMPILE_ALL") != "1":  # the default, and the largest at D 128 (README.md)
                big = max(cands, key=lambda c: FD.smem_bytes(c.block_n, d, torch.bfloat16,
                                                             FD.kernel_stages(c, page)))
                cands = list(dict.fromkeys([FD.default_config(*args)] + ([big] if d == 128 else [])))
            for cfg in cands:
                split(cfg, d, FD.block_h(4, d), page, direct=False, softcap=False, write_lse=True)
                split(cfg, d, FD.block_h(4, d), page, direct=True, softcap=False, write_lse=False)
        if d != 128 and os.environ.get("TRITON_DIST_COMPILE_ALL") != "1":
            continue  # the variants below at the main head dim only (README.md)
        default = FD.default_config(64, 32, 8, d, 4096, torch.bfloat16, 132)
        for group in (1, 32, 128):  # MHA, a 32-row block, the largest block (MQA of many heads: several blocks)
            split(default, d, FD.block_h(group, d), 0, direct=False, softcap=False, write_lse=True)
        split(default, d, FD.block_h(4, d), 16, direct=False, softcap=True, write_lse=True)
        split(default, d, FD.block_h(4, d), 0, direct=True, softcap=True, write_lse=True)
        slow = FD.unaligned_config(default, d)
        for page in (0, 16):
            split(slow, d, FD.block_h(4, d), page, direct=False, softcap=False, write_lse=True, aligned=False)
    comb = {"parts": "*fp32", "lses": "*fp32", "out": "*bf16", "lse_out": "*fp32", "Hq": "i32", "P": "i32",
            "stride_pb": "i32", "stride_ph": "i32", "stride_pp": "i32", "stride_sb": "i32", "stride_sh": "i32",
            "stride_ob": "i32", "stride_oh": "i32", "stride_lb": "i32"}
    for d in AC.HEAD_DIMS:
        for p in (2, 130) if os.environ.get("TRITON_DIST_COMPILE_ALL") != "1" else (2, 64, 130):  # few, past a chunk
            block_p = min(AC.next_pow2(p), max(1, FD.MAX_TILE_ELEMS // d))
            for write_lse, pdl in ((True, True), (False, False)):
                check(FD._combine_kernel, comb, dict(stride_sp=1, stride_lh=1, D=d, BLOCK_P=block_p, BLOCK_D=d,
                                                     WRITE_LSE=write_lse, PDL=pdl),
                      options=dict(num_warps=4, launch_pdl=pdl))
