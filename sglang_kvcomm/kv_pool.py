"""Reading and writing token rows of SGLang's KV pool as ``radix_anchor`` KV tensors.

The one place that knows the pool layout (``MHATokenToKVPool``: per layer a ``[slots, kv_heads,
head_dim]`` buffer for K and for V). This torch loop is the hot path the kernels replace.
"""

from __future__ import annotations

import torch

from radix_anchor.anchor_pool import KV


class UnsupportedPoolError(ValueError):
    pass


class PoolKV:
    def __init__(self, kv_pool: object) -> None:
        k_buffer = getattr(kv_pool, "k_buffer", None)
        if k_buffer is None or getattr(kv_pool, "v_buffer", None) is None:
            raise UnsupportedPoolError(
                f"{type(kv_pool).__name__} has no per-layer K/V buffers (MLA and hybrid pools "
                "are not supported)"
            )
        if kv_pool.store_dtype != kv_pool.dtype:
            raise UnsupportedPoolError(
                f"KV cache dtype {kv_pool.dtype} is stored as {kv_pool.store_dtype} "
                "(quantized KV cache is not supported)"
            )
        self.k_buffer: list[torch.Tensor] = k_buffer
        self.v_buffer: list[torch.Tensor] = kv_pool.v_buffer

    @property
    def num_layers(self) -> int:
        return len(self.k_buffer)

    def read(self, slots: torch.Tensor) -> KV:
        """KV of ``slots`` (int64 on the pool's device), ``[layers, tokens, kv_heads, dim]``."""
        return KV(
            torch.stack([buf[slots] for buf in self.k_buffer]),
            torch.stack([buf[slots] for buf in self.v_buffer]),
        )

    def write(self, slots: torch.Tensor, kv: KV) -> None:
        if kv.k.shape[0] != self.num_layers or kv.num_tokens != slots.numel():
            raise ValueError(
                f"KV {tuple(kv.k.shape)} does not fit {self.num_layers} layers x {slots.numel()} "
                "slots"
            )
        for layer, (k_buf, v_buf) in enumerate(zip(self.k_buffer, self.v_buffer, strict=True)):
            k_buf[slots] = kv.k[layer].to(k_buf.dtype)
            v_buf[slots] = kv.v[layer].to(v_buf.dtype)
