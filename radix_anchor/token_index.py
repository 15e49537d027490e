"""Where a pool's anchors hold each token id: the host-side lookup behind token-matched offsets
and the error gate.

Built once per pool state (``AnchorPool.token_index``) from the anchors' token ids, in numpy:
a request's plan then finds its content's same-id rows, its matched share and each anchor's
share of its ids without a device operation, so nothing in the plan waits on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from radix_anchor.anchor_pool import KV, Anchor


@dataclass(frozen=True)
class Taps:
    """A content's offset as a sparse mean over pooled rows: token ``t`` takes the mean of
    rows ``row[j]`` of sources ``source[j]`` for ``j`` in ``indptr[t] : indptr[t + 1]``.
    Sources ``0 .. N-1`` are the anchors in index order; with token-matched taps, source ``N``
    is the pool's mean offset at each index and source ``N + 1`` (only when ``pool_mean``) the
    mean over every pooled token, one row."""

    indptr: np.ndarray  # int64 [T + 1]
    source: np.ndarray  # int64 [nnz]
    row: np.ndarray  # int64 [nnz]
    weight: np.ndarray  # float32 [nnz], 1 / taps of its token
    pool_mean: bool

    @property
    def tokens(self) -> np.ndarray:
        """The token of each tap, int64 [nnz]."""
        return np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))


class TokenIndex:
    def __init__(self, anchors: Sequence[Anchor]) -> None:
        self.num_anchors = len(anchors)
        self.lengths = np.array([a.length for a in anchors], dtype=np.int64)
        with_ids = [(n, a) for n, a in enumerate(anchors) if a.content_ids]
        ids = [np.asarray(a.content_ids, dtype=np.int64) for _, a in with_ids]
        ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        source = np.concatenate([np.full(a.length, n) for n, a in with_ids] or [[]])
        row = np.concatenate([np.arange(a.length) for _, a in with_ids] or [[]])
        order = np.argsort(ids, kind="stable")  # (anchor, row) order within an id
        self._ids = ids[order]
        self._source = source.astype(np.int64)[order]
        self._row = row.astype(np.int64)[order]
        self._unique, self._first, self._count = np.unique(
            self._ids, return_index=True, return_counts=True
        )
        # the taps' sources N and N + 1, made on first need (estimate.token_taps)
        self.index_mean: KV | None = None
        self.pool_mean: KV | None = None

    def _hits(self, content: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each token: its id's position in ``_unique`` and whether the pool holds it."""
        if not len(self._unique):
            return np.zeros(len(content), np.int64), np.zeros(len(content), bool)
        pos = np.searchsorted(self._unique, content).clip(max=len(self._unique) - 1)
        return pos, self._unique[pos] == content

    def matched(self, content_ids: Sequence[int]) -> np.ndarray:
        """Which tokens take a same-id offset: bool [T]."""
        return self._hits(np.asarray(content_ids, dtype=np.int64))[1]

    def shares(self, content_ids: Sequence[int]) -> np.ndarray:
        """Per anchor, how many of its tokens have an id the content holds: int64 [N]."""
        held = np.isin(self._ids, np.asarray(content_ids, dtype=np.int64))
        return np.bincount(self._source[held], minlength=self.num_anchors)

    def taps(self, content_ids: Sequence[int], length: int) -> Taps:
        """Token-matched offsets as taps: each token's mean over every pooled row of its id;
        for an id no anchor holds (or unknown ``content_ids``), row ``t`` of the pool's mean at
        each index (source N); past every anchor, the pool mean (source N + 1)."""
        if not self.num_anchors:
            raise ValueError("no anchors to take offsets from")
        if content_ids and len(content_ids) != length:
            raise ValueError(f"{len(content_ids)} content ids for {length} tokens")
        t = np.arange(length)
        if content_ids and len(self._unique):
            pos, hit = self._hits(np.asarray(content_ids, dtype=np.int64))
        else:
            pos, hit = np.zeros(length, np.int64), np.zeros(length, bool)
        n_same = np.where(hit, self._count[pos] if len(self._count) else 0, 0)
        past = ~hit & (t >= self.lengths.max())
        per_token = np.where(hit, n_same, 1)
        # same id: the runs of sorted rows starting at _first[pos]
        same_tok = np.repeat(t, n_same)
        run_start = np.repeat(np.cumsum(n_same) - n_same, n_same)
        sorted_at = np.repeat(self._first[pos] if len(self._first) else pos, n_same)
        sorted_at = sorted_at + np.arange(len(same_tok)) - run_start
        other = t[~hit]
        tokens = np.concatenate([same_tok, other])
        source = np.concatenate([self._source[sorted_at], self.num_anchors + past[other]])
        row = np.concatenate([self._row[sorted_at], np.where(past[other], 0, other)])
        order = np.argsort(tokens, kind="stable")
        indptr = np.concatenate([[0], np.cumsum(per_token)]).astype(np.int64)
        weight = (1.0 / per_token[tokens[order]]).astype(np.float32)
        source, row = source[order].astype(np.int64), row[order].astype(np.int64)
        return Taps(indptr, source, row, weight, bool(past.any()))


def dense_taps(num_sources: int, length: int) -> Taps:
    """Every source at every token's own index (the paper's per-anchor weights), token-major:
    tap ``t * N + n`` is row ``t`` of source ``n``."""
    indptr = np.arange(0, (length + 1) * num_sources, num_sources, dtype=np.int64)
    source = np.tile(np.arange(num_sources, dtype=np.int64), length)
    row = np.repeat(np.arange(length, dtype=np.int64), num_sources)
    return Taps(indptr, source, row, np.full(len(source), 1.0 / num_sources, np.float32), False)
