"""Request counters the extension reports per scheduler (``GET /kvcomm/stats``); the memory
held (bases, anchors) comes from ``radix_anchor.reuse.KVComm.report``.

A request is counted once, when it finishes, by its final decision report: a reuse that was
later served densely (its prefix evicted while it waited, retracted) counts as dense.

Reuse rate follows the paper: the share of agent calls with shared segments that skipped
prefill (decision ``reuse``) among those that could have (``reuse`` + ``dense``); calls that
opted out (``off``) do not count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

DECISIONS = ("reuse", "dense", "off")


@dataclass
class KVCommStats:
    requests: Counter = field(default_factory=lambda: Counter({d: 0 for d in DECISIONS}))
    fallbacks: Counter = field(default_factory=Counter)  # dense decisions by reason
    tokens_matched_exact: int = 0
    tokens_estimated: int = 0
    tokens_prefilled: int = 0
    estimates_released: int = 0  # planned for a request the round did not admit, then freed

    def count(self, report: dict) -> None:
        """Add one finished request's final decision report (``tree_cache._record``)."""
        self.requests[report["decision"]] += 1
        if report["decision"] == "dense":
            self.fallbacks[report["reason"]] += 1
        self.tokens_matched_exact += report["tokens_exact"]
        self.tokens_estimated += report["tokens_estimated"]
        self.tokens_prefilled += report["tokens_prefilled"]

    @property
    def reuse_rate(self) -> float:
        eligible = self.requests["reuse"] + self.requests["dense"]
        return self.requests["reuse"] / eligible if eligible else 0.0

    def as_dict(self) -> dict:
        return {
            "requests": dict(self.requests),
            "reuse_rate": self.reuse_rate,
            "fallbacks": dict(self.fallbacks),
            "tokens_matched_exact": self.tokens_matched_exact,
            "tokens_estimated": self.tokens_estimated,
            "tokens_prefilled": self.tokens_prefilled,
            "estimates_released": self.estimates_released,
        }
