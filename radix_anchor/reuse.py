"""KVCOMM's serving loop, engine-agnostic: plan a request's reuse, learn from dense prefills.

The engine calls three things, all in token positions of one prompt (a ``PromptLayout``):

- ``plan(layout, exact_len, end)`` after its exact prefix match of ``exact_len`` tokens: either a
  ``Reuse`` (the estimated KV of tokens ``[start, end)``, to be written behind the exact prefix
  ``[0, start)``) or a ``Fallback`` naming why the request must be prefilled densely. Reuse needs
  every shared span from ``start`` on to have a base KV and to pass the gate of its pool; it is
  all or nothing, as in the paper. The prompt's final fixed segment (the lead-in to the answer,
  up to ``exact_final`` tokens of it) is never estimated: the engine prefills it exactly, which
  costs a GPU about what the last few tokens cost and halves the next token's KL.
- ``observe_prefill(layout, read)`` after a dense prefill: a content seen for the first time gets
  its measured KV (de-rotated) as base KV, with the span's template as its origin; a content that
  has a base gives the pool of (span's template, base's origin) an anchor, unless the pool holds
  one measured in the same tokens; the anchor records how far the pool's estimate of its
  content was from what was measured (the gate predicts from that). The prefill that provides a
  base teaches no anchor: its
  offset against itself is zero, and a pool never mixes offsets against bases of two origins.
- ``observe_output(tokens, kv, position, prompt)`` when a request finishes: the KV its decode
  produced becomes the base KV of its response, which later prompts quote.

Everything held (bases, anchors) is copied out of the engine's KV pool, in its dtype and on its
device, and bounded by ``max_bytes``: bases that no anchor refers to and anchor pools share one
least-recently-used order (a pool gives up anchors by its own eviction rule), so pools a workload
stopped using go before the base of the answer just produced.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

import torch

from radix_anchor.anchor_pool import KV, Anchor, AnchorStore, covering
from radix_anchor.base_store import BaseStore
from radix_anchor.estimate import (
    EstimateOptions,
    Recipe,
    apply,
    held_out_error,
    pool_means,
    weigh,
)
from radix_anchor.gate import GateDecision, activate, decide, decide_by_error
from radix_anchor.matching import Distances, anchor_distances
from radix_anchor.prompt import PromptLayout
from radix_anchor.rope import RopeSpec, rotate
from radix_anchor.transfer import HostReading

Read = Callable[[int, int], KV]  # measured KV of the prompt's tokens [start, end)


@dataclass(frozen=True)
class ReuseConfig:
    # the gate's limit in [0, 1]: the largest predicted relative error of a content's estimate
    # (token-matched offsets), or the paper's entropy gamma (placeholder="index")
    threshold: float = 0.2
    max_anchors: int = 20
    window: int = 5
    max_bytes: int = 1 << 30
    exact_final: int = 64  # tokens of the final fixed segment prefilled exactly (0: estimated)
    estimate: EstimateOptions = field(default_factory=EstimateOptions)


@dataclass
class Piece:
    """One shared span of a reuse: its recipe, where its content starts, and how many of its
    content and following tokens are written (all, unless the reuse ends inside them)."""

    recipe: Recipe
    position: int
    content_tokens: int
    following_tokens: int


@dataclass
class Reuse:
    start: int  # the exact prefix is [0, start); tokens [start, end) are estimated
    end: int
    pieces: list[Piece]  # in prompt order, covering [start, end)
    decisions: list[GateDecision]  # one per estimated span

    @property
    def gate_statistic(self) -> float | None:
        """The largest gate statistic over the spans (None where no span measured one)."""
        measured = [d.statistic for d in self.decisions if not math.isnan(d.statistic)]
        return max(measured) if measured else None

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def materialize(self, rope: RopeSpec) -> KV:
        """The estimated KV of [start, end) by the torch reference (kernels write it in place)."""
        parts = []
        for piece in self.pieces:
            est = apply(piece.recipe, piece.position, rope)
            parts += [
                est.content.tokens(slice(0, piece.content_tokens)),
                est.following.tokens(slice(0, piece.following_tokens)),
            ]
        return KV(torch.cat([p.k for p in parts], 1), torch.cat([p.v for p in parts], 1))


# Every reason a request is prefilled densely (the categories reports count), in one place.
FALLBACK_REASONS = (
    # KVComm.plan and the entropy gate
    "no shared spans",
    "exact prefix covers the shared spans",
    "prefix not cached",
    "nothing to estimate",
    "no base KV",
    "following segment unseen",
    "warm-up",
    "predicted error",
    "entropy",
    # the engine's
    "mode off",
    "mode exact",
    "retracted",
    "KV pool full",
)


@dataclass(frozen=True)
class Fallback:
    reason: str  # one of FALLBACK_REASONS
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in FALLBACK_REASONS:
            raise ValueError(f"unknown fallback reason {self.reason!r}")


DistanceFn = Callable[[KV, list[KV]], Distances]


class KVComm:
    """``distances``: computes a content's distances to anchors (``matching.anchor_distances``
    or a fused kernel with the same semantics)."""

    def __init__(
        self,
        rope: RopeSpec,
        config: ReuseConfig = ReuseConfig(),  # noqa: B008 (frozen)
        distances: DistanceFn = anchor_distances,
    ) -> None:
        self.rope = rope
        self.config = config
        self.distances = distances
        clock = itertools.count().__next__  # one recency order for bases and anchor pools
        self.bases = BaseStore(clock)
        self.anchors = AnchorStore(config.max_anchors, config.window, clock)

    def plan(self, layout: PromptLayout, exact_len: int, end: int) -> Reuse | Fallback:
        """Reuse for tokens ``[start, end)`` of ``layout`` behind an exact prefix of
        ``exact_len`` tokens, or why not."""
        spans = layout.spans
        if not spans:
            return Fallback("no shared spans")
        pending = [j for j, (_, span_end) in enumerate(spans) if span_end > exact_len]
        if not pending:
            return Fallback("exact prefix covers the shared spans")
        first = pending[0]
        if exact_len < spans[first][0]:
            if first == 0:
                return Fallback(
                    "prefix not cached",
                    f"exact match {exact_len} < first shared span at {spans[0][0]}",
                )
            first -= 1  # the exact prefix ends in the segment after a span: estimate that span
        start = spans[first][0]
        end = min(end, max(spans[-1][1], len(layout.tokens) - self.config.exact_final))
        if end <= start:
            return Fallback("nothing to estimate", f"end {end} <= start {start}")

        # distances of every span first (device work queued back to back), decisions after:
        # the gate's host-side read then waits once, not once per span
        candidates = []
        by_index = self.config.estimate.placeholder == "index"
        for j in range(first, len(spans)):
            if spans[j][0] >= end:
                break
            content = layout.content(j)
            base = self.bases.get(content)
            if base is None:
                return Fallback("no base KV", f"span {j} {spans[j]}")
            stored = self.anchors.get(self.pool_key(layout, j))
            pool = list(stored or ())
            index = stored.token_index() if stored is not None and not by_index else None
            usable = covering(pool, base.num_tokens)
            following = self._estimated_following(layout, j, end)
            sources = usable if by_index else pool
            if following and len(sources) >= 2:
                if not any(a.following_ids == following for a in sources):
                    return Fallback("following segment unseen", f"span {j}")
            dist = self.distances(base, [a.base for a in usable]) if len(usable) >= 2 else None
            candidates.append((j, base, pool, index, dist))
        chosen = []
        for j, base, pool, index, dist in candidates:
            if by_index:
                values = None if dist is None else dist.values
                decision = decide(base.v, pool, self.config.threshold, distances=values)
            else:
                decision = decide_by_error(
                    layout.content(j), pool, self.config.threshold, index=index
                )
            if not decision.shareable:
                measured = ""
                if not math.isnan(decision.statistic):
                    measured = f" {decision.statistic:.3f} > {decision.limit:.3f}"
                return Fallback(
                    decision.reason.split(":")[0], f"span {j}: {decision.reason}{measured}"
                )
            chosen.append((j, base, pool, index, decision, dist))

        pieces = []
        for j, base, pool, index, _, dist in chosen:
            following = self._estimated_following(layout, j, end)
            nothing_after = None if following else KV(base.k[:, :0], base.v[:, :0])
            recipe = weigh(
                base,
                pool,
                following,
                self.config.estimate,
                nothing_after,
                dist,
                content_ids=layout.content(j),
                index=index,
            )
            span_start, span_end = spans[j]
            pieces.append(
                Piece(
                    recipe,
                    span_start,
                    min(span_end, end) - span_start,
                    max(0, min(layout.following_end(j), end) - span_end),
                )
            )
        return Reuse(start, end, pieces, [d for *_, d, _ in chosen])

    def pool_key(self, layout: PromptLayout, j: int) -> Hashable:
        """Span j's anchor pool: its template, and the origin of its content's base."""
        return layout.slot_key(j), self.bases.origin(layout.content(j))

    @staticmethod
    def _estimated_following(layout: PromptLayout, j: int, end: int) -> tuple[int, ...]:
        """The token ids of span j's following segment, if any of it lies before ``end``."""
        return layout.following(j) if layout.following_end(j) > layout.spans[j][1] < end else ()

    def commit(self, reuse: Reuse) -> None:
        """The reuse was applied: its top anchors earn an activation (kept from eviction)."""
        for decision in reuse.decisions:
            activate(decision)

    def observe_prefill(self, layout: PromptLayout, read: Read) -> None:
        """Learn from a dense prefill of ``layout``: a base for each unseen content, an anchor
        for each other span (see the module docstring)."""
        for j, (start, end) in enumerate(layout.spans):
            tokens = layout.content(j)
            if tokens not in self.bases:
                base = self._position_zero(read(start, end), start)
                self.bases.put(tokens, base, origin=layout.slot_key(j))
                continue
            pool = self.anchors.pool(self.pool_key(layout, j))
            context = layout.tokens[: layout.following_end(j)]
            if pool.holds(context):
                continue  # e.g. an exact prefix hit on the prompt that taught it
            anchor = Anchor.from_dense(
                self.bases.get(tokens),
                read(start, end),
                read(end, layout.following_end(j)),
                layout.following(j),
                start,
                self.rope,
                context,
                content_ids=tokens,
            )
            by_token = self.config.estimate.placeholder == "token"
            if len(pool) and by_token:
                others = list(pool)
                error = held_out_error(anchor, others, pool.token_index())
                anchor.error = HostReading.of(error)
            pool.add(anchor)
            if by_token:
                pool_means(pool.token_index(), list(pool))
        self._enforce_budget()

    def observe_output(
        self, tokens: tuple[int, ...], kv: KV, position: int, prompt: PromptLayout | None = None
    ) -> None:
        """``kv``: the KV a decode produced for ``tokens``, the first at ``position``, after
        ``prompt`` (whose template is the base's origin)."""
        if not tokens:
            return
        origin = ("decode", None if prompt is None else prompt.template())
        base = self._position_zero(kv, position)
        self.bases.put(tokens, base, origin)
        if len(tokens) > 1:
            # Quoted without its last token too: an answer drops its stop token, and whether
            # the engine computed the last sampled token's KV depends on its scheduler.
            self.bases.put(tokens[:-1], base.tokens(slice(0, -1)), origin)
        self._enforce_budget()

    def _position_zero(self, kv: KV, position: int) -> KV:
        """A copy of ``kv`` (measured from ``position`` on) in the position-0 frame: a base."""
        return KV(rotate(kv.k, -position, self.rope), kv.v.clone())

    def clear(self) -> None:
        self.bases.clear()
        self.anchors.clear()

    @property
    def base_bytes(self) -> int:
        return _held_bytes(self.bases.values())

    @property
    def nbytes(self) -> int:
        """Bytes held, each storage counted once (anchors share their base with the store)."""
        return _held_bytes([*self.bases.values(), *self._anchor_kvs()])

    def report(self) -> dict:
        total, bases = self.nbytes, self.base_bytes
        return {
            "bases": len(self.bases),
            "base_bytes": bases,
            "anchors": self.anchors.num_anchors,
            "anchor_pools": len(self.anchors.pools()),
            "anchor_bytes": total - bases,
            "max_bytes": self.config.max_bytes,
        }

    def _anchor_kvs(self) -> list[KV]:
        return [
            kv
            for pool in self.anchors.pools()
            for a in pool
            for kv in (a.base, a.ph_offset, a.following)
        ] + [kv for pool in self.anchors.pools() for kv in pool.cached_kvs()]

    def _enforce_budget(self) -> None:
        """Free memory in one least-recently-used order over bases and anchor pools: the
        oldest of (a base no anchor refers to, the least recently used pool) goes first; a
        pool gives up one anchor at a time by its own rule. A fresh base is never dropped
        while stale pools hold memory."""
        while self.nbytes > self.config.max_bytes:
            in_use = {id(a.base) for pool in self.anchors.pools() for a in pool}
            base = self.bases.oldest(keep=lambda kv, used=in_use: id(kv) in used)
            pool = self.anchors.least_recent()
            if base is None and pool is None:
                return
            if pool is None or (base is not None and base[1] <= pool[1]):
                self.bases.pop(base[0])
            else:
                self.anchors.evict_from(pool[0])


def _held_bytes(kvs: Iterable[KV]) -> int:
    storages: dict[tuple[str, int], int] = {}
    for kv in kvs:
        for t in (kv.k, kv.v):
            storage = t.untyped_storage()
            storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
