"""Fused GPU kernels (Triton; an optional dependency, imported only where a kernel is used)."""
