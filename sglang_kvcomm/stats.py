"""Request counters the extension reports per scheduler (``GET /kvcomm/stats``); the memory
held (bases, anchors) comes from ``radix_anchor.reuse.KVComm.report``.

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
        }
