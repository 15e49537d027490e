"""Triton kernels of the reuse path, on SGLang's pool layout (per layer ``[slots, heads, dim]``,
one allocation per layer, reached through a table of per-layer base addresses).

- ``write_content``: base + weighted placeholder offsets (layers >= 1), RoPE shift to the
  content's positions, scattered into pool slots; all layers and heads in one launch.
- ``write_following``: per-channel weighted blend of the anchors' following segments, shifted,
  scattered; one launch.
- ``gather``: pool rows of all layers into a contiguous ``[L, T, H, D]`` copy, keys shifted
  (de-rotated when capturing base KV and anchors); one launch.

fp32 accumulation; bf16, fp16 and fp32 pools. cos/sin come precomputed in fp32 from float64
angles (``radix_anchor.rope.cos_sin``), so kernel and torch reference rotate by the same numbers.
Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from radix_anchor.transfer import to_device

# Sizes and the slot table (often a view at any offset) are runtime values, not specialization
# keys: one compiled variant per model shape and dtype, compiled once by ``warm_up``.
_SIZES = [
    "slots",
    "n_tokens",
    "base_tokens",
    "n_anchors",
    "w_stride",
    "fol_tokens",
    "n_sources",
    "n_layers",
]
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
BLOCK_T = 16


def _runtime_sizes(fn):  # noqa: ANN001, ANN202
    """``triton.jit`` with the kernel's ``_SIZES`` arguments left unspecialized."""
    params = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[name for name in _SIZES if name in params])


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    if dtype not in _TL_DTYPES:
        raise TypeError(f"KV dtype {dtype} is not supported (float32, bfloat16, float16)")
    return _TL_DTYPES[dtype]


def tables(device: torch.device, *columns: Sequence[int] | np.ndarray) -> list[torch.Tensor]:
    """Several int64 tables in one asynchronous copy to the device, returned as views. Each
    starts 16-byte aligned, so a kernel's pointer arguments keep one specialization whatever
    the lengths (a new one would compile inside a request)."""
    padded = [np.asarray(c, dtype=np.int64) for c in columns]
    sizes = [len(c) + len(c) % 2 for c in padded]
    packed = to_device(
        np.concatenate([np.pad(c, (0, n - len(c))) for c, n in zip(padded, sizes, strict=True)]),
        device,
    )
    views = torch.split(packed, sizes)
    return [v[: len(c)] for v, c in zip(views, padded, strict=True)]


def addresses(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


@functools.lru_cache(maxsize=8)
def _pool_table(addresses: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return to_device(list(addresses), device)


def pool_table(buffers: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-layer base addresses of a KV pool: fixed for the pool's life, built once."""
    return _pool_table(tuple(b.data_ptr() for b in buffers), device)


@triton.jit
def _channel_pairs(HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Channel indices of the two halves of each rotated pair."""
    c = tl.arange(0, HALF)
    if INTERLEAVED:
        return 2 * c, 2 * c + 1
    return c, c + HALF


@triton.jit
def _rotate_store(ptr, rows, x1, x2, cos, sin, c1, c2, mask, ROTATE: tl.constexpr):
    if ROTATE:
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
    else:
        y1 = x1
        y2 = x2
    m = mask[:, None]
    tl.store(ptr + rows[:, None] + c1[None, :], y1.to(ptr.dtype.element_ty), mask=m)
    tl.store(ptr + rows[:, None] + c2[None, :], y2.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _tile(n_tokens, HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (layer, head), its block of tokens with their mask, and channel pairs:
    every kernel here runs on a (token blocks, layers, heads) grid."""
    layer, head = tl.program_id(1), tl.program_id(2)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = t < n_tokens
    c1, c2 = _channel_pairs(HALF, INTERLEAVED)
    return layer, head, t, mask, mask[:, None], c1, c2


@triton.jit
def _load_pair(ptr, rows, c1, c2, m):
    """Both halves of the channel pairs of ``rows``, in fp32."""
    x1 = tl.load(ptr + rows[:, None] + c1[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + rows[:, None] + c2[None, :], mask=m, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _add_weighted(
    k_tab, v_tab, n, row, c1, c2, m, wk1, wk2, wv1, wv2, k1, k2, v1, v2, DT: tl.constexpr
):
    """The accumulators plus source ``n``'s K and V rows (addresses from the tables), each
    half of the channel pairs scaled by its weight."""
    kp = tl.load(k_tab + n).to(tl.pointer_type(DT))
    vp = tl.load(v_tab + n).to(tl.pointer_type(DT))
    x1, x2 = _load_pair(kp, row, c1, c2, m)
    y1, y2 = _load_pair(vp, row, c1, c2, m)
    return k1 + wk1 * x1, k2 + wk2 * x2, v1 + wv1 * y1, v2 + wv2 * y2


@triton.jit
def _shift_scatter(
    k1,
    k2,
    v1,
    v2,
    cos,
    sin,
    slots,
    pool_k_tab,
    pool_v_tab,
    layer,
    head,
    t,
    mask,
    c1,
    c2,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    HALF: tl.constexpr,
    DT: tl.constexpr,
):
    """Rotate K by the tokens' cos/sin and store K and V at their pool slots of ``layer``."""
    m = mask[:, None]
    cs = t[:, None] * HALF + tl.arange(0, HALF)[None, :]
    c = tl.load(cos + cs, mask=m, other=1.0)
    s = tl.load(sin + cs, mask=m, other=0.0)
    dst = tl.load(slots + t, mask=mask, other=0) * HEADS * DIM + head * DIM
    pk = tl.load(pool_k_tab + layer).to(tl.pointer_type(DT))
    pv = tl.load(pool_v_tab + layer).to(tl.pointer_type(DT))
    _rotate_store(pk, dst, k1, k2, c, s, c1, c2, mask, True)
    _rotate_store(pv, dst, v1, v2, c, s, c1, c2, mask, False)


@_runtime_sizes
def _content_kernel(
    base_k,
    base_v,
    off_k_tab,
    off_v_tab,
    off_layer_stride,
    indptr,
    source,
    row,
    wk,
    wv,
    cos,
    sin,
    slots,
    pool_k_tab,
    pool_v_tab,
    n_tokens,
    base_tokens,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    HALF: tl.constexpr,
    DT: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    layer, head, t, mask, m, c1, c2 = _tile(n_tokens, HALF, INTERLEAVED, BLOCK)
    src = (layer * base_tokens + t) * HEADS * DIM + head * DIM  # row offsets, [L, T, H, D]
    k1, k2 = _load_pair(base_k, src, c1, c2, m)
    v1, v2 = _load_pair(base_v, src, c1, c2, m)
    if layer > 0:  # layer 0 depends on token and position only: the rotated base is exact
        first = tl.load(indptr + t, mask=mask, other=0)
        count = tl.load(indptr + t + 1, mask=mask, other=0) - first
        for j in range(0, tl.max(count, 0)):  # each token's taps, in CSR order
            live = mask & (j < count)
            tap = first + j
            s = tl.load(source + tap, mask=live, other=0)
            r = tl.load(row + tap, mask=live, other=0)
            a = tl.load(wk + tap, mask=live, other=0.0)[:, None]
            b = tl.load(wv + tap, mask=live, other=0.0)[:, None]
            at = (layer * tl.load(off_layer_stride + s, mask=live, other=0) + r * HEADS * DIM)[
                :, None
            ] + head * DIM
            kp = tl.load(off_k_tab + s, mask=live, other=0).to(tl.pointer_type(DT))[:, None]
            vp = tl.load(off_v_tab + s, mask=live, other=0).to(tl.pointer_type(DT))[:, None]
            lm = live[:, None]
            k1 += a * tl.load(kp + at + c1[None, :], mask=lm, other=0.0).to(tl.float32)
            k2 += a * tl.load(kp + at + c2[None, :], mask=lm, other=0.0).to(tl.float32)
            v1 += b * tl.load(vp + at + c1[None, :], mask=lm, other=0.0).to(tl.float32)
            v2 += b * tl.load(vp + at + c2[None, :], mask=lm, other=0.0).to(tl.float32)
    _shift_scatter(
        k1,
        k2,
        v1,
        v2,
        cos,
        sin,
        slots,
        pool_k_tab,
        pool_v_tab,
        layer,
        head,
        t,
        mask,
        c1,
        c2,
        HEADS,
        DIM,
        HALF,
        DT,
    )


@_runtime_sizes
def _following_kernel(
    fol_k_tab,
    fol_v_tab,
    fk,
    fv,
    cos,
    sin,
    slots,
    pool_k_tab,
    pool_v_tab,
    n_tokens,
    fol_tokens,
    n_sources,
    n_layers,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    HALF: tl.constexpr,
    DT: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    layer, head, t, mask, m, c1, c2 = _tile(n_tokens, HALF, INTERLEAVED, BLOCK)
    k1 = tl.zeros((BLOCK, HALF), tl.float32)
    k2 = tl.zeros((BLOCK, HALF), tl.float32)
    v1 = tl.zeros((BLOCK, HALF), tl.float32)
    v2 = tl.zeros((BLOCK, HALF), tl.float32)
    row = ((layer * fol_tokens + t) * HEADS + head) * DIM
    for n in range(n_sources):  # per-channel weights [N, L, H, D]
        w = ((n * n_layers + layer) * HEADS + head) * DIM
        wk1, wk2 = tl.load(fk + w + c1)[None, :], tl.load(fk + w + c2)[None, :]
        wv1, wv2 = tl.load(fv + w + c1)[None, :], tl.load(fv + w + c2)[None, :]
        k1, k2, v1, v2 = _add_weighted(
            fol_k_tab, fol_v_tab, n, row, c1, c2, m, wk1, wk2, wv1, wv2, k1, k2, v1, v2, DT
        )
    _shift_scatter(
        k1,
        k2,
        v1,
        v2,
        cos,
        sin,
        slots,
        pool_k_tab,
        pool_v_tab,
        layer,
        head,
        t,
        mask,
        c1,
        c2,
        HEADS,
        DIM,
        HALF,
        DT,
    )


@_runtime_sizes
def _gather_kernel(
    pool_k_tab,
    pool_v_tab,
    slots,
    cos,
    sin,
    out_k,
    out_v,
    n_tokens,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    HALF: tl.constexpr,
    DT: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    layer, head, t, mask, m, c1, c2 = _tile(n_tokens, HALF, INTERLEAVED, BLOCK)
    src = tl.load(slots + t, mask=mask, other=0) * HEADS * DIM + head * DIM
    pk = tl.load(pool_k_tab + layer).to(tl.pointer_type(DT))
    pv = tl.load(pool_v_tab + layer).to(tl.pointer_type(DT))
    k1, k2 = _load_pair(pk, src, c1, c2, m)
    v1, v2 = _load_pair(pv, src, c1, c2, m)
    cs = t[:, None] * HALF + tl.arange(0, HALF)[None, :]
    c = tl.load(cos + cs, mask=m, other=1.0)
    s = tl.load(sin + cs, mask=m, other=0.0)
    dst = ((layer * n_tokens + t) * HEADS + head) * DIM
    _rotate_store(out_k, dst, k1, k2, c, s, c1, c2, mask, True)
    _rotate_store(out_v, dst, v1, v2, c, s, c1, c2, mask, False)


def write_content(
    pool_k: list[torch.Tensor],
    pool_v: list[torch.Tensor],
    slots: torch.Tensor,
    base_k: torch.Tensor,
    base_v: torch.Tensor,
    sources_k: list[torch.Tensor],
    sources_v: list[torch.Tensor],
    taps: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    wk: torch.Tensor | None,
    wv: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
) -> None:
    """Write ``len(slots)`` content tokens (the first of ``base``) into the pool; ``taps``:
    (indptr, source, row) of ``token_index.Taps``, or None for no placeholder offset."""
    layers, base_tokens, heads, dim = base_k.shape
    device = slots.device
    slots = slots.to(torch.int64).contiguous()
    if taps is None:  # no placeholder offset: a token without taps keeps one code path
        sources_k, sources_v = [base_k], [base_v]
        taps = (np.zeros(base_tokens + 1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64))
        wk = wv = torch.zeros(1, dtype=torch.float32, device=device)
    k_tab, v_tab, strides, indptr_t, source_t, row_t = tables(
        device, addresses(sources_k), addresses(sources_v), [o.stride(0) for o in sources_k], *taps
    )
    wk_on = _weights_on(wk, device)
    wv_on = wk_on if wv is wk else _weights_on(wv, device)  # token-matched: one set for both
    grid = (triton.cdiv(slots.numel(), BLOCK_T), layers, heads)
    _content_kernel[grid](
        base_k,
        base_v,
        k_tab,
        v_tab,
        strides,
        indptr_t,
        source_t,
        row_t,
        wk_on,
        wv_on,
        cos.contiguous(),
        sin.contiguous(),
        slots,
        pool_table(pool_k, device),
        pool_table(pool_v, device),
        slots.numel(),
        base_tokens,
        HEADS=heads,
        DIM=dim,
        HALF=dim // 2,
        DT=tl_dtype(base_k.dtype),
        INTERLEAVED=interleaved,
        BLOCK=BLOCK_T,
    )


def _weights_on(weights: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-tap weights as float32 on ``device`` (host ones copied asynchronously)."""
    if weights.device == device:
        return weights.to(torch.float32).contiguous()
    return to_device(weights.numpy(), device, torch.float32)


def write_following(
    pool_k: list[torch.Tensor],
    pool_v: list[torch.Tensor],
    slots: torch.Tensor,
    follows_k: list[torch.Tensor],
    follows_v: list[torch.Tensor],
    fk: torch.Tensor,
    fv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
) -> None:
    """Write ``len(slots)`` following tokens (the first of each source) into the pool."""
    layers, fol_tokens, heads, dim = follows_k[0].shape
    device = slots.device
    slots = slots.to(torch.int64).contiguous()
    grid = (triton.cdiv(slots.numel(), BLOCK_T), layers, heads)
    _following_kernel[grid](
        *tables(device, addresses(follows_k), addresses(follows_v)),
        fk.contiguous(),
        fv.contiguous(),
        cos.contiguous(),
        sin.contiguous(),
        slots,
        pool_table(pool_k, device),
        pool_table(pool_v, device),
        slots.numel(),
        fol_tokens,
        len(follows_k),
        layers,
        HEADS=heads,
        DIM=dim,
        HALF=dim // 2,
        DT=tl_dtype(follows_k[0].dtype),
        INTERLEAVED=interleaved,
        BLOCK=BLOCK_T,
    )


def gather(
    pool_k: list[torch.Tensor],
    pool_v: list[torch.Tensor],
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool rows of ``slots`` over all layers, ``[L, T, H, D]``, keys shifted by cos/sin."""
    layers = len(pool_k)
    _, heads, dim = pool_k[0].shape
    slots = slots.to(torch.int64).contiguous()
    shape = (layers, slots.numel(), heads, dim)
    out_k = torch.empty(shape, dtype=pool_k[0].dtype, device=slots.device)
    out_v = torch.empty_like(out_k)
    grid = (triton.cdiv(slots.numel(), BLOCK_T), layers, heads)
    _gather_kernel[grid](
        pool_table(pool_k, slots.device),
        pool_table(pool_v, slots.device),
        slots,
        cos.contiguous(),
        sin.contiguous(),
        out_k,
        out_v,
        slots.numel(),
        HEADS=heads,
        DIM=dim,
        HALF=dim // 2,
        DT=tl_dtype(out_k.dtype),
        INTERLEAVED=interleaved,
        BLOCK=BLOCK_T,
    )
    return out_k, out_v


@_runtime_sizes
def _start_aligned_distance_kernel(
    q_k,
    q_v,
    a_k_tab,
    a_v_tab,
    a_tokens,
    ph_k,
    ph_v,
    value_sq,
    n_tokens,
    n_layers,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per (anchor, token block, layer): sums over heads and channels, added
    atomically into the per-token outputs (zeroed by the caller)."""
    n, pid_t, layer = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK + tl.arange(0, BLOCK)
    mask = t < n_tokens
    m = mask[:, None]
    d = tl.arange(0, DIM)[None, :]
    ak = tl.load(a_k_tab + n).to(tl.pointer_type(DT))
    av = tl.load(a_v_tab + n).to(tl.pointer_type(DT))
    length = tl.load(a_tokens + n)
    sum_k = tl.zeros((BLOCK,), tl.float32)
    sum_v = tl.zeros((BLOCK,), tl.float32)
    sq_v = tl.zeros((BLOCK,), tl.float32)
    for head in range(HEADS):
        q_row = ((layer * n_tokens + t) * HEADS + head) * DIM
        a_row = ((layer * length + t) * HEADS + head) * DIM
        dk = tl.load(q_k + q_row[:, None] + d, mask=m, other=0.0).to(tl.float32) - tl.load(
            ak + a_row[:, None] + d, mask=m, other=0.0
        ).to(tl.float32)
        dv = tl.load(q_v + q_row[:, None] + d, mask=m, other=0.0).to(tl.float32) - tl.load(
            av + a_row[:, None] + d, mask=m, other=0.0
        ).to(tl.float32)
        sum_k += tl.sum(tl.abs(dk), axis=1)
        sum_v += tl.sum(tl.abs(dv), axis=1)
        sq_v += tl.sum(dv * dv, axis=1)
    scale = 1.0 / (n_layers * HEADS * DIM)
    tl.atomic_add(ph_k + n * n_tokens + t, sum_k * scale, mask=mask)
    tl.atomic_add(ph_v + n * n_tokens + t, sum_v * scale, mask=mask)
    tl.atomic_add(value_sq + n * n_tokens + t, sq_v, mask=mask)


@_runtime_sizes
def _end_aligned_distance_kernel(
    q_k,
    q_v,
    a_k_tab,
    a_v_tab,
    a_tokens,
    fol_k,
    fol_v,
    n_tokens,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n, lh = tl.program_id(0), tl.program_id(1)
    layer, head = lh // HEADS, lh % HEADS
    d = tl.arange(0, DIM)
    ak = tl.load(a_k_tab + n).to(tl.pointer_type(DT))
    av = tl.load(a_v_tab + n).to(tl.pointer_type(DT))
    length = tl.load(a_tokens + n)
    shift = length - n_tokens  # end-aligned: the anchor's last T tokens
    sq_k = tl.zeros((DIM,), tl.float32)
    sq_v = tl.zeros((DIM,), tl.float32)
    for t0 in range(0, n_tokens, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        m = (t < n_tokens)[:, None]
        q_row = ((layer * n_tokens + t) * HEADS + head) * DIM
        a_row = ((layer * length + shift + t) * HEADS + head) * DIM
        dk = tl.load(q_k + q_row[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32) - (
            tl.load(ak + a_row[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
        )
        dv = tl.load(q_v + q_row[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32) - (
            tl.load(av + a_row[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
        )
        sq_k += tl.sum(dk * dk, axis=0)
        sq_v += tl.sum(dv * dv, axis=0)
    out = (n * tl.num_programs(1) + lh) * DIM + d  # [N, L, H, D]
    tl.store(fol_k + out, tl.sqrt(sq_k))
    tl.store(fol_v + out, tl.sqrt(sq_v))


def anchor_distances(
    q_k: torch.Tensor,
    q_v: torch.Tensor,
    anchors_k: list[torch.Tensor],
    anchors_v: list[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """Placeholder distances [N, T] (K, V), following distances [N, L, H, D] (K, V) and the
    gate's ||V - V_n[:T]|| [N] of a content ``[L, T, H, D]`` to anchors ``[L, >=T, H, D]``."""
    layers, tokens, heads, dim = q_k.shape
    n, device = len(anchors_k), q_k.device
    k_tab, v_tab, lengths = tables(
        device, addresses(anchors_k), addresses(anchors_v), [a.shape[1] for a in anchors_k]
    )
    ph_k = torch.zeros((n, tokens), dtype=torch.float32, device=device)
    ph_v, value_sq = torch.zeros_like(ph_k), torch.zeros_like(ph_k)
    fol_k = torch.empty((n, layers, heads, dim), dtype=torch.float32, device=device)
    fol_v = torch.empty_like(fol_k)
    dt = tl_dtype(q_k.dtype)
    _start_aligned_distance_kernel[(n, triton.cdiv(tokens, BLOCK_T), layers)](
        q_k,
        q_v,
        k_tab,
        v_tab,
        lengths,
        ph_k,
        ph_v,
        value_sq,
        tokens,
        layers,
        HEADS=heads,
        DIM=dim,
        DT=dt,
        BLOCK=BLOCK_T,
    )
    _end_aligned_distance_kernel[(n, layers * heads)](
        q_k,
        q_v,
        k_tab,
        v_tab,
        lengths,
        fol_k,
        fol_v,
        tokens,
        HEADS=heads,
        DIM=dim,
        DT=dt,
        BLOCK=4 * BLOCK_T,  # long loop over tokens: wider tiles
    )
    return ph_k, ph_v, fol_k, fol_v, value_sq.sum(dim=1).sqrt()
