"""Offset estimation: the KV a content and the fixed segment after it would have behind a prefix.

For content with base KV (position-0 frame) placed at positions ``start .. start + T - 1``:

- content: ``K = R(start) [K_base + dK]``, ``V = V_base + dV``. The placeholder offset ``dK, dV``
  of each token is by default token-matched (``token_matched_offset``): the mean offset of the
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

    content (T tokens) = base + sum_n wk[n, t] * offsets[n][:, t] (layers >= 1; layer 0 = base);
    following (S tokens) = sum_n fk[n, l, h, d] * follows[n][l, s, h, d] (every layer; layer 0's
    weights are one-hot on ``follows[0]``, whose layer 0 is exact). Keys get the RoPE shift to
    their positions after the blend (rotation is linear). V likewise with wv / fv, unrotated.
    """

    base: KV  # [L, T, H, D], position-0 frame
    offsets: list[KV]  # anchors' placeholder offsets, [L, >=T, H, D] each (empty: none)
    wk: torch.Tensor | None  # [N, T] float32
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
) -> Recipe:
    """Choose the anchors and their weights for ``base``'s content (see ``estimate``).

    ``distances``: to the anchors that cover the content, in order, if already computed."""
    length = base.num_tokens
    usable = covering(anchors, length)
    following_ids = tuple(following_ids)
    with_following = [i for i, a in enumerate(usable) if a.following_ids == following_ids]
    by_index = options.placeholder == "index"
    needs_distances = (options.placeholder_offset and by_index) or with_following
    if usable and needs_distances and distances is None:
        distances = anchor_distances(base, [a.base for a in usable])
    tau, top_k = options.tau, options.top_k
    offsets, wk, wv = [], None, None
    if options.placeholder_offset and by_index and usable:
        offsets = [a.ph_offset for a in usable]
        wk = softmax_weights(distances.placeholder_k, tau, top_k)
        wv = softmax_weights(distances.placeholder_v, tau, top_k)
    elif options.placeholder_offset and not by_index and anchors:
        offset = token_matched_offset(content_ids, anchors, length)
        offsets = [KV(offset.k.to(base.k.dtype), offset.v.to(base.v.dtype))]
        wk = torch.ones((1, length), dtype=torch.float32, device=base.k.device)
        wv = wk

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
    return Recipe(base, offsets, wk, wv, follows, fk, fv)


def token_matched_offset(content_ids: Sequence[int], anchors: Sequence[Anchor], length: int) -> KV:
    """The placeholder offset of each of a content's ``length`` tokens, float32, position-0
    frame: the mean offset of the same token id over ``anchors`` (every occurrence counts);
    for an id no anchor holds, the mean over the anchors at the same index; past every anchor,
    the mean over all their tokens. Runs on the anchors' device without a host sync."""
    if not anchors:
        raise ValueError("no anchors to take offsets from")
    if content_ids and len(content_ids) != length:
        raise ValueError(f"{len(content_ids)} content ids for {length} tokens")
    first = anchors[0].ph_offset.k
    layers, heads, dim = first.shape[0], first.shape[2], first.shape[3]
    device, f32 = first.device, torch.float32
    ids = torch.tensor(content_ids or [-1] * length, dtype=torch.int64, device=device)
    uniq, inverse = torch.unique(ids, return_inverse=True)
    by_token = [torch.zeros(layers, len(uniq), heads, dim, dtype=f32, device=device) for _ in "kv"]
    token_n = torch.zeros(len(uniq), dtype=f32, device=device)
    by_index = [torch.zeros(layers, length, heads, dim, dtype=f32, device=device) for _ in "kv"]
    index_n = torch.zeros(length, dtype=f32, device=device)
    for anchor in anchors:
        offset = tuple(t.to(f32) for t in _offset(anchor))
        n = min(anchor.length, length)
        for acc, part in zip(by_index, offset, strict=True):
            acc[:, :n] += part[:, :n]
        index_n[:n] += 1
        if not content_ids or not anchor.content_ids:
            continue
        theirs = anchor.content_id_tensor(device)
        slot = torch.searchsorted(uniq, theirs).clamp_max(len(uniq) - 1)
        hit = (uniq[slot] == theirs).to(f32)  # ids the content does not hold add nothing
        for acc, part in zip(by_token, offset, strict=True):
            acc.index_add_(1, slot, part * hit[None, :, None, None])
        token_n.index_add_(0, slot, hit)
    count = token_n[inverse]
    matched = (count > 0)[None, :, None, None]
    indexed = (index_n > 0)[None, :, None, None]
    past_every_anchor = length > max(a.length for a in anchors)
    out = []
    for part, token_acc, index_acc in zip((0, 1), by_token, by_index, strict=True):
        same_token = token_acc[:, inverse] / count.clamp_min(1)[None, :, None, None]
        same_index = index_acc / index_n.clamp_min(1)[None, :, None, None]
        estimate = torch.where(matched, same_token, same_index)
        if past_every_anchor:
            pooled = sum(_offset(a)[part].to(f32).sum(1, keepdim=True) for a in anchors)
            mean = pooled / sum(a.length for a in anchors)
            estimate = torch.where(matched | indexed, estimate, mean)
        out.append(estimate)
    return KV(*out)


def matched_tokens(ids: torch.Tensor, anchors: Sequence[Anchor]) -> torch.Tensor:
    """Which of a content's tokens (``ids``, int64 ``[T]``) take a same-token offset: the ids
    some anchor holds, ``[T]`` bool on ``ids``' device."""
    held = [a.content_id_tensor(ids.device) for a in anchors if a.content_ids]
    if not held:
        return torch.zeros_like(ids, dtype=torch.bool)
    return torch.isin(ids, torch.cat(held))


def held_out_error(anchor: Anchor, others: Sequence[Anchor]) -> torch.Tensor:
    """The relative error of the token-matched estimate of ``anchor``'s content from ``others``:
    ||estimated - measured|| / ||measured|| over layers >= 1, keys and values together, for the
    tokens ``matched_tokens`` finds and for the rest; float32 ``[2]`` (NaN for a class with no
    token) on the anchor's device, no host sync. Taken when an anchor joins its pool, it is the
    error a reuse of that content would have made: the gate predicts from it (``gate.py``)."""
    length = anchor.length
    est = token_matched_offset(anchor.content_ids, others, length)
    err = torch.zeros(length, dtype=torch.float32, device=est.k.device)
    ref = torch.zeros_like(err)
    for guess, offset, base in zip(
        (est.k, est.v), _offset(anchor), (anchor.base.k, anchor.base.v), strict=True
    ):
        offset = offset[1:].float()
        err += (guess[1:] - offset).square().sum((0, 2, 3))
        ref += (base[1:].float() + offset).square().sum((0, 2, 3))
    matched = matched_tokens(anchor.content_id_tensor(err.device), others)
    classes = torch.stack([matched, ~matched]).float()  # [2, T]
    return ((classes @ err) / (classes @ ref)).sqrt()


def _offset(anchor: Anchor) -> tuple[torch.Tensor, torch.Tensor]:
    return anchor.ph_offset.k, anchor.ph_offset.v


def apply(recipe: Recipe, start: int, rope: RopeSpec) -> Estimate:
    """The torch reference of a recipe: the content at ``start ..``, the following segment
    right after it."""
    base, length = recipe.base, recipe.length
    content_k, content_v = base.k.float(), base.v.float()
    if recipe.offsets:
        content_k = content_k + blend(recipe.wk, [o.k[:, :length] for o in recipe.offsets])
        content_v = content_v + blend(recipe.wv, [o.v[:, :length] for o in recipe.offsets])
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
