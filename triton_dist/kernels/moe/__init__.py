"""Mixture-of-experts kernels: expert-parallel dispatch / combine (``ep_low_latency``)."""
