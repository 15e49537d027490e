"""Base KV of shared contents, keyed by their token ids, least recently used first.

A base is the content's KV in the position-0 frame: the KV an agent's decode produced for its
response, or the content's KV from the first prefill that contained it. Keying by token ids
(never by a client-chosen name) means a base can only ever be applied to the very tokens it was
computed for.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from radix_anchor.anchor_pool import KV

Tokens = tuple[int, ...]


class BaseStore:
    def __init__(self) -> None:
        self._bases: OrderedDict[Tokens, KV] = OrderedDict()

    def __len__(self) -> int:
        return len(self._bases)

    def __contains__(self, tokens: Tokens) -> bool:
        return tokens in self._bases

    def get(self, tokens: Tokens) -> KV | None:
        base = self._bases.get(tokens)
        if base is not None:
            self._bases.move_to_end(tokens)
        return base

    def put(self, tokens: Tokens, base: KV) -> None:
        if base.num_tokens != len(tokens):
            raise ValueError(f"base KV has {base.num_tokens} tokens, content has {len(tokens)}")
        self._bases[tokens] = base
        self._bases.move_to_end(tokens)

    def pop_oldest(self, keep: Callable[[KV], bool] = lambda _: False) -> KV | None:
        """Remove the least recently used base that ``keep`` does not protect."""
        for tokens, base in self._bases.items():
            if not keep(base):
                del self._bases[tokens]
                return base
        return None

    def values(self) -> list[KV]:
        return list(self._bases.values())

    def clear(self) -> None:
        self._bases.clear()
