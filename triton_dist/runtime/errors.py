"""Errors shared by the runtime and both bodies of the device API."""


class SignalTimeout(RuntimeError):
    """A device-side wait did not see its signal within ``TRITON_DIST_WAIT_TIMEOUT_S``; the message names the
    waiting rank, the signal (owner rank and heap offset), the value expected and the last value seen."""


class CallMismatch(RuntimeError):
    """Ranks made a collective call that does not agree (a different op, shape, dtype, method or split table); the
    message names the op, the ranks and what each side had. Raised by the device-side checks (e.g.
    ``all_to_all_v``'s splits) and, with ``TRITON_DIST_DEBUG=1``, by the host-side check of every op."""


# Device-side agreement checks (``dl.check_agree(mine, theirs, peer, code)``): code -> (op, what this rank has, what
# the peer has, what must hold). One table for the GPU watchdog record and the CPU world's exception.
AGREE_CHECKS = {
    1: ("all_to_all_v", "rank {me} expects {mine} rows from rank {peer} (its output_split_sizes[{peer}])",
        "rank {peer} sends it {theirs} rows (its input_split_sizes[{me}])",
        "the split tables must agree: input_split_sizes[j] of rank i == output_split_sizes[i] of rank j"),
    2: ("all_to_all_v", "rank {me} sends {mine} rows to rank {peer} (its input_split_sizes[{peer}])",
        "rank {peer} expects {theirs} rows from it (its output_split_sizes[{me}])",
        "the split tables must agree: input_split_sizes[j] of rank i == output_split_sizes[i] of rank j"),
    3: ("a collective", "rank {me}'s call has signature {mine:#010x}", "rank {peer}'s call has {theirs:#010x}",
        "the ranks called different ops, methods, dtypes or sizes (run with TRITON_DIST_DEBUG=1 to see both calls)"),
    4: ("a collective", "rank {me} makes an LL call (signature {mine:#010x})",
        "rank {peer} is making a staged call of the same context (signature {theirs:#010x})",
        "the ranks use different methods; with method='auto' the method follows the size, so the sizes differ "
        "(run with TRITON_DIST_DEBUG=1 to see both calls)"),
}


SIGNATURE_CODES = (3, 4)  # the checks whose values are call signatures
_signature_names: dict[int, str] = {}  # call signature -> the call it stands for (calls this process made)


def name_signature(sig: int, call: str) -> None:
    """Remember what call signature ``sig`` stands for, so a mismatch message can name the call, not only a hash."""
    _signature_names[sig] = call


def describe_mismatch(rank: int, code: int, mine: int, theirs: int, peer: int) -> str:
    """The message of a failed device-side agreement check (see :data:`AGREE_CHECKS`)."""
    op, ours, peers, rule = AGREE_CHECKS.get(code, (f"check {code}", "rank {me} has {mine}",
                                                    "rank {peer} has {theirs}", "they must be equal"))
    fields = dict(me=rank, peer=peer, mine=mine, theirs=theirs)
    ours, peers = ours.format(**fields), peers.format(**fields)
    if code in SIGNATURE_CODES:
        if mine in _signature_names:
            ours += f" ({_signature_names[mine]})"
        if theirs in _signature_names:
            peers += f" ({_signature_names[theirs]}, a call this rank made before)"
    return (f"triton_dist: {op} called differently across ranks: {ours}, but {peers}; {rule}. The call was "
            f"stopped on rank {rank}.")
