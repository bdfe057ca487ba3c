"""Mixture of experts, the user-facing module (``import triton_dist.moe``): routing on the device (from
:mod:`triton_dist.kernels.routing`, the one place it lives) and expert-parallel dispatch / combine
(:mod:`triton_dist.kernels.moe.ep_low_latency`).

Routing::

    r = moe.build_routing(topk_ids, num_experts, block=64)   # counts, offsets, sorted order, gather / scatter index
    rows = moe.gather_rows(x, r)                             # [T*k, H] in expert order, for moe.grouped_gemm
    out = moe.scatter_combine(y, r, topk_weights)            # the weighted sum back per token
    per_rank = moe.rank_counts(topk_ids, num_experts, world)  # pairs each rank receives (expert parallelism)

Expert parallelism, low latency (decode; DeepEP's low-latency semantics)::

    ctx = moe.EPLowLatencyContext(max_tokens=128, hidden=7168, topk=8, num_experts=256)   # once, collective
    recv_x, recv_count, handle = ctx.dispatch(x, topk_ids)   # recv_x [E/W, W*128, 7168]: each local expert's rows
    y = experts(recv_x, recv_count)                          # e.g. a grouped GEMM over the first recv_count rows
    out = ctx.combine(y, topk_ids, topk_weights, handle)     # [T, 7168], weighted sum at the source rank

Expert parallelism, normal (prefill: many tokens; rows packed by expert at the receiver)::

    ctx = moe.EPNormalContext(max_tokens=4096, hidden=7168, topk=8, num_experts=256)
    recv_x, recv_offsets, handle = ctx.dispatch(x, topk_ids)  # expert l's rows: recv_offsets[l]:recv_offsets[l+1]
    out = ctx.combine(y, topk_ids, topk_weights, handle)      # y [max_recv_rows, H] in recv_x's rows

Every call is device-only (no host sync) and CUDA-graph capturable once the context exists. The tensor-parallel
MoE ops (``ag_moe``, ``moe_rs``, ``moe_ar``, ``moe_plan``, ``moe_gemm``) are in :mod:`triton_dist.ops`.
"""
from triton_dist.kernels.grouped_gemm import grouped_gemm
from triton_dist.kernels.moe.ep_low_latency import (DispatchHandle, EPLowLatencyContext, combine_reference,
                                                    dispatch_reference, quantize_fp8_reference)
from triton_dist.kernels.moe.a2a_gemm import A2AGemmContext, a2a_gemm, a2a_gemm_reference
from triton_dist.kernels.moe.ep_normal import EPNormalContext
from triton_dist.kernels.routing import (Routing, build_routing, gather_rows, rank_counts, routing_reference,
                                         scatter_combine)

__all__ = ["Routing", "build_routing", "routing_reference", "gather_rows", "scatter_combine", "rank_counts",
           "grouped_gemm", "EPLowLatencyContext", "EPNormalContext", "DispatchHandle", "dispatch_reference",
           "combine_reference", "quantize_fp8_reference", "A2AGemmContext", "a2a_gemm", "a2a_gemm_reference"]
