"""Offset estimation: the KV a content and the fixed segment after it would have behind a prefix.

For content with base KV (position-0 frame) placed at positions ``start .. start + T - 1``:

- content: ``K = R(start) [K_base + dK]``, ``V = V_base + dV``. The placeholder offset ``dK, dV``
  of each token is by default token-matched (``token_taps``): the mean offset of the
  same token id over the pool's anchors, else of the same index, else of every pooled token;
  the paper's estimate, ``sum_n w_n dK_n`` with per-token weights over the anchors at least as
  long as the content (``matching.placeholder_weights``), is ``placeholder="index"``. An offline
  study found those weights flat (the estimate is then the same-index mean) and the same-token
  mean closer to the measured offset on both packaged models (issue 13). Rotation is
  linear, so offsets are combined in the position-0 frame and rotated once;
- following segment (length S, at ``start + T ..``): ``sum_n w_n KV_n`` with the per-channel
  weights (``matching.following_weights``), rotated to its target. Since the weights sum to 1
  this equals ``base + sum_n w_n (KV_n - base)`` for any base: no template prefill is needed;
- layer 0 depends only on token and position, so it is the rotated base, exactly.

``EstimateOptions`` switches offsets off (the fidelity harness's ablations) and can reproduce the
authors' code instead, which keeps anchor keys and key offsets in the frame of the position where
each anchor was observed and adds them without re-rotation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from radix_anchor.anchor_pool import KV, Anchor, covering
from radix_anchor.matching import (
    Distances,
    anchor_distances,
    blend,
    following_weights,
    placeholder_weights,
    softmax_weights,
)
from radix_anchor.rope import RopeSpec, rotate
from radix_anchor.token_index import Taps, TokenIndex, dense_taps

PLACEHOLDER_ESTIMATES = ("token", "index")


@dataclass(frozen=True)
class EstimateOptions:
    placeholder_offset: bool = True
    placeholder: str = "token"  # one of PLACEHOLDER_ESTIMATES
    following_offset: bool = True
    tau: float = 1.0
    top_k: int | None = None  # None: every compatible anchor
    authors_code: bool = False  # reproduce the reference code (no de-/re-rotation of offsets)

    def __post_init__(self) -> None:
        if self.placeholder not in PLACEHOLDER_ESTIMATES:
            raise ValueError(
                f"placeholder estimate {self.placeholder!r}: expected one of "
                f"{PLACEHOLDER_ESTIMATES}"
            )


@dataclass
class Estimate:
    content: KV  # at positions start .. start + T - 1
    following: KV  # at positions start + T .. start + T + S - 1


@dataclass(eq=False)
class Recipe:
    """What an estimate is made of, before any arithmetic on KV: the torch ``apply`` below and
    the fused kernels (``kvcomm_kernels``) both execute it.

    content (T tokens) = base + sum over token t's taps j of wk[j] * offsets[source[j]][:, row[j]]
    (layers >= 1; layer 0 = base; ``token_index.Taps``); following (S tokens) = sum_n fk[n, l,
    h, d] * follows[n][l, s, h, d] (every layer; layer 0's weights are one-hot on ``follows[0]``,
    whose layer 0 is exact). Keys get the RoPE shift to their positions after the blend
    (rotation is linear). V likewise with wv / fv, unrotated.
    """

    base: KV  # [L, T, H, D], position-0 frame
    offsets: list[KV]  # the taps' sources, [L, rows, H, D] each (empty: no placeholder offset)
    taps: Taps | None
    wk: torch.Tensor | None  # [nnz] float32, per tap
    wv: torch.Tensor | None
    follows: list[KV]  # [L, S, H, D] each, position-0 frame
    fk: torch.Tensor  # [N', L, H, D] float32
    fv: torch.Tensor

    @property
    def length(self) -> int:
        return self.base.num_tokens

    @property
    def following_length(self) -> int:
        return self.follows[0].num_tokens


def estimate(
    base: KV,
    start: int,
    anchors: Sequence[Anchor],
    following_ids: Sequence[int],
    rope: RopeSpec,
    options: EstimateOptions = EstimateOptions(),  # noqa: B008 (frozen, immutable default)
    following_base: KV | None = None,
    content_ids: Sequence[int] = (),
) -> Estimate:
    """Estimate the KV of ``base``'s content at ``start`` and of the fixed segment after it.

    ``anchors``: the pool's anchors (the paper's weights and the following segment's ignore
    those shorter than the content). ``content_ids``: the content's token ids (token-matched
    offsets; without them every token takes the same-index mean).
    ``following_base``: the following segment's KV in the position-0 frame from some other
    context (e.g. the template); needed when following offsets are off or in authors' mode.
    Raises ValueError when no anchor matches and no ``following_base`` is given.
    """
    if options.authors_code:
        usable = covering(anchors, base.num_tokens)
        with_following = [a for a in usable if a.following_ids == tuple(following_ids)]
        return _estimate_authors_code(
            base, start, usable, with_following, rope, options, following_base
        )
    recipe = weigh(base, anchors, following_ids, options, following_base, content_ids=content_ids)
    return apply(recipe, start, rope)


def weigh(
    base: KV,
    anchors: Sequence[Anchor],
    following_ids: Sequence[int],
    options: EstimateOptions = EstimateOptions(),  # noqa: B008 (frozen, immutable default)
    following_base: KV | None = None,
    distances: Distances | None = None,
    content_ids: Sequence[int] = (),
    index: TokenIndex | None = None,
) -> Recipe:
    """Choose the anchors and their weights for ``base``'s content (see ``estimate``).

    ``distances``: to the anchors that cover the content, in order, if already computed;
    ``index``: ``TokenIndex(anchors)``, if already built (the pool caches it)."""
    length = base.num_tokens
    usable = covering(anchors, length)
    following_ids = tuple(following_ids)
    with_following = [i for i, a in enumerate(usable) if a.following_ids == following_ids]
    by_index = options.placeholder == "index"
    needs_distances = (options.placeholder_offset and by_index) or with_following
    if usable and needs_distances and distances is None:
        distances = anchor_distances(base, [a.base for a in usable])
    tau, top_k = options.tau, options.top_k
    offsets, taps, wk, wv = [], None, None, None
    if options.placeholder_offset and by_index and usable:
        offsets = [a.ph_offset for a in usable]
        taps = dense_taps(len(usable), length)
        wk, wv = (  # [N, T] -> token-major taps
            softmax_weights(d, tau, top_k).t().reshape(-1)
            for d in (distances.placeholder_k, distances.placeholder_v)
        )
    elif options.placeholder_offset and not by_index and anchors:
        offsets, taps = token_taps(content_ids, anchors, length, index)
        wk = wv = torch.from_numpy(taps.weight)

    if options.following_offset and with_following:
        follows = [usable[i].following for i in with_following]
        chosen = distances.rows(with_following)
        fk = softmax_weights(chosen.following_k, tau, top_k)
        fv = softmax_weights(chosen.following_v, tau, top_k)
        if following_base is not None:  # its layer 0 is the exact one; it takes no other weight
            follows = [following_base, *follows]
            fk, fv = (torch.cat([torch.zeros_like(w[:1]), w]) for w in (fk, fv))
        fk[:, 0], fv[:, 0] = 0.0, 0.0
        fk[0, 0], fv[0, 0] = 1.0, 1.0
    elif (
        options.following_offset
        and not by_index
        and any(a.following_ids == following_ids for a in anchors)
    ):  # token-matched: no anchor that covers the content has it; the same segment's mean
        follows = [a.following for a in anchors if a.following_ids == following_ids]
        shape = (len(follows), follows[0].k.shape[0], *follows[0].k.shape[2:])
        fk = torch.full(shape, 1.0 / len(follows), device=base.k.device)
        fk[:, 0], fk[0, 0] = 0.0, 1.0  # layer 0 is exact in every anchor: take the first's
        fv = fk.clone()
    elif following_base is not None:
        follows = [following_base]
        fk = torch.ones((1, *following_base.k.shape[:1], *following_base.k.shape[2:]))
        fv = fk.clone()
    else:
        raise ValueError("no anchor has this following segment and no following_base was given")
    return Recipe(base, offsets, taps, wk, wv, follows, fk, fv)


def token_taps(
    content_ids: Sequence[int],
    anchors: Sequence[Anchor],
    length: int,
    index: TokenIndex | None = None,
) -> tuple[list[KV], Taps]:
    """Token-matched placeholder offsets of a content of ``length`` tokens as taps
    (``TokenIndex.taps``): the sources, and the taps. The mean of the same token id over the
    pool (every occurrence counts); for an id no anchor holds, the mean over the anchors at the
    same index; past every anchor, the mean over all their tokens. The two means are computed
    once per pool state (cached on ``index``) in the anchors' dtype, so a token costs the
    kernel one row, not one per anchor."""
    index = index or TokenIndex(anchors)
    taps = index.taps(content_ids, length)
    pool_means(index, anchors, everything=taps.pool_mean)
    sources = [a.ph_offset for a in anchors] + [index.index_mean]
    return sources + [index.pool_mean] if taps.pool_mean else sources, taps


def pool_means(index: TokenIndex, anchors: Sequence[Anchor], everything: bool = False) -> None:
    """Cache on ``index`` the anchors' mean offset at each index (and with ``everything``, over
    every token), unless there already: the engine calls it when a pool changes, so a plan
    finds them made."""
    if index.index_mean is None:
        index.index_mean = _pooled(anchors, by_index=True)
    if everything and index.pool_mean is None:
        index.pool_mean = _pooled(anchors, by_index=False)


def _pooled(anchors: Sequence[Anchor], by_index: bool) -> KV:
    """The anchors' mean offset at each index (over those long enough), or over every token."""
    dtype, longest = anchors[0].ph_offset.k.dtype, max(a.length for a in anchors)
    first = anchors[0].ph_offset.k
    rows = longest if by_index else 1
    shape = (first.shape[0], rows, *first.shape[2:])
    sums = [torch.zeros(shape, dtype=torch.float32, device=first.device) for _ in "kv"]
    count = torch.zeros(rows, dtype=torch.float32, device=first.device)
    for a in anchors:
        for acc, part in zip(sums, _offset(a), strict=True):
            if by_index:
                acc[:, : a.length] += part.float()
            else:
                acc += part.float().sum(1, keepdim=True)
        count[: a.length if by_index else 1] += 1 if by_index else a.length
    return KV(*(acc.div_(count[None, :, None, None]).to(dtype) for acc in sums))


def tap_sum(
    taps: Taps, sources: Sequence[KV], wk: torch.Tensor, wv: torch.Tensor, length: int
) -> KV:
    """The taps' weighted sums for the first ``length`` tokens, float32 ``[L, T, H, D]``
    (the torch reference: one gather per source)."""
    first = sources[0].k
    shape = (first.shape[0], length, *first.shape[2:])
    device = first.device
    out = KV(*(torch.zeros(shape, dtype=torch.float32, device=device) for _ in "kv"))
    live = np.nonzero(taps.tokens < length)[0]
    tokens, source, row = taps.tokens[live], taps.source[live], taps.row[live]
    wk, wv = (w.to(device)[torch.from_numpy(live).to(device)] for w in (wk, wv))
    for s in np.unique(source):
        sel = np.nonzero(source == s)[0]
        at, rows, j = (torch.from_numpy(x).to(device) for x in (tokens[sel], row[sel], sel))
        for acc, part, w in ((out.k, sources[s].k, wk), (out.v, sources[s].v, wv)):
            acc.index_add_(1, at, part[:, rows].float() * w[j][None, :, None, None])
    return out


def held_out_error(
    anchor: Anchor, others: Sequence[Anchor], index: TokenIndex | None = None
) -> torch.Tensor:
    """The relative error of the token-matched estimate of ``anchor``'s content from ``others``:
    ||estimated - measured|| / ||measured|| over layers >= 1, keys and values together, for the
    tokens with a same-id match in ``others`` and for the rest; float32 ``[2]`` (NaN for a class
    with no token) on the anchor's device, no host sync. Taken when an anchor joins its pool, it
    is the error a reuse of that content would have made: the gate predicts from it
    (``gate.py``). ``index``: ``TokenIndex(others)``, if built."""
    length = anchor.length
    index = index or TokenIndex(others)
    sources, taps = token_taps(anchor.content_ids, others, length, index)
    weight = torch.from_numpy(taps.weight)
    est = tap_sum(taps, sources, weight, weight, length)
    err = torch.zeros(length, dtype=torch.float32, device=est.k.device)
    ref = torch.zeros_like(err)
    for guess, offset, base in zip(
        (est.k, est.v), _offset(anchor), (anchor.base.k, anchor.base.v), strict=True
    ):
        offset = offset[1:].float()
        err += (guess[1:] - offset).square().sum((0, 2, 3))
        ref += (base[1:].float() + offset).square().sum((0, 2, 3))
    if anchor.content_ids:
        matched = torch.from_numpy(index.matched(anchor.content_ids)).to(err.device)
    else:
        matched = torch.zeros(length, dtype=torch.bool, device=err.device)
    classes = torch.stack([matched, ~matched]).float()  # [2, T]
    return ((classes @ err) / (classes @ ref)).sqrt()


def _offset(anchor: Anchor) -> tuple[torch.Tensor, torch.Tensor]:
    return anchor.ph_offset.k, anchor.ph_offset.v


def apply(recipe: Recipe, start: int, rope: RopeSpec) -> Estimate:
    """The torch reference of a recipe: the content at ``start ..``, the following segment
    right after it."""
    base, length = recipe.base, recipe.length
    content_k, content_v = base.k.float(), base.v.float()
    if recipe.taps is not None:
        offset = tap_sum(recipe.taps, recipe.offsets, recipe.wk, recipe.wv, length)
        content_k, content_v = content_k + offset.k, content_v + offset.v
        content_k[0], content_v[0] = base.k[0], base.v[0]
    follow_k = blend(recipe.fk, [f.k for f in recipe.follows])
    follow_v = blend(recipe.fv, [f.v for f in recipe.follows])
    dtype = base.k.dtype
    return Estimate(
        KV(rotate(content_k, start, rope).to(dtype), content_v.to(dtype)),
        KV(rotate(follow_k, start + length, rope).to(dtype), follow_v.to(dtype)),
    )


def _estimate_authors_code(
    base: KV,
    start: int,
    usable: list[Anchor],
    with_following: list[Anchor],
    rope: RopeSpec,
    options: EstimateOptions,
    following_base: KV | None,
) -> Estimate:
    """The reference implementation's arithmetic: anchor base keys and offsets live at the
    positions where each anchor was observed; the new content's keys are rotated to ``start``
    first, compared with them, and the blended offsets are added as they are."""
    if following_base is None:
        raise ValueError("authors' mode shifts a template following segment: pass following_base")
    length = base.num_tokens
    rotated_base_k = rotate(base.k, start, rope)
    content_k = rotated_base_k.float()
    content_v = base.v.float()
    if options.placeholder_offset and usable:
        anchor_k = [rotate(a.base.k, a.position, rope) for a in usable]
        offset_k = [rotate(a.ph_offset.k, a.position, rope)[:, :length] for a in usable]
        wk = placeholder_weights(content_k, anchor_k, options.tau, options.top_k)
        wv = placeholder_weights(base.v, [a.base.v for a in usable], options.tau, options.top_k)
        content_k = content_k + blend(wk, offset_k)
        content_v = content_v + blend(wv, [a.ph_offset.v[:, :length] for a in usable])
        content_k[0] = rotated_base_k[0]
        content_v[0] = base.v[0]

    follow_k = rotate(following_base.k, start + length, rope).float()
    follow_v = following_base.v.to(torch.float32, copy=True)
    if options.following_offset and with_following:
        anchor_k = [rotate(a.base.k, a.position, rope) for a in with_following]
        wk = following_weights(rotated_base_k, anchor_k, options.tau, options.top_k)
        wv = following_weights(
            base.v, [a.base.v for a in with_following], options.tau, options.top_k
        )
        # delta_n = observed following KV minus the template shifted to the anchor's positions
        dk = [
            rotate(a.following.k, a.position + a.length, rope).float()
            - rotate(following_base.k, a.position + a.length, rope).float()
            for a in with_following
        ]
        dv = [a.following.v.float() - following_base.v.float() for a in with_following]
        follow_k[1:] = follow_k[1:] + blend(wk, dk)[1:]
        follow_v[1:] = follow_v[1:] + blend(wv, dv)[1:]

    dtype = base.k.dtype
    return Estimate(
        KV(content_k.to(dtype), content_v.to(dtype)), KV(follow_k.to(dtype), follow_v.to(dtype))
    )
