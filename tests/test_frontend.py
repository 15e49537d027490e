from __future__ import annotations

import pytest

from kvcomm_frontend.agents import agent_message, extract_number


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("So 3 + 4 = 7. The answer is 7.", "7"),
        ("The answer is 1,250 dollars", "1250"),
        ("The answer is -3.5.", "-3.5"),
        ("It costs 12 and then 18", "18"),
        ("The answer is 18.0", "18"),
        ("no digits here", None),
    ],
)
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_agent_message_lists_previous_answers_in_order():
    text = agent_message("What is 1+1?", [("Math Solver", "2"), ("Inspector", "It is 2")])
    assert text.index("Problem: What is 1+1?") < text.index("Math Solver") < text.index("Inspector")
    assert text.endswith("Your answer:")
