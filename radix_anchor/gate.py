"""The gate: is a new content's estimate likely close enough to its dense KV to reuse?

Two criteria, one per placeholder estimate (``estimate.PLACEHOLDER_ESTIMATES``):

- ``decide_by_error`` (token-matched offsets, the default) predicts the estimate's relative
  error from what the pool measured: every anchor, when it joined, recorded how far the pool's
  estimate of its own content was from its dense KV (``estimate.held_out_error``), for tokens
  with a same-id match and for the rest. A content's predicted error is those means mixed by
  its share of matched tokens, ``sqrt(m e_matched^2 + (1 - m) e_other^2)``, capped at 1 (an
  estimate as far from the KV as the KV's own norm); it is shareable when that is at most
  ``threshold``, so 1 admits every content of a warm pool. The statistic is a ratio of norms:
  it does not depend on the model's activation scale, and it is the quantity the estimate tries
  to make small. The anchors holding the most of the content's token ids (top-p of their
  share; every anchor when none does) gain an activation.
- ``decide`` (the paper's, ``placeholder="index"``): over the N anchors that cover the content
  (at least as long), s = softmax_n(-||V - V_n[:T]||_F / tau) and H = -sum s log2 s; shareable
  when N >= ``min_anchors`` and H <= gamma * log2 N. Distances of hundreds make s one-hot, so
  H tests the scale of the activations more than the estimate (issue 13). The anchors in the
  top-p (0.9) mass of s gain one activation each, which protects them from eviction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from radix_anchor.anchor_pool import Anchor, covering
from radix_anchor.token_index import TokenIndex


@dataclass
class GateDecision:
    shareable: bool
    reason: str  # why not shareable ("" when shareable)
    statistic: float = float("nan")  # predicted relative error, or entropy in bits
    limit: float = float("nan")  # shareable when statistic <= limit
    anchors: list[Anchor] = field(default_factory=list)  # the anchors weighed, pool order
    probs: torch.Tensor | None = None  # over ``anchors``: s, or each one's share of the ids
    activated: list[Anchor] = field(default_factory=list)  # top-p mass of s


def decide_by_error(
    content_ids: Sequence[int],
    anchors: Sequence[Anchor],
    threshold: float,
    *,
    index: TokenIndex | None = None,
    top_p: float = 0.9,
    min_anchors: int = 2,
) -> GateDecision:
    """``content_ids``: the content's token ids; ``anchors``: its pool; ``index``: their
    ``TokenIndex`` if built. Host work only: the anchors' errors are host readings, and an
    error whose copy has not landed yet counts as unmeasured.

    Pure: activation counts are bumped by ``activate``."""
    measured = [a.error.value.tolist() for a in anchors if a.error is not None and a.error.ready]
    if len(anchors) < min_anchors or not measured:
        held = f"{len(anchors)} anchor(s) pooled, {len(measured)} with a measured error"
        return GateDecision(False, f"warm-up: {held}, need {min_anchors}", anchors=list(anchors))
    index = index or TokenIndex(anchors)
    e_matched, e_other = (_nanmean(column) for column in zip(*measured, strict=True))
    e_matched = e_other if math.isnan(e_matched) else e_matched
    e_other = e_matched if math.isnan(e_other) else e_other
    share = float(index.matched(content_ids).mean()) if content_ids else 0.0
    error = min(math.sqrt(share * e_matched**2 + (1.0 - share) * e_other**2), 1.0)
    held = torch.from_numpy(index.shares(content_ids)).float()
    probs = held / held.sum().clamp_min(1.0)
    if error > threshold:
        return GateDecision(False, "predicted error", error, threshold, list(anchors), probs)
    # the anchors the estimate drew on: those holding the content's ids; else the index mean's
    activated = _top_p(list(anchors), probs, top_p) if float(held.sum()) else list(anchors)
    return GateDecision(True, "", error, threshold, list(anchors), probs, activated)


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def decide(
    values: torch.Tensor,
    anchors: Sequence[Anchor],
    gamma: float,
    *,
    tau: float = 1.0,
    top_p: float = 0.9,
    min_anchors: int = 2,
    distances: torch.Tensor | None = None,
) -> GateDecision:
    """The paper's entropy gate. ``values``: the content's base V ``[L, T, H, D]``;
    ``anchors``: the pool's anchors; ``distances``: ``||V - V_n[:T]||`` over the anchors that
    cover the content, if already computed (``matching.Distances.values``).

    Pure: activation counts are bumped by ``activate``."""
    length = values.shape[1]
    compatible = covering(anchors, length)
    if len(compatible) < min_anchors:
        held = f"{len(compatible)} anchor(s) cover {length} tokens"
        return GateDecision(False, f"warm-up: {held}, need {min_anchors}", anchors=compatible)
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
