"""How a prompt is cut into shared spans, their pools (slot keys) and following segments."""

from __future__ import annotations

import pytest

from radix_anchor.prompt import PromptLayout

TOKENS = tuple(range(100, 120))


def test_slot_keys_are_the_fixed_segments_before_each_span():
    layout = PromptLayout.of(TOKENS, [(3, 7), (10, 12)])
    assert layout.content(0) == TOKENS[3:7] and layout.content(1) == TOKENS[10:12]
    assert layout.slot_key(0) == (TOKENS[0:3],)
    assert layout.slot_key(1) == (TOKENS[0:3], TOKENS[7:10])
    assert layout.following(0) == TOKENS[7:10] and layout.following_end(0) == 10
    assert layout.following(1) == TOKENS[12:] and layout.following_end(1) == 20


def test_same_template_different_contents_share_pools():
    a = PromptLayout.of((1, 2, 50, 51, 3, 60, 4), [(2, 4), (5, 6)])
    b = PromptLayout.of((1, 2, 70, 3, 80, 81, 82, 4), [(2, 3), (4, 7)])
    assert a.slot_key(0) == b.slot_key(0) and a.slot_key(1) == b.slot_key(1)
    assert a.following(1) == b.following(1) == (4,)


@pytest.mark.parametrize("spans", [[(5, 3)], [(0, 4), (2, 6)], [(18, 21)], [(-1, 2)]])
def test_bad_spans_are_refused(spans):
    with pytest.raises(ValueError, match="ordered, disjoint"):
        PromptLayout.of(TOKENS, spans)
