"""Radix-tree eviction with agent templates last.

A reuse needs its agent's fixed prefix (the exact prefix up to the first shared span) in the
tree: without it the request is prefilled densely ("prefix not cached"). Under memory pressure
SGLang evicts leaves in the order of its policy, and a template leaf (every prompt behind it
already evicted) goes as soon as it is the oldest. ``TemplatesLast`` wraps that policy: leaves
marked as templates come after every other leaf, in the policy's order among themselves. They
stay evictable, so the tree gives up the same number of tokens when it must; only the order
changes. Marks are weak and bounded: the most recent ``capacity`` templates.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any


class TemplatesLast:
    """An eviction strategy (``get_priority``) ordering marked nodes after all others."""

    def __init__(self, inner: Any, capacity: int = 256) -> None:
        self.inner = inner
        self.capacity = capacity
        self._marked: OrderedDict[int, weakref.ref] = OrderedDict()

    def mark(self, node: Any) -> None:
        key = id(node)
        self._marked[key] = weakref.ref(node)
        self._marked.move_to_end(key)
        while len(self._marked) > self.capacity:
            self._marked.popitem(last=False)

    def marked(self, node: Any) -> bool:
        ref = self._marked.get(id(node))
        return ref is not None and ref() is node

    def clear(self) -> None:
        self._marked.clear()

    def get_priority(self, node: Any) -> tuple[bool, Any]:
        return self.marked(node), self.inner.get_priority(node)


def node_at(last_node: Any, matched: int, position: int) -> Any | None:
    """The node of a matched path that holds token ``position``; ``last_node`` ends the path
    at ``matched`` tokens (SGLang splits a node where a match ends). None past the match."""
    if not 0 <= position < matched:
        return None
    node, end = last_node, matched
    while node is not None and node.parent is not None:
        start = end - len(node.key)
        if start <= position:
            return node
        node, end = node.parent, start
    return None
