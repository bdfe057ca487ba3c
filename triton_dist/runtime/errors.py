"""Errors shared by the runtime and both bodies of the device API."""


class SignalTimeout(RuntimeError):
    """A device-side wait did not see its signal within ``TRITON_DIST_WAIT_TIMEOUT_S``; the message names the
    waiting rank, the signal (owner rank and heap offset), the value expected and the last value seen."""
