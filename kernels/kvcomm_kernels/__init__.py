"""Kernels for KVCOMM's reuse path (import name ``kvcomm_kernels``; ``kernels`` is taken on
PyPI): fused gather, RoPE shift, weighted offsets and scatter, with torch references."""
