"""Marking shared content and agents inside an ``@sgl.function`` program's prompt text.

sglang's ``gen`` carries no per-call metadata, so the program marks its prompt text instead:
``shared(text)`` wraps content that other prompts also quote (a question, another agent's
answer), and ``agent(name, mode)`` tags the prompt with the calling agent and its reuse mode.
The marks are Unicode private-use characters that real text does not contain; ``KVCommEndpoint``
turns them into the wire protocol and removes them, so the model never sees them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SHARED_OPEN, _SHARED_CLOSE = "\ue000", "\ue001"
_TAG_OPEN, _TAG_CLOSE = "\ue002", "\ue003"
_MARKS = re.compile(f"({_SHARED_OPEN}.*?{_SHARED_CLOSE}|{_TAG_OPEN}.*?{_TAG_CLOSE})", re.DOTALL)
MODES = ("approx", "exact", "off")


class MarkupError(ValueError):
    pass


def shared(text: str) -> str:
    """``text`` as shared content: its KV may be reused across prompts."""
    if any(m in text for m in (_SHARED_OPEN, _SHARED_CLOSE, _TAG_OPEN, _TAG_CLOSE)):
        raise MarkupError("shared content must not contain kvcomm marks (nested shared()?)")
    return f"{_SHARED_OPEN}{text}{_SHARED_CLOSE}"


def agent(name: str, mode: str = "approx") -> str:
    """Tag the prompt with its agent (for reports) and reuse mode (approx | exact | off)."""
    if mode not in MODES:
        raise MarkupError(f"mode must be one of {MODES}, got {mode!r}")
    if "|" in mode or _TAG_CLOSE in name:
        raise MarkupError(f"bad agent name {name!r}")
    return f"{_TAG_OPEN}{mode}|{name}{_TAG_CLOSE}"


@dataclass(frozen=True)
class Markup:
    pieces: tuple[tuple[str, bool], ...]  # (text, is_shared), in prompt order
    agent: str | None = None
    mode: str | None = None

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.pieces)


def parse(text: str) -> Markup:
    pieces: list[tuple[str, bool]] = []
    name = mode = None
    for part in _MARKS.split(text):
        if not part:
            continue
        if part.startswith(_SHARED_OPEN):
            pieces.append((part[1:-1], True))
        elif part.startswith(_TAG_OPEN):
            mode, name = part[1:-1].split("|", 1)
        elif any(m in part for m in (_SHARED_OPEN, _SHARED_CLOSE, _TAG_OPEN, _TAG_CLOSE)):
            raise MarkupError(f"unbalanced kvcomm mark near {part[:40]!r}")
        else:
            pieces.append((part, False))
    return Markup(tuple(pieces), name, mode)


def strip(text: str) -> str:
    """The prompt text without marks (what the model reads)."""
    return parse(text).text
