"""The NVSHMEM device names that both bodies of ``libshmem_device`` provide (one list, two implementations)."""
RMA_SUFFIXES = ("", "_nbi", "_block", "_warp", "_nbi_block", "_nbi_warp")
PUTMEM = tuple(f"putmem{s}" for s in RMA_SUFFIXES)
GETMEM = tuple(f"getmem{s}" for s in RMA_SUFFIXES)
PUTMEM_SIGNAL = tuple(f"putmem_signal{s}" for s in RMA_SUFFIXES)
BARRIERS = ("barrier_all", "barrier_all_block", "barrier_all_warp", "sync_all", "sync_all_block", "sync_all_warp")
OTHERS = ("my_pe", "n_pes", "remote_ptr", "signal_op", "signal_wait_until", "fence", "quiet")
ALL = PUTMEM + GETMEM + PUTMEM_SIGNAL + BARRIERS + OTHERS


# Thread-level functions: in Triton every thread of a program would run them, so one thread (thread 0) does.
PER_THREAD = tuple(n for n in PUTMEM + GETMEM + PUTMEM_SIGNAL if not n.endswith(("_block", "_warp"))) + (
    "signal_op", "barrier_all", "sync_all")
# Warp-level functions: warp 0 runs them.
PER_WARP = tuple(n for n in ALL if n.endswith("_warp"))


def nvshmem_symbol(name: str) -> str:
    """C symbol in libnvshmem_device for one of our names: ``_block``/``_warp`` variants are ``nvshmemx_``."""
    if name == "remote_ptr":
        return "nvshmem_ptr"
    return ("nvshmemx_" if name.endswith(("_block", "_warp")) or name == "signal_op" else "nvshmem_") + name
