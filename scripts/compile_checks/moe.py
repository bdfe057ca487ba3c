"""MoE kernels: expert-parallel low-latency dispatch / combine (kernels/moe/ep_low_latency.py), the four kernels at
the GPU block sizes their launchers pick for the goal shape (hidden 7168, top-8, 32 local experts of 8 ranks, 128
tokens), bf16 rows and fp8 (e4m3 values with fp32 scales); the tensor-parallel MoE GEMM (kernels/moe/tp_moe.py) at
its GPU configs (each tile shape), gathered rows with chunk waits (ag_moe) and plan-ordered rows (the down projection); the
normal (prefill) EP dispatch's three kernels (8 ranks, 32 local experts); a2a_gemm's two small kernels (its GEMM is
the MoE GEMM above)."""
import torch

from triton_dist.kernels.moe import a2a_gemm as A2A
from triton_dist.kernels.moe import ep_low_latency as EP
from triton_dist.kernels.moe import ep_normal as EN
from triton_dist.kernels.moe import tp_moe as TP


def checks(check) -> None:
    i32 = "*i32"
    opts = dict(num_warps=4)
    for fp8 in (False, True):
        buf = "*fp8e4nv" if fp8 else "*bf16"
        send = {"x_ptr": "*bf16", "ids_ptr": i32, "buf_ptr": buf, "scale_ptr": "*fp32", "src_ptr": i32,
                "cnt_ptr": i32, "flag_ptr": i32, "done_ptr": i32, "epoch_ptr": i32, "arrive_ptr": i32,
                "tally_ptr": i32, "T": "i32", "H": "i32", "stride_x": "i32", "L": "i32", "M": "i32", "HC": "i32"}
        check(EP._dispatch_send_kernel, send, dict(K=8, BLOCK_K=8, BLOCK_T=32, BLOCK_H=1024, BLOCK_E=32,
                                                   FP8=fp8), options=opts)
        recv = {"buf_ptr": buf, "scale_ptr": "*fp32", "src_ptr": i32, "cnt_ptr": i32, "flag_ptr": i32,
                "done_ptr": i32, "epoch_ptr": i32, "arrive_ptr": i32, "out_ptr": buf, "out_scale_ptr": "*fp32",
                "out_slot_ptr": i32, "out_rank_ptr": i32, "layout_ptr": i32, "count_ptr": i32, "H": "i32",
                "L": "i32", "M": "i32"}
        check(EP._dispatch_recv_kernel, recv, dict(BLOCK_W=8, BLOCK_R=8, BLOCK_H=1024, BLOCK_G=64, FP8=fp8),
              options=opts)
    check(EP._combine_send_kernel,
          {"y_ptr": "*bf16", "stride_yl": "i32", "stride_yr": "i32", "slot_ptr": i32, "layout_ptr": i32,
           "cbuf_ptr": "*bf16", "cflag_ptr": i32, "cdone_ptr": i32, "epoch_ptr": i32, "arrive_ptr": i32, "H": "i32",
           "MK": "i32", "CAP": "i32"}, dict(BLOCK_R=8, BLOCK_H=1024), options=opts)
    check(EP._combine_recv_kernel,
          {"ids_ptr": i32, "w_ptr": "*fp32", "cbuf_ptr": "*bf16", "cflag_ptr": i32, "cdone_ptr": i32,
           "epoch_ptr": i32, "arrive_ptr": i32, "out_ptr": "*bf16", "T": "i32", "H": "i32", "MK": "i32", "E": "i32",
           "HC": "i32"},
          dict(K=8, BLOCK_K=8, BLOCK_H=1024), options=dict(opts, enable_fp_fusion=False))
    for dtype, el in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        shapes = ((256, 1536), (32, 2048), (32, 96)) if dtype != torch.float32 else ((256, 1536),)
        for rows_per_group, n in shapes:  # each tile shape _config picks
            bm, bn, bk, warps, stages = TP._config(dtype, rows_per_group, n)
            for gather, wait, out in ((True, True, el), (False, False, el)):
                sig = {"x": f"*{el}", "gidx": "*i32", "w": f"*{el}", "out": f"*{out}", "offs_ptr": "*i32",
                       "sig_ptr": "*i32", "epoch_ptr": "*i32", "R": "i32", "N": "i32", "K": "i32", "G": "i32",
                       "E_W": "i32", "stride_xm": "i32", "stride_we": "i32", "stride_wk": "i32", "stride_wn": "i32",
                       "stride_om": "i32", "row_tile_bound": "i32", "sig_base": "i32", "x_par": "i32",
                       "sig_par": "i32"}
                check(TP._moe_gemm_kernel, sig, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, G_BLOCK=512,
                                                     GATHER=gather, WAIT=wait, DOT_PRECISION="ieee"),
                      options=dict(num_warps=warps, num_stages=stages))
    check(EN._counts_kernel, {"tally_ptr": i32, "cnt_ptr": i32, "flag_ptr": i32, "done_ptr": i32, "epoch_ptr": i32,
                              "E": "i32"}, dict(BLOCK_E=256), options=opts)
    check(EN._send_kernel,
          {"x_ptr": "*bf16", "ids_ptr": i32, "idx_ptr": i32, "buf_ptr": "*bf16", "src_ptr": i32, "rank_ptr": i32,
           "cnt_ptr": i32, "flag1_ptr": i32, "flag2_ptr": i32, "epoch_ptr": i32, "arrive_ptr": i32,
           "dropped_ptr": i32, "T": "i32", "H": "i32", "stride_x": "i32", "L": "i32", "R": "i32", "HC": "i32"},
          dict(K=8, BLOCK_K=8, BLOCK_W=8, BLOCK_L=32, BLOCK_H=1024), options=opts)
    check(EN._recv_kernel,
          {"buf_ptr": "*bf16", "src_ptr": i32, "rank_ptr": i32, "cnt_ptr": i32, "flag2_ptr": i32, "done_ptr": i32,
           "epoch_ptr": i32, "arrive_ptr": i32, "out_ptr": "*bf16", "out_slot_ptr": i32, "out_rank_ptr": i32,
           "offsets_ptr": i32, "counts_ptr": i32, "layout_ptr": i32, "H": "i32", "L": "i32", "R": "i32"},
          dict(BLOCK_W=8, BLOCK_L=32, BLOCK_R=16, BLOCK_H=1024), options=opts)
    check(A2A._source_offsets_kernel, {"cnt_ptr": i32, "flag_ptr": i32, "epoch_ptr": i32, "offs_ptr": i32},
          dict(BLOCK_W=8), options=dict(num_warps=1))
    check(A2A._release_kernel, {"done_ptr": i32, "epoch_ptr": i32}, options=dict(num_warps=1))
