"""A prompt as the server sees it: token ids with the spans of shared content marked.

Between and around the shared spans lie fixed segments (an agent's template text). The fixed
segments before span j, taken together, are the template up to that placeholder: they name the
anchor pool of the span (same template, same pool), which is how a pool stays keyed by prefix
while the earlier placeholders' contents change from prompt to prompt. The fixed segment right
after span j (up to the next span or the end of the prompt) is its "following" segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Span = tuple[int, int]  # [start, end) into the prompt's tokens


@dataclass(frozen=True)
class PromptLayout:
    tokens: tuple[int, ...]
    spans: tuple[Span, ...]  # ordered, disjoint, non-empty, inside tokens

    @classmethod
    def of(cls, tokens: Sequence[int], spans: Sequence[Span]) -> PromptLayout:
        previous_end = 0
        for start, end in spans:
            if not previous_end <= start < end <= len(tokens):
                raise ValueError(
                    f"spans {list(spans)} are not ordered, disjoint and inside {len(tokens)} tokens"
                )
            previous_end = end
        return cls(tuple(tokens), tuple((int(s), int(e)) for s, e in spans))

    def content(self, j: int) -> tuple[int, ...]:
        start, end = self.spans[j]
        return self.tokens[start:end]

    def following_end(self, j: int) -> int:
        return self.spans[j + 1][0] if j + 1 < len(self.spans) else len(self.tokens)

    def following(self, j: int) -> tuple[int, ...]:
        return self.tokens[self.spans[j][1] : self.following_end(j)]

    def slot_key(self, j: int) -> tuple[tuple[int, ...], ...]:
        """The fixed segments before span j: the template up to this placeholder."""
        return self._fixed_segments(self.spans[:j], self.spans[j][0])

    def template(self) -> tuple[tuple[int, ...], ...]:
        """Every fixed segment: the prompt with its shared contents left out."""
        return self._fixed_segments(self.spans, len(self.tokens))

    def _fixed_segments(self, spans: Sequence[Span], end: int) -> tuple[tuple[int, ...], ...]:
        bounds = [0, *(b for span in spans for b in span), end]
        return tuple(self.tokens[a:b] for a, b in zip(bounds[0::2], bounds[1::2], strict=True))
