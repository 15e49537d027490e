"""The benchmark scripts' own logic: datasets, answer extraction, HumanEval execution, and the
TTFT exchange's prompt layout (the servers' side is covered by the e2e tests)."""

from __future__ import annotations

import random

import pytest
from tasks import TASKS, extract_choice, extract_code, passes_tests
from ttft import Exchange


def test_mmlu_items_mix_subjects_and_have_one_right_letter():
    items = TASKS["mmlu"].load(200)
    assert len(items) == 200
    assert {item.reference for item in items} == {"A", "B", "C", "D"}
    assert len({item.id.split("/")[1] for item in items}) >= 30  # shuffled across subjects
    assert all("\nD. " in item.question for item in items)


def test_answer_extraction():
    assert extract_choice("B is tempting, but the answer is C.") == "C"
    assert extract_choice("I pick D") == "D"
    assert extract_choice("no letter here") is None
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == (
        "def f():\n    return 1"
    )
    assert extract_code("def g():\n    pass") == "def g():\n    pass"


def test_humaneval_harness_passes_right_code_and_fails_wrong_or_hanging_code():
    items = TASKS["humaneval"].load(None)
    assert len(items) == 164
    item = random.Random().choice(items)  # a fresh problem each run
    problem = item.reference
    right = problem["prompt"] + problem["canonical_solution"]
    assert passes_tests(right, item)
    assert not passes_tests(f"def {problem['entry_point']}(*args):\n    return None\n", item)
    assert not passes_tests(
        f"def {problem['entry_point']}(*args):\n    while True:\n        pass\n", item, 2.0
    )
    assert not passes_tests(None, item)


def test_ttft_prompts_quote_the_shared_spans_behind_each_agents_prefix():
    prefixes = [[1] * 5, [2] * 7, [3] * 6]
    separators = [[9, 9], [8, 8], [7, 7], [6]]
    ex = Exchange(prefixes, separators)
    shared = [[100, 101, 102], [200, 201], [300]]
    for agent in range(3):
        tokens, spans = ex.prompt(agent, shared[: agent + 1])
        assert tokens[: len(prefixes[agent])] == prefixes[agent]
        pieces = [tokens[a:b] for a, b in zip(spans[::2], spans[1::2], strict=True)]
        assert pieces == shared[: agent + 1]
        assert tokens[-1:] == [6]  # the closing separator


def test_paired_accuracy_difference_against_per_item_statistics():
    """The paired CI from per-item differences (pstdev / sqrt(n)), the Wilson interval from its
    textbook form; 7 items gained, 3 lost, 90 concordant."""
    import math
    import statistics

    from accuracy import paired_difference

    pairs = [(False, True)] * 7 + [(True, False)] * 3 + [(True, True)] * 40 + [(False, False)] * 50
    records = [{"correct": {"dense": d, "kvcomm": k}} for d, k in pairs]
    got = paired_difference(records)
    diffs = [int(k) - int(d) for d, k in pairs]
    mean, se = statistics.fmean(diffs), statistics.pstdev(diffs) / math.sqrt(len(diffs))
    assert got["difference"] == mean == 0.04
    assert got["difference_ci95"] == [
        pytest.approx(mean - 1.96 * se, abs=1e-12),
        pytest.approx(mean + 1.96 * se, abs=1e-12),
    ]
    p, n, z = 0.1, 100, 1.96
    lo = (p + z**2 / (2 * n) - z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))) / (1 + z**2 / n)
    hi = (p + z**2 / (2 * n) + z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))) / (1 + z**2 / n)
    assert got["discordance"] == p
    assert got["discordance_ci95"] == [pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12)]
    assert (got["gained"], got["lost"]) == (7, 3)
