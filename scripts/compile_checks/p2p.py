"""Point-to-point send / recv (kernels/p2p.py): both kernels at the launcher's GPU tile (2048 words of 4 bytes)."""
from triton_dist.kernels import p2p as P


def checks(check) -> None:
    sig = {"x_ptr": "*i32", "buf_ptr": "*i32", "flag_ptr": "*i32", "sig_ptr": "*i64", "done_ptr": "*i32",
           "epoch_ptr": "*i32", "arrive_ptr": "*i32", "peer": "i32", "n": "i32", "slot": "i32", "sig": "i64"}
    check(P._send_kernel, sig, dict(BLOCK=2048), options=dict(num_warps=4))
    rsig = dict(sig)
    rsig["out_ptr"] = rsig.pop("x_ptr")
    check(P._recv_kernel, rsig, dict(BLOCK=2048), options=dict(num_warps=4))
