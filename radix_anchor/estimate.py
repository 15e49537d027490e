"""Offset estimation: the KV a content and the fixed segment after it would have behind a prefix.

For content with base KV (position-0 frame) placed at positions ``start .. start + T - 1``:

- content: ``K = R(start) [K_base + sum_n w_n dK_n]``, ``V = V_base + sum_n w_n dV_n`` with the
  per-token placeholder weights (``matching.placeholder_weights``); rotation is linear, so the
  offsets are blended in the position-0 frame and rotated once;
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
from radix_anchor.matching import blend, following_weights, placeholder_weights
from radix_anchor.rope import RopeSpec, rotate


@dataclass(frozen=True)
class EstimateOptions:
    placeholder_offset: bool = True
    following_offset: bool = True
    tau: float = 1.0
    top_k: int | None = None  # None: every compatible anchor
    authors_code: bool = False  # reproduce the reference code (no de-/re-rotation of offsets)


@dataclass
class Estimate:
    content: KV  # at positions start .. start + T - 1
    following: KV  # at positions start + T .. start + T + S - 1


def estimate(
    base: KV,
    start: int,
    anchors: Sequence[Anchor],
    following_ids: Sequence[int],
    rope: RopeSpec,
    options: EstimateOptions = EstimateOptions(),  # noqa: B008 (frozen, immutable default)
    following_base: KV | None = None,
) -> Estimate:
    """Estimate the KV of ``base``'s content at ``start`` and of the fixed segment after it.

    ``anchors``: the pool's anchors (those shorter than the content are ignored).
    ``following_base``: the following segment's KV in the position-0 frame from some other
    context (e.g. the template); needed when following offsets are off or in authors' mode.
    Raises ValueError when no anchor matches and no ``following_base`` is given.
    """
    length = base.num_tokens
    usable = covering(anchors, length)
    following_ids = tuple(following_ids)
    with_following = [a for a in usable if a.following_ids == following_ids]
    if options.authors_code:
        return _estimate_authors_code(
            base, start, usable, with_following, rope, options, following_base
        )

    content_k, content_v = base.k.float(), base.v.float()
    if options.placeholder_offset and usable:
        wk = placeholder_weights(base.k, [a.base.k for a in usable], options.tau, options.top_k)
        wv = placeholder_weights(base.v, [a.base.v for a in usable], options.tau, options.top_k)
        content_k = content_k + blend(wk, [a.ph_offset.k[:, :length] for a in usable])
        content_v = content_v + blend(wv, [a.ph_offset.v[:, :length] for a in usable])
        content_k[0], content_v[0] = base.k[0], base.v[0]

    if options.following_offset and with_following:
        wk = following_weights(
            base.k, [a.base.k for a in with_following], options.tau, options.top_k
        )
        wv = following_weights(
            base.v, [a.base.v for a in with_following], options.tau, options.top_k
        )
        follow_k = blend(wk, [a.following.k for a in with_following])
        follow_v = blend(wv, [a.following.v for a in with_following])
        exact0 = following_base if following_base is not None else with_following[0].following
        follow_k[0], follow_v[0] = exact0.k[0], exact0.v[0]
    elif following_base is not None:
        follow_k, follow_v = following_base.k.float(), following_base.v.float()
    else:
        raise ValueError("no anchor has this following segment and no following_base was given")

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
