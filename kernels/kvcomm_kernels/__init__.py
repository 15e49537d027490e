"""Kernels for KVCOMM's reuse path (import name ``kvcomm_kernels``; ``kernels`` is taken on
PyPI), with one entry point per operation and a dispatch between implementations:

- ``write_recipe``: execute a ``radix_anchor.estimate.Recipe`` straight into KV-pool slots
  (blend offsets, shift keys, scatter), all layers at once;
- ``gather``: KV-pool rows of all layers as a ``[L, T, H, D]`` copy, keys optionally shifted;
- ``anchor_distances``: every distance the gate and the weights need, for all anchors at once.

``KVCOMM_KERNELS`` picks the implementation: ``auto`` (default: Triton for CUDA tensors, the
torch reference otherwise), ``torch``, or ``triton`` (also on CPU tensors under
``TRITON_INTERPRET=1``: how the tests run the kernels without a GPU). The torch reference is
``radix_anchor.estimate.apply`` plus indexed writes: the semantics every kernel is tested against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from radix_anchor import matching
from radix_anchor.anchor_pool import KV
from radix_anchor.estimate import Recipe, apply
from radix_anchor.matching import Distances
from radix_anchor.rope import RopeSpec, cos_sin, rotate

ENV_VAR = "KVCOMM_KERNELS"
BACKENDS = ("auto", "torch", "triton")


def backend_for(device: torch.device) -> str:
    choice = os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {BACKENDS}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return choice


def write_recipe(
    pool_k: Sequence[torch.Tensor],
    pool_v: Sequence[torch.Tensor],
    recipe: Recipe,
    position: int,
    content_slots: torch.Tensor,
    following_slots: torch.Tensor,
    rope: RopeSpec,
) -> None:
    """Write the recipe's first ``len(content_slots)`` content tokens (at ``position ..``) and
    first ``len(following_slots)`` following tokens (right after the whole content)."""
    n_content, n_following = content_slots.numel(), following_slots.numel()
    if n_content > recipe.length or n_following > recipe.following_length:
        raise ValueError("more slots than the recipe has tokens")
    if n_following and n_content < recipe.length:
        raise ValueError("following tokens need the whole content before them")
    if backend_for(content_slots.device) == "torch":
        est = apply(recipe, position, rope)
        _write_rows(pool_k, pool_v, content_slots, est.content.tokens(slice(0, n_content)))
        _write_rows(pool_k, pool_v, following_slots, est.following.tokens(slice(0, n_following)))
        return
    from kvcomm_kernels import triton_ops

    interleaved = rope.layout == "interleaved"
    device = content_slots.device
    base, taps = recipe.base, recipe.taps
    if n_content:
        cos, sin = _shift_rows(n_content, position, rope, device)
        triton_ops.write_content(
            list(pool_k),
            list(pool_v),
            content_slots,
            base.k.contiguous(),
            base.v.contiguous(),
            [o.k.contiguous() for o in recipe.offsets],
            [o.v.contiguous() for o in recipe.offsets],
            None if taps is None else (taps.indptr, taps.source, taps.row),
            recipe.wk,
            recipe.wv,
            cos,
            sin,
            interleaved,
        )
    if n_following:
        cos, sin = _shift_rows(n_following, position + recipe.length, rope, device)
        triton_ops.write_following(
            list(pool_k),
            list(pool_v),
            following_slots,
            [f.k.contiguous() for f in recipe.follows],
            [f.v.contiguous() for f in recipe.follows],
            recipe.fk.to(device),
            recipe.fv.to(device),
            cos,
            sin,
            interleaved,
        )


def anchor_distances(query: KV, anchors: list[KV]) -> Distances:
    """``radix_anchor.matching.anchor_distances``, fused: two launches for all anchors."""
    if backend_for(query.k.device) == "torch" or not anchors:
        return matching.anchor_distances(query, anchors)
    from kvcomm_kernels import triton_ops

    return Distances(
        *triton_ops.anchor_distances(
            query.k.contiguous(),
            query.v.contiguous(),
            [a.k.contiguous() for a in anchors],
            [a.v.contiguous() for a in anchors],
        )
    )


def gather(
    pool_k: Sequence[torch.Tensor],
    pool_v: Sequence[torch.Tensor],
    slots: torch.Tensor,
    shift: int = 0,
    rope: RopeSpec | None = None,
) -> KV:
    """Rows ``slots`` of every layer as a ``[L, T, H, D]`` copy; keys moved by ``shift``
    positions (e.g. minus their position: the position-0 frame)."""
    if shift and rope is None:
        raise ValueError("a shift needs the model's RoPE")
    if backend_for(slots.device) == "torch":
        k = torch.stack([buf[slots] for buf in pool_k])
        v = torch.stack([buf[slots] for buf in pool_v])
        return KV(rotate(k, shift, rope) if shift else k, v)
    from kvcomm_kernels import triton_ops

    half = pool_k[0].shape[-1] // 2
    if shift:
        cos, sin = _shift_rows(slots.numel(), shift, rope, slots.device)
    else:
        cos = torch.ones((slots.numel(), half), device=slots.device)
        sin = torch.zeros_like(cos)
    interleaved = rope is not None and rope.layout == "interleaved"
    return KV(*triton_ops.gather(list(pool_k), list(pool_v), slots, cos, sin, interleaved))


def _shift_rows(
    n: int, delta: int, rope: RopeSpec, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin rows ``[n, D/2]`` of one shift, for kernels that read a row per token."""
    return cos_sin(torch.full((n,), delta, device=device), rope, device)


def _write_rows(
    pool_k: Sequence[torch.Tensor], pool_v: Sequence[torch.Tensor], slots: torch.Tensor, kv: KV
) -> None:
    for layer, (k_buf, v_buf) in enumerate(zip(pool_k, pool_v, strict=True)):
        k_buf[slots] = kv.k[layer].to(k_buf.dtype)
        v_buf[slots] = kv.v[layer].to(v_buf.dtype)
