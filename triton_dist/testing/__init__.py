"""Helpers for testing distributed kernels: a persistent world of processes that runs functions on every rank."""
from .world import ProcessWorld, RankError, WorldTimeout

__all__ = ["ProcessWorld", "RankError", "WorldTimeout"]
