"""Anchors and their pools.

An anchor is one observed sample of shared content that followed a given prefix: the content's
base KV, the placeholder offset measured when a request with this prefix was prefilled densely,
and the measured KV of the fixed segment right after the content. Every key tensor is stored in
the position-0 frame (de-rotated so that its first token sits at position 0), which makes
anchors independent of where the content appeared; rotation happens when they are applied.

A pool holds at most V anchors. Adding to a full pool first evicts, among its W oldest anchors,
the least activated one (the oldest on ties): LFU inside a FIFO window, exactly V after.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass

import torch

from radix_anchor.rope import RopeSpec, rotate
from radix_anchor.token_index import TokenIndex
from radix_anchor.transfer import HostReading


@dataclass(eq=False)
class KV:
    """Keys and values of a span, ``[L, T, H, D]`` each (layers, tokens, KV heads, head dim)."""

    k: torch.Tensor
    v: torch.Tensor

    def __post_init__(self) -> None:
        if self.k.shape != self.v.shape or self.k.dim() != 4:
            raise ValueError(
                f"K {tuple(self.k.shape)} and V {tuple(self.v.shape)} must both "
                "be [layers, tokens, kv_heads, head_dim]"
            )

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def tokens(self, sl: slice) -> KV:
        return KV(self.k[:, sl], self.v[:, sl])


@dataclass(eq=False)
class Anchor:
    """One content sample observed behind a pool's prefix (all keys in the position-0 frame).

    ``base``: the content's base KV, with ``content_ids`` its token ids (token-matched offsets
    look offsets up by id). ``ph_offset``: measured KV of the content in this context minus
    ``base`` (same length). ``following``: measured KV of the fixed segment after the content,
    with ``following_ids`` its token ids (only anchors whose following segment matches a
    request's contribute to its estimate). ``error``: ``estimate.held_out_error`` against the
    pool it joined, read to the host (None: it joined an empty pool).
    """

    base: KV
    ph_offset: KV
    following: KV
    following_ids: tuple[int, ...]
    position: int  # where the content started in the observed prompt (for authors' mode)
    activations: int = 0
    context: Hashable = None  # the observed prompt up to the end of ``following``, if known
    content_ids: tuple[int, ...] = ()  # empty: unknown (token-matched offsets skip the anchor)
    # the pool's estimate of this content when it joined, relative error [matched, other tokens]
    error: HostReading | None = None

    def __post_init__(self) -> None:
        if self.ph_offset.k.shape != self.base.k.shape:
            raise ValueError("placeholder offset and base KV must have the same shape")
        if self.content_ids and len(self.content_ids) != self.base.num_tokens:
            raise ValueError("content token ids and base KV differ in length")
        if self.following.num_tokens != len(self.following_ids):
            raise ValueError("following segment KV and token ids differ in length")

    @classmethod
    def from_dense(
        cls,
        base: KV,
        content: KV,
        following: KV,
        following_ids: tuple[int, ...],
        position: int,
        rope: RopeSpec,
        context: Hashable = None,
        content_ids: tuple[int, ...] = (),
    ) -> Anchor:
        """An anchor from a dense prefill: ``content`` measured at ``position ..``, ``following``
        right after it; both are de-rotated to the position-0 frame. ``context`` identifies the
        tokens it was measured in (two anchors of one context are the same sample)."""
        if content.k.shape != base.k.shape:
            raise ValueError(
                f"measured content {tuple(content.k.shape)} != base {tuple(base.k.shape)}"
            )
        dtype = base.k.dtype
        wide = torch.promote_types(dtype, torch.float32)
        offset_k = rotate(content.k, -position, rope).to(wide) - base.k.to(wide)
        offset_v = content.v.to(wide) - base.v.to(wide)
        return cls(
            base=base,
            ph_offset=KV(offset_k.to(dtype), offset_v.to(dtype)),
            following=KV(rotate(following.k, -(position + base.num_tokens), rope), following.v),
            following_ids=tuple(following_ids),
            position=position,
            context=context,
            content_ids=tuple(content_ids),
        )

    @property
    def length(self) -> int:
        return self.base.num_tokens

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.ph_offset.nbytes + self.following.nbytes


def covering(anchors: Iterable[Anchor], length: int) -> list[Anchor]:
    """The anchors at least ``length`` tokens long: only they can cover a content that long."""
    return [a for a in anchors if a.length >= length]


class AnchorPool:
    """At most ``capacity`` (V) anchors, oldest first."""

    def __init__(self, capacity: int, window: int) -> None:
        if capacity < 2 or not 1 <= window <= capacity:
            raise ValueError(
                f"need capacity >= 2 and 1 <= window <= capacity, got {capacity}, {window}"
            )
        self.capacity = capacity
        self.window = window
        self._anchors: list[Anchor] = []
        self._index: TokenIndex | None = None

    def token_index(self) -> TokenIndex:
        """Where the pooled anchors hold each token id; rebuilt after the pool changes."""
        if self._index is None:
            self._index = TokenIndex(self._anchors)
        return self._index

    def cached_kvs(self) -> list[KV]:
        """KV derived from the anchors and cached with the token index (memory budgets count
        it); dropped when the pool changes."""
        index = self._index
        means = () if index is None else (index.index_mean, index.pool_mean)
        return [kv for kv in means if kv is not None]

    def __len__(self) -> int:
        return len(self._anchors)

    def __iter__(self) -> Iterator[Anchor]:
        return iter(self._anchors)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._anchors)

    def holds(self, context: Hashable) -> bool:
        """Whether an anchor measured in ``context`` is pooled: a second one would be the same
        sample again, splitting the gate's weight between two copies."""
        return context is not None and any(a.context == context for a in self._anchors)

    def add(self, anchor: Anchor) -> Anchor | None:
        """Insert ``anchor``; returns the evicted anchor when the pool was full."""
        evicted = self.evict() if len(self._anchors) >= self.capacity else None
        self._anchors.append(anchor)
        self._index = None
        return evicted

    def evict(self) -> Anchor | None:
        """Drop the least activated of the W oldest anchors (the oldest on ties)."""
        if not self._anchors:
            return None
        oldest = self._anchors[: self.window]
        evicted = min(oldest, key=lambda a: a.activations)  # min keeps the first (oldest) tie
        self._anchors.remove(evicted)
        self._index = None
        return evicted

    def compatible(self, length: int) -> list[Anchor]:
        """Anchors that cover a content of ``length`` tokens (offsets are cut to that length)."""
        return covering(self._anchors, length)


class AnchorStore:
    """Pools keyed by (prefix, shared-segment slot) or any hashable key the engine chooses.
    ``clock`` stamps each use of a pool (see ``BaseStore``)."""

    def __init__(self, capacity: int, window: int, clock: Callable[[], int] | None = None) -> None:
        AnchorPool(capacity, window)  # validate once, early
        self.capacity = capacity
        self.window = window
        self._pools: dict[Hashable, AnchorPool] = {}
        self._used: dict[Hashable, int] = {}
        self._clock = clock or itertools.count().__next__

    def pool(self, key: Hashable) -> AnchorPool:
        if key not in self._pools:
            self._pools[key] = AnchorPool(self.capacity, self.window)
        self._used[key] = self._clock()
        return self._pools[key]

    def get(self, key: Hashable) -> AnchorPool | None:
        pool = self._pools.get(key)
        if pool is not None:
            self._used[key] = self._clock()
        return pool

    def least_recent(self) -> tuple[Hashable, int] | None:
        """The least recently used pool that holds anchors, and its last use."""
        used = [(stamp, key) for key, stamp in self._used.items() if self._pools[key]]
        if not used:
            return None
        stamp, key = min(used, key=lambda item: item[0])
        return key, stamp

    def evict_from(self, key: Hashable) -> Anchor | None:
        """One anchor out of pool ``key`` by the pool's rule; an emptied pool is dropped."""
        pool = self._pools[key]
        evicted = pool.evict()
        if not pool:
            del self._pools[key], self._used[key]
        return evicted

    def clear(self) -> None:
        self._pools.clear()
        self._used.clear()

    def pools(self) -> list[AnchorPool]:
        return list(self._pools.values())

    @property
    def num_anchors(self) -> int:
        return sum(len(p) for p in self._pools.values())

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._pools.values())
