from __future__ import annotations

import pytest

from kvcomm_frontend.agents import agent_message, extract_number
from kvcomm_frontend.markup import parse


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("So 3 + 4 = 7. The answer is 7.", "7"),
        ("The answer is 1,250 dollars", "1250"),
        ("The answer is -3.5.", "-3.5"),
        ("It costs 12 and then 18", "18"),
        ("The answer is 18.0", "18"),
        # the LaTeX that Qwen2.5-Coder writes around its result
        ("6 * 8 = 48\n\nThe answer is \\(\\boxed{48}\\) dollars.", "48"),
        ("no digits here", None),
    ],
)
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_agent_message_quotes_question_and_answers_as_shared_in_order():
    text = agent_message(" What is 1+1? ", [("Math Solver", "2"), ("Inspector", " It is 2")])
    markup = parse(text)
    assert [piece for piece, is_shared in markup.pieces if is_shared] == [
        "What is 1+1?",  # the question is stripped
        "2",
        " It is 2",  # answers are quoted verbatim: their ids are the model's
    ]
    plain = markup.text
    assert plain.index("Problem: What") < plain.index("Math Solver") < plain.index("Inspector")
    assert plain.endswith("Your answer:")
