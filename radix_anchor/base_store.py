"""Base KV of shared contents, keyed by their token ids, least recently used first.

A base is the content's KV in the position-0 frame: the KV an agent's decode produced for its
response, or the content's KV from the first prefill that contained it. Keying by token ids
(never by a client-chosen name) means a base can only ever be applied to the very tokens it was
computed for. Each base records its origin, the context class it was computed in (the engine
chooses: a template), because offsets measured against bases of one origin do not apply to a
base of another.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable

from radix_anchor.anchor_pool import KV

Tokens = tuple[int, ...]


class BaseStore:
    """``clock``: a shared counter that stamps each use, so the engine can weigh a base's last
    use against an anchor pool's when memory runs short."""

    def __init__(self, clock: Callable[[], int] | None = None) -> None:
        self._bases: OrderedDict[Tokens, KV] = OrderedDict()
        self._used: dict[Tokens, int] = {}
        self._origins: dict[Tokens, Hashable] = {}
        self._clock = clock or itertools.count().__next__

    def __len__(self) -> int:
        return len(self._bases)

    def __contains__(self, tokens: Tokens) -> bool:
        return tokens in self._bases

    def get(self, tokens: Tokens) -> KV | None:
        base = self._bases.get(tokens)
        if base is not None:
            self._touch(tokens)
        return base

    def put(self, tokens: Tokens, base: KV, origin: Hashable = None) -> None:
        if base.num_tokens != len(tokens):
            raise ValueError(f"base KV has {base.num_tokens} tokens, content has {len(tokens)}")
        self._bases[tokens] = base
        self._origins[tokens] = origin
        self._touch(tokens)

    def origin(self, tokens: Tokens) -> Hashable:
        """Where the base of ``tokens`` was computed (``put``'s ``origin``)."""
        return self._origins.get(tokens)

    def oldest(self, keep: Callable[[KV], bool] = lambda _: False) -> tuple[Tokens, int] | None:
        """The least recently used base that ``keep`` does not protect, and its last use."""
        for tokens, base in self._bases.items():
            if not keep(base):
                return tokens, self._used[tokens]
        return None

    def pop(self, tokens: Tokens) -> KV:
        del self._used[tokens], self._origins[tokens]
        return self._bases.pop(tokens)

    def values(self) -> list[KV]:
        return list(self._bases.values())

    def clear(self) -> None:
        self._bases.clear()
        self._used.clear()
        self._origins.clear()

    def _touch(self, tokens: Tokens) -> None:
        self._bases.move_to_end(tokens)
        self._used[tokens] = self._clock()
