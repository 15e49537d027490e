"""The entropy gate: is a new content close enough to the pool's anchors to reuse?

Over the N anchors that cover the content (at least as long), s = softmax_n(-||V - V_n[:T]||_F /
tau) and H = -sum s log2 s. The content is shareable when N >= ``min_anchors`` (2: with fewer the
distribution says nothing) and H <= gamma * log2 N. Token-matched offsets take every anchor of
the pool, whatever its length (``cover=False``): the pool then needs ``min_anchors`` anchors,
and the entropy test applies where at least two of them cover the content. A peaked
distribution (one anchor clearly closest) has low entropy; a flat one means no anchor stands
out. When shareable, the anchors in the top-p (0.9) mass of s gain one activation each, which
protects them from eviction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from radix_anchor.anchor_pool import Anchor, covering


@dataclass
class GateDecision:
    shareable: bool
    reason: str  # why not shareable ("" when shareable)
    entropy_bits: float = float("nan")
    limit_bits: float = float("nan")
    anchors: list[Anchor] = field(default_factory=list)  # the compatible anchors, pool order
    probs: torch.Tensor | None = None  # s over ``anchors``
    activated: list[Anchor] = field(default_factory=list)  # top-p mass of s


def decide(
    values: torch.Tensor,
    anchors: Sequence[Anchor],
    gamma: float,
    *,
    tau: float = 1.0,
    top_p: float = 0.9,
    min_anchors: int = 2,
    distances: torch.Tensor | None = None,
    cover: bool = True,
) -> GateDecision:
    """``values``: the content's base V ``[L, T, H, D]``; ``anchors``: the pool's anchors;
    ``distances``: ``||V - V_n[:T]||`` over the anchors that cover the content, if already
    computed (``matching.Distances.values``).

    Pure: activation counts are bumped by ``activate``."""
    length = values.shape[1]
    compatible = covering(anchors, length)
    if len(compatible if cover else anchors) < min_anchors:
        held = f"{len(compatible)} anchor(s) cover {length} tokens"
        if not cover:
            held = f"{len(anchors)} anchor(s) pooled"
        return GateDecision(False, f"warm-up: {held}, need {min_anchors}", anchors=compatible)
    if len(compatible) < 2:  # nothing to compare: the pool's token-matched offsets serve
        return GateDecision(True, "", anchors=compatible)
    if distances is None:
        v = values.float()
        distances = torch.stack(
            [(v - a.base.v[:, :length].float()).square().sum().sqrt() for a in compatible]
        )
    dist = distances.float().cpu()  # the decision is made on the host
    probs = torch.softmax(-dist / tau, dim=0)
    entropy = float(-(probs * torch.log2(probs.clamp_min(1e-45))).sum())
    limit = gamma * math.log2(len(compatible))
    if entropy > limit + 1e-6:  # gamma = 1 admits a uniform distribution despite rounding
        return GateDecision(False, "entropy", entropy, limit, compatible, probs)
    return GateDecision(
        True, "", entropy, limit, compatible, probs, _top_p(compatible, probs, top_p)
    )


def _top_p(anchors: list[Anchor], probs: torch.Tensor, top_p: float) -> list[Anchor]:
    """The fewest most probable anchors whose mass reaches ``top_p`` (ties: pool order)."""
    order = sorted(range(len(anchors)), key=lambda i: (-float(probs[i]), i))
    chosen, mass = [], 0.0
    for i in order:
        chosen.append(anchors[i])
        mass += float(probs[i])
        if mass >= top_p:
            break
    return chosen


def activate(decision: GateDecision) -> None:
    for anchor in decision.activated:
        anchor.activations += 1
