"""The decoder layer's fused kernels (kernels/decoder.py) at the launchers' GPU settings: add + RMSNorm over hidden
4096 / 5120 (blocks of 8192, 16 warps), q/k norm + rotary + cache write at head dim 128 (contiguous and paged, with and
without the norms, prefill's k / v outputs), SiLU * up in blocks of 1024; bf16."""
from triton_dist.kernels import decoder as K


def checks(check) -> None:
    for block in (4096, 8192):
        for res in (False, True):
            check(K._add_rmsnorm_kernel, {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
                                          "res_out_ptr": "*bf16", "N": "i32", "stride_x": "i32", "stride_r": "i32",
                                          "stride_o": "i32", "eps": "fp32"},
                  dict(HAS_RES=res, BLOCK=block), options=dict(num_warps=min(16, block // 256)))
    sig = {"qkv_ptr": "*bf16", "qw_ptr": "*bf16", "kw_ptr": "*bf16", "inv_ptr": "*fp32", "pos_ptr": "*i64",
           "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16", "bt_ptr": "*i32",
           "stride_qkv": "i32", "S": "i32", "HQ": "i32", "HKV": "i32", "max_len": "i32", "page": "i32",
           "bt_stride": "i32", "eps": "fp32"}
    for paged, norm, kv_out in ((False, True, False), (True, True, True), (False, False, True), (True, False, False)):
        check(K._qk_norm_rope_cache_kernel, sig, dict(D=128, NORM=norm, PAGED=paged, KV_OUT=kv_out),
              options=dict(num_warps=1))
    check(K._silu_mul_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16", "I": "i32", "stride_x": "i32"}, dict(BLOCK=1024),
          options=dict(num_warps=4))
