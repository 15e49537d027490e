"""Multi-agent programs written with ``@sgl.function`` and fork/join.

``fully_connected``: N agents with distinct roles answer a question in turn; each sees the
question and the answers of the agents before it; a decision agent reads them all and answers.
Each agent's prompt starts with its own system prompt, so the shared text (the question, the
other agents' answers) sits behind a different prefix in every prompt: the case a radix cache
cannot reuse and KVCOMM targets. The question and the answers are marked ``shared``; the decision
agent runs ``exact`` (estimated KV is known to change judges' choices).

Role sets in the paper's style (five each, a program takes the first N, three by default) for
math (GSM8K), knowledge questions (MMLU) and code (HumanEval).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sglang as sgl

from kvcomm_frontend.markup import agent, shared


@dataclass(frozen=True)
class AgentRole:
    name: str
    system_prompt: str


# Small models copy a placeholder ("The answer is N.") or an example number literally, and skip
# the reasoning when told to be brief: the ending names what follows instead of showing it.
_SHOW_WORK = (
    "Show each calculation, then finish with the sentence 'The answer is' followed by "
    "the final number."
)
MATH_ROLES = (
    AgentRole(
        "Math Solver",
        f"You are a careful math solver. Give your own solving process step by step. {_SHOW_WORK}",
    ),
    AgentRole(
        "Mathematical Analyst",
        "You are a mathematical analyst. Check the other agents' "
        f"reasoning, then solve the problem yourself step by step. {_SHOW_WORK}",
    ),
    AgentRole(
        "Inspector",
        "You are an inspector who verifies arithmetic. Recompute each "
        f"quantity of the problem step by step. {_SHOW_WORK}",
    ),
    AgentRole(
        "Programming Expert",
        "You are a programming expert. Write the computation as "
        f"short Python-like steps and evaluate them. {_SHOW_WORK}",
    ),
    AgentRole(
        "Math Teacher",
        "You are a math teacher. Explain the simplest way to solve the "
        f"problem and check the other answers. {_SHOW_WORK}",
    ),
)

MATH_DECISION = AgentRole(
    "Decision Maker",
    "You are the decision maker of a team of math agents. Read the problem and the agents' "
    "answers, decide which final number is right and reply with one sentence: 'The answer is' "
    "followed by that number.",
)

_CHOICE = "finish with 'The answer is X.' where X is one of A, B, C, D."
KNOWLEDGE_ROLES = (
    AgentRole(
        "Knowledgeable Expert", f"You are a knowledgeable expert. Answer briefly and {_CHOICE}"
    ),
    AgentRole("Critic", f"You are a critic. Check the other answers for errors and {_CHOICE}"),
    AgentRole("Mathematician", f"You are a mathematician. Reason precisely and {_CHOICE}"),
    AgentRole("Historian", f"You are a historian who knows many facts. Answer and {_CHOICE}"),
    AgentRole("Scientist", f"You are a scientist. Reason from first principles and {_CHOICE}"),
)

KNOWLEDGE_DECISION = AgentRole(
    "Decision Maker",
    "You are the decision maker of a team of experts. Read the question and the experts' "
    "answers and reply only with 'The answer is X.' where X is one of A, B, C, D.",
)

_CODE = "Reply with the complete function in one ```python code block."
CODE_ROLES = (
    AgentRole("Project Manager", f"You are a project manager. Plan the solution briefly. {_CODE}"),
    AgentRole(
        "Algorithm Designer",
        f"You are an algorithm designer. Choose a correct, simple "
        f"algorithm and handle the edge cases. {_CODE}",
    ),
    AgentRole(
        "Programming Expert", f"You are a programming expert. Write clean, correct Python. {_CODE}"
    ),
    AgentRole(
        "Test Analyst",
        f"You are a test analyst. Check the other solutions against the "
        f"examples in the docstring and fix what fails. {_CODE}",
    ),
    AgentRole(
        "Bug Fixer", f"You are a bug fixer. Find and fix the bugs in the other solutions. {_CODE}"
    ),
)

CODE_DECISION = AgentRole(
    "Final Code Writer",
    "You are the final code writer of a team of programmers. Read the task and the team's "
    "solutions and write the final, correct function. " + _CODE,
)


# A reader before every agent (``fully_connected(base=...)``): its prefill gives the question the
# base KV every agent's pool is measured against, so agent 1 reuses too (issue 13). Agent-like,
# so the offsets stay as small as against a sibling agent's context.
CANONICAL_READER = AgentRole(
    "Canonical Reader", "You are a helpful assistant. Read the problem; others will solve it."
)


def agent_message(question: str, previous: list[tuple[str, str]]) -> str:
    """The user turn: the question and earlier answers, quoted verbatim as shared content."""
    parts = [f"Problem: {shared(question.strip())}"]
    for name, answer in previous:
        parts.append(f"Answer of the {name}: {shared(answer)}")
    parts.append("Your answer:")
    return "\n\n".join(parts)


@sgl.function
def fully_connected(
    s,  # noqa: ANN001 (sglang program state)
    question: str,
    roles: tuple[AgentRole, ...] = MATH_ROLES[:3],
    decision: AgentRole = MATH_DECISION,
    max_tokens: int = 96,
    decision_max_tokens: int = 24,
    decision_mode: str = "exact",
    base: AgentRole | None = None,
) -> list[dict]:
    """Returns one record per agent (role, answer, the server's and client's meta info).

    ``base``: a role whose one-token call reads the question first (``CANONICAL_READER``), so
    that the question's base KV comes from a fixed context instead of agent 1's prompt; its
    call is the paper's "Others" cost and is not in the records."""
    if base is not None:
        reader = s.fork(1)[0]
        reader += sgl.system(agent(base.name) + base.system_prompt)
        reader += sgl.user(agent_message(question, []))
        reader += sgl.assistant(sgl.gen("read", max_tokens=1, temperature=0))
        reader["read"]  # blocks: the agents are planned against its base
    agents = s.fork(len(roles))
    answers: list[tuple[str, str]] = []
    records = []
    for fork, role in zip(agents, roles, strict=True):
        fork += sgl.system(agent(role.name) + role.system_prompt)
        fork += sgl.user(agent_message(question, answers))
        fork += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))
        answers.append((role.name, fork["answer"]))  # blocks: the next agent needs it
        records.append(
            {"agent": role.name, "answer": fork["answer"], "meta": fork.get_meta_info("answer")}
        )
    agents.join()
    s += sgl.system(agent(decision.name, decision_mode) + decision.system_prompt)
    s += sgl.user(agent_message(question, answers))
    s += sgl.assistant(sgl.gen("final", max_tokens=decision_max_tokens, temperature=0))
    records.append({"agent": decision.name, "answer": s["final"], "meta": s.get_meta_info("final")})
    return records


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """The number after the last 'answer is', else the last number in the text."""
    tail = text.rsplit("answer is", 1)[-1] if "answer is" in text else text
    numbers = _NUMBER.findall(tail) or _NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[0 if "answer is" in text else -1].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value
