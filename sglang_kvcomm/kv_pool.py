"""SGLang's KV pool seen by the extension: rows read as ``radix_anchor`` KV, planned reuses
written in place, both through ``kvcomm_kernels`` (Triton on CUDA, the torch reference on CPU).

The one place that knows the pool object (``MHATokenToKVPool``: per layer a ``[slots, kv_heads,
head_dim]`` buffer for K and for V).
"""

from __future__ import annotations

import torch

import kvcomm_kernels
from radix_anchor.anchor_pool import KV
from radix_anchor.prompt import PromptLayout
from radix_anchor.reuse import KVComm, Reuse, ReuseConfig
from radix_anchor.rope import RopeSpec


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
        return kvcomm_kernels.gather(self.k_buffer, self.v_buffer, slots)

    def warm_up(self, rope: RopeSpec) -> None:
        """Run the whole reuse path once on a synthetic two-span prompt (learn three anchors per
        span, plan, write) so that nothing compiles or loads inside the first real request: on
        an H100 the Triton JIT and first-use CUDA kernels of real sizes cost ~0.5-1.5 s there.
        Reads and writes only slot 0, SGLang's padding slot."""
        device = self.k_buffer[0].device
        padding = torch.zeros(256, dtype=torch.int64, device=device)
        engine = KVComm(rope, ReuseConfig(threshold=1.0), distances=kvcomm_kernels.anchor_distances)
        size = 64  # large enough for the kernels' and torch's multi-block code paths

        def prompt(first: int) -> PromptLayout:
            contents = [tuple(range(first + 1000 * j, first + 1000 * j + size)) for j in (0, 1)]
            tokens = (1, *contents[0], 2, 3, *contents[1], 4, 5, 6)
            return PromptLayout.of(tokens, [(1, 1 + size), (3 + size, 3 + 2 * size)])

        def read(start: int, end: int) -> KV:
            return self.read(padding[: end - start])

        *taught, new = (prompt(first) for first in (10_000, 20_000, 30_000, 40_000))
        for layout in (*taught, new):
            for j, (start, end) in enumerate(layout.spans):  # bases, as an earlier decode's
                engine.observe_output(layout.content(j), read(start, end), start)
        for layout in taught:
            engine.observe_prefill(layout, read)
        reuse = engine.plan(new, 1, len(new.tokens) - 1)
        if not isinstance(reuse, Reuse):
            raise RuntimeError(f"kvcomm warm-up did not plan a reuse: {reuse}")
        self.write(reuse, padding[: reuse.num_tokens], rope)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def write(self, reuse: Reuse, slots: torch.Tensor, rope: RopeSpec) -> None:
        """Write a planned reuse into ``slots`` (one per estimated token, in prompt order)."""
        if slots.numel() != reuse.num_tokens:
            raise ValueError(f"{slots.numel()} slots for {reuse.num_tokens} estimated tokens")
        for piece in reuse.pieces:
            at = piece.position - reuse.start
            after = at + piece.recipe.length
            kvcomm_kernels.write_recipe(
                self.k_buffer,
                self.v_buffer,
                piece.recipe,
                piece.position,
                slots[at : at + piece.content_tokens],
                slots[after : after + piece.following_tokens],
                rope,
            )
