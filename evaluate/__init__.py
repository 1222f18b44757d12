"""Evaluate stage: accuracy on the test split, bytes, and latency per backend -> results JSON."""

from .run import evaluate

__all__ = ["evaluate"]
