"""Anchor matching weights: how much each anchor's offsets count for a new content.

Both weights compare the new content's base KV with each anchor's base KV (keys in the
position-0 frame, so the comparison does not depend on where either appeared) and take a
softmax over anchors of minus the distance over a temperature, in float32:

- placeholder weights, one per (anchor, token): mean absolute difference over layers, heads and
  channels, the anchor cut to the content's first T tokens (start-aligned);
- following-segment weights, one per (anchor, layer, head, channel): L2 distance over tokens,
  the anchor cut to its last T tokens (end-aligned: the tokens next to the following segment).

``top_k`` keeps the k closest anchors at each position (default: all, as the paper).

``anchor_distances`` computes every distance the gate and both weights need in one call: the
torch reference of the fused kernel in ``kvcomm_kernels``, which an engine may pass instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from radix_anchor.anchor_pool import KV
from radix_anchor.transfer import to_device


@dataclass
class Distances:
    """A content's base KV against N anchors' base KV, float32."""

    placeholder_k: torch.Tensor  # [N, T] mean |K - K_n| over layers, heads, channels
    placeholder_v: torch.Tensor  # [N, T]
    following_k: torch.Tensor  # [N, L, H, D] L2 over tokens, end-aligned
    following_v: torch.Tensor  # [N, L, H, D]
    values: torch.Tensor  # [N] Frobenius ||V - V_n[:T]|| (the entropy gate's)

    def rows(self, index: list[int]) -> Distances:
        if index == list(range(len(self.values))):
            return self
        i = to_device(index, self.values.device)
        return Distances(
            *(
                t.index_select(0, i)
                for t in (
                    self.placeholder_k,
                    self.placeholder_v,
                    self.following_k,
                    self.following_v,
                    self.values,
                )
            )
        )


def anchor_distances(query: KV, anchors: Sequence[KV]) -> Distances:
    """Every distance of ``query`` ``[L, T, H, D]`` to anchors ``[L, >=T, H, D]``."""
    qk, qv = query.k.float(), query.v.float()
    ak, av = [a.k.float() for a in anchors], [a.v.float() for a in anchors]
    return Distances(
        torch.stack([_placeholder_distance(qk, a) for a in ak]),
        torch.stack([_placeholder_distance(qv, a) for a in av]),
        torch.stack([_following_distance(qk, a) for a in ak]),
        torch.stack([_following_distance(qv, a) for a in av]),
        torch.stack([(qv - a[:, : qv.shape[1]]).square().sum().sqrt() for a in av]),
    )


def softmax_weights(
    distances: torch.Tensor, tau: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """softmax over anchors (dim 0) of -distance / tau."""
    return _softmax_over_anchors(-distances.float() / tau, top_k)


def _placeholder_distance(q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (q - a[:, : q.shape[1]]).abs().mean(dim=(0, 2, 3))


def _following_distance(q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # square-sum-sqrt: 5x faster on CPU than linalg.vector_norm over a strided middle dim
    return (q - a[:, a.shape[1] - q.shape[1] :]).square().sum(dim=1).sqrt()


def placeholder_weights(
    query: torch.Tensor, anchors: Sequence[torch.Tensor], tau: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """query ``[L, T, H, D]``, anchors ``[L, >=T, H, D]`` each -> weights ``[N, T]``."""
    return _weights(query, anchors, _placeholder_distance, tau, top_k)


def following_weights(
    query: torch.Tensor, anchors: Sequence[torch.Tensor], tau: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """query ``[L, T, H, D]``, anchors ``[L, >=T, H, D]`` each -> weights ``[N, L, H, D]``."""
    return _weights(query, anchors, _following_distance, tau, top_k)


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
    return softmax_weights(torch.stack([distance(q, a.float()) for a in anchors]), tau, top_k)


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
