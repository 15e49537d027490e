"""Anchor matching weights: how much each anchor's offsets count for a new content.

Both weights compare the new content's base KV with each anchor's base KV (keys in the
position-0 frame, so the comparison does not depend on where either appeared) and take a
softmax over anchors of minus the distance over a temperature, in float32:

- placeholder weights, one per (anchor, token): mean absolute difference over layers, heads and
  channels, the anchor cut to the content's first T tokens (start-aligned);
- following-segment weights, one per (anchor, layer, head, channel): L2 distance over tokens,
  the anchor cut to its last T tokens (end-aligned: the tokens next to the following segment).

``top_k`` keeps the k closest anchors at each position (default: all, as the paper).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def placeholder_weights(
    query: torch.Tensor, anchors: Sequence[torch.Tensor], tau: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """query ``[L, T, H, D]``, anchors ``[L, >=T, H, D]`` each -> weights ``[N, T]``."""

    def distance(q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return (q - a[:, : q.shape[1]]).abs().mean(dim=(0, 2, 3))

    return _weights(query, anchors, distance, tau, top_k)


def following_weights(
    query: torch.Tensor, anchors: Sequence[torch.Tensor], tau: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """query ``[L, T, H, D]``, anchors ``[L, >=T, H, D]`` each -> weights ``[N, L, H, D]``."""

    def distance(q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # square-sum-sqrt: 5x faster on CPU than linalg.vector_norm over a strided middle dim
        return (q - a[:, a.shape[1] - q.shape[1] :]).square().sum(dim=1).sqrt()

    return _weights(query, anchors, distance, tau, top_k)


def _weights(
    query: torch.Tensor,
    anchors: Sequence[torch.Tensor],
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tau: float,
    top_k: int | None,
) -> torch.Tensor:
    """softmax over anchors of -distance / tau, distances in float32."""
    if not anchors:
        raise ValueError("no anchors to weight")
    q = query.float()
    dist = torch.stack([distance(q, a.float()) for a in anchors])
    return _softmax_over_anchors(-dist / tau, top_k)


def _softmax_over_anchors(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    if top_k is not None and top_k < logits.shape[0]:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(top_k, dim=0).values[-1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=0)


def blend(weights: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_n weights[n] * tensors[n] in float32, tensors ``[L, T, H, D]``; weights ``[N, T]``
    (per token, broadcast over layers, heads, channels) or ``[N, L, H, D]`` (over tokens)."""
    w = weights[:, None, :, None, None] if weights.dim() == 2 else weights[:, :, None, :, :]
    out = w[0] * tensors[0].float()
    for n in range(1, len(tensors)):  # accumulate: no [N, L, T, H, D] intermediate
        out += w[n] * tensors[n].float()
    return out
